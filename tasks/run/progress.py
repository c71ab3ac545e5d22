"""One progress artifact for a whole run: processed / total records over all its jobs."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

if TYPE_CHECKING:
    from tasks.pipeline.plan import RunPlan
    from tasks.run.state import RunState

log = logging.getLogger("bedrock_batch.progress")


def merged_records(plan: RunPlan, state: RunState) -> int:
    """Records of the plan's shards whose part was written before (a resumed run)."""
    shards = state.shards
    return sum(
        s.records for s in plan.shards if s.name in shards and shards[s.name].part_uri is not None
    )


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
    87.5 % that way). `complete()` sets 100 % at the end of a finished run. A send the Prefect
    server refuses (after its client's own retries) is logged and sent again with the next
    figure: the bar is a view, and a shard whose job just ended must not fail over it.
    """

    def __init__(
        self,
        total_records: int,
        done_records: int = 0,
        send: Callable[[UUID, float], None] = _send,
        create: Callable[[float], UUID] = _create,
        min_interval: float = 2.0,
    ) -> None:
        self.total = max(total_records, 1)
        self._done = done_records
        self._per_job: dict[str, int] = {}
        self._sum = 0
        self._lock = threading.Lock()  # guards the counts
        self._send_lock = threading.Lock()  # orders the sends: one at a time, never backwards
        self._send = send
        # Each update is a write on the Prefect server; hundreds of jobs moving at once would
        # otherwise send several a second and slow every other call (the gate's among them).
        self.min_interval = min_interval
        self._sent_at = float("-inf")
        self._pending = 0.0
        self._timer: threading.Timer | None = None
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
        with self._send_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._show(100.0, now=True)

    def flush(self) -> None:
        """Send the figure held back by the interval, if any."""
        with self._send_lock:
            self._timer = None
            pending = self._pending
        self._show(pending, now=True)

    def _show(self, percent: float, now: bool = False) -> None:
        with self._send_lock:
            if percent <= self.shown:
                return
            wait = self._sent_at + self.min_interval - time.monotonic()
            if wait > 0 and not now:
                self._pending = max(self._pending, percent)
                if self._timer is None:  # send it when the interval ends
                    context = contextvars.copy_context()  # the artifact's flow run
                    self._timer = threading.Timer(wait, context.run, (self.flush,))
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._sent_at = time.monotonic()
            try:
                self._send(self.artifact_id, percent)
            except Exception as exc:  # noqa: BLE001 - the run goes on; the next figure retries
                self._pending = max(self._pending, percent)
                log.warning("Could not move the progress artifact to %.1f %%: %s", percent, exc)
                return
            self.shown = percent
