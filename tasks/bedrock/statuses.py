"""What each Bedrock batch job status means for a run, as one table (like Airflow's waiters).

Statuses and meanings from botocore's bedrock service model (ModelInvocationJobStatus) and the
AWS user guide "Monitor batch inference jobs": Expired is a job that was scheduled but did not
start before its timeout; a job that runs out of time part-way ends PartiallyCompleted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """What a status means for the run.

    final: the job will not change again. mergeable: its output is a finished job's output
    (rows without a line are MissingOutput). retryable: the records it did not answer go to
    another attempt. stopped: someone stopped it (retried only when the run asks).
    """

    final: bool = False
    mergeable: bool = False
    retryable: bool = False
    stopped: bool = False

    @property
    def active(self) -> bool:
        """Counts against the per-model quota of jobs submitted or in progress."""
        return not self.final


# ModelInvocationJobStatus values (botocore bedrock service-2.json).
SUBMITTED = "Submitted"
VALIDATING = "Validating"
SCHEDULED = "Scheduled"
IN_PROGRESS = "InProgress"
STOPPING = "Stopping"
COMPLETED = "Completed"
PARTIALLY_COMPLETED = "PartiallyCompleted"
FAILED = "Failed"
EXPIRED = "Expired"
STOPPED = "Stopped"

_IN_FLIGHT = Outcome()
STATUS_OUTCOMES: dict[str, Outcome] = {
    SUBMITTED: _IN_FLIGHT,
    VALIDATING: _IN_FLIGHT,
    SCHEDULED: _IN_FLIGHT,
    IN_PROGRESS: _IN_FLIGHT,
    STOPPING: _IN_FLIGHT,
    COMPLETED: Outcome(final=True, mergeable=True),
    # Records not processed in time have no output line; they are retried as MissingOutput.
    PARTIALLY_COMPLETED: Outcome(final=True, mergeable=True),
    FAILED: Outcome(final=True, retryable=True),
    EXPIRED: Outcome(final=True, retryable=True),
    STOPPED: Outcome(final=True, stopped=True),
}

# The order a job walks its statuses in (the GetModelInvocationJob status table): an event
# that reports an earlier status than one already seen is late, not news.
STATUS_ORDER = {
    status: rank
    for rank, status in enumerate((SUBMITTED, VALIDATING, SCHEDULED, IN_PROGRESS, STOPPING))
}
FINAL_STATUSES = frozenset(s for s, o in STATUS_OUTCOMES.items() if o.final)
ACTIVE_STATUSES = frozenset(s for s, o in STATUS_OUTCOMES.items() if o.active)
MERGEABLE_STATUSES = frozenset(s for s, o in STATUS_OUTCOMES.items() if o.mergeable)


def outcome(status: str | None) -> Outcome:
    """The outcome of a status; an unknown or missing status is treated as still in flight."""
    return STATUS_OUTCOMES.get(status or "", _IN_FLIGHT)


def retry_statuses(retry_stopped: bool) -> frozenset[str]:
    """Job statuses whose unanswered records go to another attempt."""
    return frozenset(
        s for s, o in STATUS_OUTCOMES.items() if o.retryable or (retry_stopped and o.stopped)
    )
