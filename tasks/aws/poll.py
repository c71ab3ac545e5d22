"""Waiting for a Bedrock batch job's final status: the task a shard runs while its job runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.aws.clients import client
from tasks.aws.watcher import COUNTERS, JobWatcher, follow_job

__all__ = ["COUNTERS", "describe_job", "wait_for_job"]


def describe_job(job_arn: str) -> dict[str, Any]:
    """GetModelInvocationJob."""
    return client("bedrock").get_model_invocation_job(jobIdentifier=job_arn)


@task(task_run_name="wait-{job_name}", cache_policy=NO_CACHE)
def wait_for_job(
    watcher: JobWatcher,
    job_arn: str,
    job_name: str,
    on_change: Callable[[dict[str, Any], str | None], None],
    look_now: bool = False,
) -> dict[str, Any]:
    """Wait until the job reaches a final status; its gate slot is kept by the lease keeper.

    The run's one watcher asks Bedrock about all its jobs (tasks.aws.watcher); this task only
    waits on its job's changes, never on the gate: a running job is followed whatever
    Prefect's limits say.

    Args:
        watcher: the run's job watcher.
        job_arn: the job to follow.
        job_name: its name, for logs.
        on_change: called with the description and the previous status on every change of
            status or counters (state, events and progress hang off it).
        look_now: ask Bedrock at once (a job created before a restart may have ended).

    Returns:
        The final description (GetModelInvocationJob / ListModelInvocationJobs fields).
    """
    if look_now:
        watcher.poll_now()
    return follow_job(watcher, job_arn, job_name, on_change, get_run_logger())
