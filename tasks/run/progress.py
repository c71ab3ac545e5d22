"""One progress artifact for a whole run: processed / total records over all its jobs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def _create(percent: float) -> UUID:
    return create_progress_artifact(
        progress=percent, description="Records processed over all Bedrock jobs"
    )


def _send(artifact_id: UUID, percent: float) -> None:
    update_progress_artifact(artifact_id, percent)


class RunProgress:
    """Sums processed records per job and moves one Prefect progress artifact, thread-safe.

    The figure shown only moves forward: shards report from many threads, and an update
    computed earlier but sent later must not pull the bar back (a completed run once ended at
    87.5 % that way). `complete()` sets 100 % at the end of a finished run.
    """

    def __init__(
        self,
        total_records: int,
        done_records: int = 0,
        send: Callable[[UUID, float], None] = _send,
        create: Callable[[float], UUID] = _create,
    ) -> None:
        self.total = max(total_records, 1)
        self._done = done_records
        self._per_job: dict[str, int] = {}
        self._sum = 0
        self._lock = threading.Lock()  # guards the counts
        self._send_lock = threading.Lock()  # orders the sends: one at a time, never backwards
        self._send = send
        self.shown = self._percent()
        self.artifact_id = create(self.shown)

    def _percent(self) -> float:
        processed = self._done + self._sum
        return round(min(100.0, 100.0 * processed / self.total), 1)

    def update(self, job: str, processed: int) -> None:
        """Record a job's processed count; the artifact moves when the figure grows."""
        with self._lock:
            # A job's own count never goes back either (a restarted poll may see less).
            before = self._per_job.get(job, 0)
            if processed > before:  # a running sum: O(1) an update at any number of jobs
                self._per_job[job] = processed
                self._sum += processed - before
            percent = self._percent()
        self._show(percent)

    def complete(self) -> None:
        """The run finished and every record is in the output: 100 %."""
        self._show(100.0)

    def _show(self, percent: float) -> None:
        with self._send_lock:
            if percent <= self.shown:
                return
            self._send(self.artifact_id, percent)
            self.shown = percent
