"""One shard's life as a Bedrock job: take a slot, create the job, wait, give the slot back, merge.

Every step reads and writes the run state first, so a re-run after a crash continues the shard
from where it stopped instead of paying for it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import events, gate, storage
from tasks.merge import merge_shard
from tasks.plan import OUTPUT_DIR, ShardPlan, part_name
from tasks.poll import COUNTERS, wait_for_job
from tasks.progress import RunProgress
from tasks.run_state import JobAttempt, RunStateStore, ShardState, now_iso
from tasks.settings import get_settings
from tasks.submit import (
    JobRequest,
    client_token_for,
    create_job,
    find_job_by_name,
    job_name_for,
)

MERGEABLE_STATUSES = frozenset({"Completed", "PartiallyCompleted"})


@dataclass
class RunContext:
    """What every shard of a run shares: where things live, the model, the gate, the state."""

    run_name: str
    run_dir: str
    job_prefix: str
    model_id: str
    invocation_type: str
    role_arn: str
    gate_name: str
    store: RunStateStore
    progress: RunProgress
    timeout_hours: int | None = None
    kms_key_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    flow_run_id: UUID | None = None

    def input_uri(self, shard: ShardPlan) -> str:
        return storage.join(self.job_prefix, shard.input_file)

    def output_prefix(self, shard: ShardPlan) -> str:
        return storage.join(self.job_prefix, "bedrock-output", shard.name) + "/"

    def rows_uri(self, shard: ShardPlan) -> str:
        return storage.join(self.run_dir, shard.rows_file)

    def part_uri(self, shard: ShardPlan) -> str:
        return storage.join(self.run_dir, OUTPUT_DIR, part_name(shard.index))


@dataclass
class ShardResult:
    """What a shard ended with, for the summary."""

    shard: str
    records: int
    job_arn: str | None
    status: str | None
    part_uri: str
    stats: dict[str, Any]
    attempts: int
    submitted_at: str | None
    ended_at: str | None


def _request(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt) -> JobRequest:
    tags = {"bedrock-batch-run": ctx.run_name, "bedrock-batch-shard": shard.name, **ctx.tags}
    return JobRequest(
        job_name=attempt.job_name,
        client_token=attempt.client_token,
        model_id=ctx.model_id,
        role_arn=ctx.role_arn,
        input_uri=ctx.input_uri(shard),
        output_uri=ctx.output_prefix(shard),
        invocation_type=ctx.invocation_type,
        timeout_hours=ctx.timeout_hours,
        kms_key_id=ctx.kms_key_id,
        tags=tags,
    )


def _hold_slot(ctx: RunContext, attempt: JobAttempt, logger: logging.LoggerAdapter) -> None:
    """Make sure the attempt holds a live lease: renew the stored one or take a new one."""
    lease_seconds = get_settings().poll.lease_seconds
    if attempt.lease_id and gate.renew_slot(attempt.lease_id, lease_seconds):
        return
    if attempt.lease_id:
        logger.warning(
            "Lease of %s expired while nothing was running; taking a slot again", attempt.job_name
        )
    attempt.lease_id = str(
        gate.acquire_slot(ctx.gate_name, lease_seconds, ctx.flow_run_id, logger=logger)
    )
    ctx.store.save()


def _submit(ctx: RunContext, shard: ShardPlan, state: ShardState, logger) -> JobAttempt:
    """Create the shard's job (or find the one a crashed run already created)."""
    attempt = state.current
    resumed = attempt is not None
    if attempt is None:
        number = 1
        attempt = JobAttempt(
            attempt=number,
            job_name=job_name_for(ctx.run_name, shard.name, number),
            client_token=client_token_for(ctx.run_name, shard.name, number),
        )
        state.attempts.append(attempt)
        ctx.store.save()
    _hold_slot(ctx, attempt, logger)
    if attempt.job_arn is None:
        # A crash between create and saving the ARN leaves a job we must not pay for twice:
        # look it up by its deterministic name; the idempotency token covers the rest.
        existing = find_job_by_name(attempt.job_name) if resumed else None
        if existing:
            logger.info("Found job %s created before a restart", attempt.job_name)
        attempt.job_arn = existing or create_job(_request(ctx, shard, attempt))
        attempt.submitted_at = attempt.submitted_at or now_iso()
        attempt.status = attempt.status or "Submitted"
        ctx.store.save()
        events.emit_job_submitted(
            ctx.run_name, attempt.job_arn, shard.name, ctx.model_id, shard.records
        )
    return attempt


