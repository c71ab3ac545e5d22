"""Waiting for a Bedrock batch job's final status, in the shard's task while its job runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tasks.aws.clients import client
from tasks.aws.watcher import COUNTERS, JobWatcher, follow_job

__all__ = ["COUNTERS", "describe_job", "wait_for_job"]


def describe_job(job_arn: str) -> dict[str, Any]:
    """GetModelInvocationJob."""
    return client("bedrock").get_model_invocation_job(jobIdentifier=job_arn)


def wait_for_job(
    watcher: JobWatcher,
    job_arn: str,
    job_name: str,
    on_change: Callable[[dict[str, Any], str | None], None],
    logger: logging.Logger | logging.LoggerAdapter,
    look_now: bool = False,
) -> dict[str, Any]:
    """Wait until the job reaches a final status; its gate slot is kept by the lease keeper.

    The run's one watcher asks Bedrock about all its jobs (tasks.aws.watcher); this only
    waits on its job's changes, never on the gate: a running job is followed whatever
    Prefect's limits say. Not a task of its own: the shard's task run logs the job's statuses.

    Args:
        watcher: the run's job watcher.
        job_arn: the job to follow.
        job_name: its name, for logs.
        on_change: called with the description and the previous status on every change of
            status or counters (state, events and progress hang off it).
        logger: where the job's status changes are logged (the shard's run logger).
        look_now: ask Bedrock at once (a job created before a restart may have ended).

    Returns:
        The final description (GetModelInvocationJob / ListModelInvocationJobs fields).
    """
    if look_now:
        watcher.poll_now()
    return follow_job(watcher, job_arn, job_name, on_change, logger)
