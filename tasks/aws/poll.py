"""Polling a Bedrock batch job to its final status while keeping its gate slot alive."""

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
from tasks.run import gate
from tasks.settings import get_settings

COUNTERS = ("totalRecordCount", "processedRecordCount", "successRecordCount", "errorRecordCount")


def describe_job(job_arn: str) -> dict[str, Any]:
    """GetModelInvocationJob."""
    return client("bedrock").get_model_invocation_job(jobIdentifier=job_arn)


@task(task_run_name="wait-{job_name}", cache_policy=NO_CACHE)
def wait_for_job(
    job_arn: str,
    job_name: str,
    lease_id: str | None,
    gate_name: str,
    on_change: Callable[[dict[str, Any], str | None], None],
    on_lease: Callable[[str], None],
) -> dict[str, Any]:
    """Poll until the job reaches a final status, renewing its slot's lease meanwhile.

    Args:
        job_arn: the job to watch.
        job_name: its name, for logs.
        lease_id: the slot lease held for it (renewed, or re-taken if it expired).
        gate_name: the concurrency limit the lease belongs to.
        on_change: called with the description and the previous status on every change of
            status or counters (state, events and progress hang off it).
        on_lease: called with a new lease id when an expired lease had to be re-taken.

    Returns:
        The final GetModelInvocationJob description.
    """
    logger = get_run_logger()
    settings = get_settings().poll
    interval = settings.interval_seconds
    last_status: str | None = None
    last_counters: tuple = ()
    renewed_at = time.monotonic()
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
        else:
            interval = min(interval * settings.backoff, settings.max_interval_seconds)
        if status in FINAL_STATUSES:
            return job
        if lease_id and time.monotonic() - renewed_at > settings.lease_seconds / 3:
            if not gate.renew_slot(lease_id, settings.lease_seconds):
                logger.warning("The gate lease of %s had expired; taking a slot again", job_name)
                lease_id = str(gate.acquire_slot(gate_name, settings.lease_seconds, logger=logger))
                on_lease(lease_id)
            renewed_at = time.monotonic()
        time.sleep(interval)
