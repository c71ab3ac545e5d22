"""Job statuses of Bedrock batch inference and the transitions Bedrock makes between them."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """ModelInvocationJobStatus (botocore bedrock service-2.json)."""

    SUBMITTED = "Submitted"
    VALIDATING = "Validating"
    SCHEDULED = "Scheduled"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    PARTIALLY_COMPLETED = "PartiallyCompleted"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    EXPIRED = "Expired"

    @property
    def final(self) -> bool:
        """No transition leaves this status."""
        return not TRANSITIONS[self]

    @property
    def active(self) -> bool:
        """Counts against the per-model quota of jobs submitted or in progress."""
        return not self.final


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SUBMITTED: frozenset({JobStatus.VALIDATING, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.VALIDATING: frozenset({JobStatus.SCHEDULED, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.SCHEDULED: frozenset({JobStatus.IN_PROGRESS, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.IN_PROGRESS: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.PARTIALLY_COMPLETED,
            JobStatus.FAILED,
            JobStatus.STOPPING,
            JobStatus.EXPIRED,
        }
    ),
    JobStatus.STOPPING: frozenset({JobStatus.STOPPED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.PARTIALLY_COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.STOPPED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}

STOPPABLE = frozenset(
    {JobStatus.SUBMITTED, JobStatus.VALIDATING, JobStatus.SCHEDULED, JobStatus.IN_PROGRESS}
)
