"""Job statuses of Bedrock batch inference and the transitions Bedrock makes between them."""

from __future__ import annotations

import enum

from tasks.bedrock import statuses as S


class JobStatus(str, enum.Enum):
    """ModelInvocationJobStatus (botocore bedrock service-2.json)."""

    # The names are the project's Bedrock facts; the transitions below are the emulator's.
    SUBMITTED = S.SUBMITTED
    VALIDATING = S.VALIDATING
    SCHEDULED = S.SCHEDULED
    IN_PROGRESS = S.IN_PROGRESS
    COMPLETED = S.COMPLETED
    PARTIALLY_COMPLETED = S.PARTIALLY_COMPLETED
    FAILED = S.FAILED
    STOPPING = S.STOPPING
    STOPPED = S.STOPPED
    EXPIRED = S.EXPIRED

    @property
    def final(self) -> bool:
        """No transition leaves this status."""
        return not TRANSITIONS[self]

    @property
    def active(self) -> bool:
        """Counts against the per-model quota of jobs submitted or in progress."""
        return not self.final


# From the status documentation of GetModelInvocationJob in botocore's bedrock service-2.json
# (botocore 1.44.5): "Expired – This job timed out because it was scheduled but didn't begin
# before the set timeout duration", so only Scheduled leads to Expired; "PartiallyCompleted –
# ... Not all of your records could be processed in time", so a job that runs out of time
# part-way through processing ends PartiallyCompleted, never Expired.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SUBMITTED: frozenset({JobStatus.VALIDATING, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.VALIDATING: frozenset({JobStatus.SCHEDULED, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.SCHEDULED: frozenset(
        {JobStatus.IN_PROGRESS, JobStatus.STOPPING, JobStatus.FAILED, JobStatus.EXPIRED}
    ),
    JobStatus.IN_PROGRESS: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.PARTIALLY_COMPLETED,
            JobStatus.FAILED,
            JobStatus.STOPPING,
        }
    ),
    JobStatus.STOPPING: frozenset({JobStatus.STOPPED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.PARTIALLY_COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.STOPPED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}

# Statuses StopModelInvocationJob accepts; a stop of any other answers ValidationException.
STOPPABLE = frozenset(
    {JobStatus.SUBMITTED, JobStatus.VALIDATING, JobStatus.SCHEDULED, JobStatus.IN_PROGRESS}
)
