"""Polling a Bedrock batch job to its final status, with a warning when it stalls."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.aws.clients import client, error_code
from tasks.bedrock.error_codes import RETRYABLE_GET
from tasks.bedrock.statuses import FINAL_STATUSES
from tasks.errors import JobLostError
from tasks.settings import get_settings

COUNTERS = ("totalRecordCount", "processedRecordCount", "successRecordCount", "errorRecordCount")


def describe_job(job_arn: str) -> dict[str, Any]:
    """GetModelInvocationJob."""
    return client("bedrock").get_model_invocation_job(jobIdentifier=job_arn)


@task(task_run_name="wait-{job_name}", cache_policy=NO_CACHE)
def wait_for_job(
    job_arn: str,
    job_name: str,
    on_change: Callable[[dict[str, Any], str | None], None],
) -> dict[str, Any]:
    """Poll until the job reaches a final status; its gate slot is kept by the lease keeper.

    Polling never waits on the gate: a running job is watched whatever Prefect's limits say.
    A job whose status and counters stay the same for ``BEDROCK_BATCH_POLL_STALL_WARNING_SECONDS``
    logs a warning, once per such period.

    Args:
        job_arn: the job to watch.
        job_name: its name, for logs.
        on_change: called with the description and the previous status on every change of
            status or counters (state, events and progress hang off it).

    Returns:
        The final GetModelInvocationJob description.
    """
    logger = get_run_logger()
    settings = get_settings().poll
    interval = settings.interval_seconds
    last_status: str | None = None
    last_counters: tuple = ()
    progressed_at = warned_at = time.monotonic()
    while True:
        try:
            job = describe_job(job_arn)
        except ClientError as exc:
            if error_code(exc) not in RETRYABLE_GET:
                msg = (
                    f"GetModelInvocationJob failed for {job_arn} (last status {last_status}): {exc}"
                )
                raise JobLostError(msg) from exc
            logger.warning("Get of %s throttled; polling more slowly", job_name)
            interval = min(interval * 2, settings.max_interval_seconds)
            time.sleep(interval)
            continue
        status = job["status"]
        counters = tuple(job.get(name) for name in COUNTERS)
        if status != last_status or counters != last_counters:
            if status != last_status:
                logger.info(
                    "%s: %s → %s%s",
                    job_name,
                    last_status or "(new)",
                    status,
                    f" ({job['message']})" if job.get("message") else "",
                )
            on_change(job, last_status)
            last_status, last_counters = status, counters
            interval = settings.interval_seconds
            progressed_at = warned_at = time.monotonic()
        else:
            interval = min(interval * settings.backoff, settings.max_interval_seconds)
        if status in FINAL_STATUSES:
            return job
        if time.monotonic() - warned_at >= settings.stall_warning_seconds:
            warned_at = time.monotonic()
            _warn_stalled(logger, job_name, job, warned_at - progressed_at)
        time.sleep(interval)


def _warn_stalled(logger, job_name: str, job: dict[str, Any], seconds: float) -> None:
    logger.warning(
        "%s has not progressed for %.0f s: status %s, %s of %s records processed "
        "(%s succeeded, %s failed)",
        job_name,
        seconds,
        job["status"],
        job.get("processedRecordCount", "?"),
        job.get("totalRecordCount", "?"),
        job.get("successRecordCount", "?"),
        job.get("errorRecordCount", "?"),
    )