def _watch(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt) -> dict[str, Any]:
    def on_change(job: dict[str, Any], previous: str | None) -> None:
        attempt.status = job["status"]
        attempt.message = job.get("message")
        attempt.counters = {name: job[name] for name in COUNTERS if name in job}
        if attempt.is_final:
            attempt.ended_at = now_iso()
        ctx.store.save()
        ctx.progress.update(shard.name, attempt.counters.get("processedRecordCount", 0))
        events.emit_job_status(
            ctx.run_name,
            attempt.job_arn,
            shard.name,
            ctx.model_id,
            job["status"],
            previous,
            attempt.counters,
        )

    def on_lease(lease_id: str) -> None:
        attempt.lease_id = lease_id
        ctx.store.save()

    return wait_for_job(
        attempt.job_arn, attempt.job_name, attempt.lease_id, ctx.gate_name, on_change, on_lease
    )


@task(task_run_name="merge-{shard.name}", cache_policy=NO_CACHE)
def merge_job_output(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt) -> dict[str, Any]:
    """Read the job's ``.out`` files and write the shard's Parquet part right away.

    Args:
        ctx: the run.
        shard: the shard the job ran.
        attempt: the job, at its final status.

    Returns:
        The merge statistics (records, succeeded, failed, tokens).
    """
    job_error = None
    outputs: list[bytes] = []
    if attempt.status in MERGEABLE_STATUSES:
        prefix = storage.join(ctx.output_prefix(shard), attempt.job_id or "")
        outputs = [storage.read_bytes(uri) for uri in storage.list_files(prefix, ".jsonl.out")]
    else:
        job_error = (attempt.status or "Unknown", attempt.message or "the job did not finish")
    part = ctx.part_uri(shard)
    with (
        storage.local_copy(ctx.rows_uri(shard)) as rows,
        storage.local_dir_for(storage.join(ctx.run_dir, "output")) as out_dir,
    ):
        dest = out_dir / part.rsplit("/", 1)[-1]
        stats = merge_shard(
            rows,
            outputs,
            model_id=ctx.model_id,
            invocation_type=ctx.invocation_type,
            dest=dest,
            job_id=attempt.job_id,
            job_error=job_error,
        )
        if storage.is_s3(part):
            storage.upload_file(dest, part)
    return _as_dict(stats)


def _as_dict(stats: Any) -> dict[str, Any]:
    if isinstance(stats, dict):
        return stats
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}


@task(task_run_name="shard-{shard.name}", cache_policy=NO_CACHE)
def run_shard(ctx: RunContext, shard: ShardPlan) -> ShardResult:
    """Take one shard from the plan to its merged Parquet part, resuming whatever was done.

    Args:
        ctx: the run.
        shard: the shard to run.

    Returns:
        The shard's result for the summary.
    """
    logger = get_run_logger()
    state = ctx.store.shard(shard.name)
    if state.part_uri is None:
        attempt = _submit(ctx, shard, state, logger) if not _final(state) else state.current
        if not attempt.is_final:
            job = _watch(ctx, shard, attempt)
            attempt.status = job["status"]
        if attempt.lease_id:
            gate.release_slot(attempt.lease_id)
            attempt.lease_id = None
            ctx.store.save()
        state.merge_stats = merge_job_output(ctx, shard, attempt)
        state.part_uri = ctx.part_uri(shard)
        ctx.store.save()
        events.emit_job_merged(
            ctx.run_name, attempt.job_arn or "", shard.name, state.merge_stats, state.part_uri
        )
    current = state.current
    return ShardResult(
        shard=shard.name,
        records=shard.records,
        job_arn=current.job_arn if current else None,
        status=current.status if current else None,
        part_uri=state.part_uri,
        stats=state.merge_stats or {},
        attempts=len(state.attempts),
        submitted_at=current.submitted_at if current else None,
        ended_at=current.ended_at if current else None,
    )


def _final(state: ShardState) -> bool:
    return state.current is not None and state.current.is_final
