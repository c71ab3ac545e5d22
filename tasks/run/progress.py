"""One progress artifact for a whole run: processed / total records over all its jobs."""

from __future__ import annotations

import threading

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class RunProgress:
    """Sums processed records per job and moves one Prefect progress artifact, thread-safe."""

    def __init__(self, total_records: int, done_records: int = 0) -> None:
        self.total = max(total_records, 1)
        self._done = done_records
        self._per_job: dict[str, int] = {}
        self._lock = threading.Lock()
        self._shown = -1.0
        self.artifact_id = create_progress_artifact(
            progress=self._percent(), description="Records processed over all Bedrock jobs"
        )

    def _percent(self) -> float:
        processed = self._done + sum(self._per_job.values())
        return round(min(100.0, 100.0 * processed / self.total), 1)

    def update(self, job: str, processed: int) -> None:
        """Record a job's processed count; the artifact moves when the figure changes."""
        with self._lock:
            self._per_job[job] = processed
            percent = self._percent()
            if percent == self._shown:
                return
            self._shown = percent
        update_progress_artifact(self.artifact_id, percent)
