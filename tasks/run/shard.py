"""One shard's life: jobs through the gate, retries of what failed, and its merged Parquet part.

Every step reads and writes the run state first, so a re-run after a crash continues the shard
from where it stopped instead of paying for it again. The first attempt sends the whole shard;
later attempts send only the records still unserved: as a batch job while they reach the job
minimum, else through bedrock-runtime on demand.
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.aws import storage
from tasks.aws.on_demand import record_ids_of, select_lines, serve_on_demand
from tasks.aws.poll import COUNTERS, describe_job, wait_for_job
from tasks.aws.submit import (
    JobRequest,
    client_token_for,
    create_backoff,
    create_job,
    find_job,
    find_own_job,
    job_name_for,
)
from tasks.aws.watcher import JobWatcher
from tasks.bedrock.families import family_for
from tasks.bedrock.manifest import MANIFEST_FILE, parse_manifest, token_totals
from tasks.bedrock.statuses import outcome, retry_statuses
from tasks.errors import OutputsLostError, PlanError, RunInterrupted
from tasks.monitoring import events
from tasks.pipeline import columns as C
from tasks.pipeline.attempts import SUPERSEDED, AttemptOutput, Settled, retry_ids, settle
from tasks.pipeline.merge import MergeTurn, settle_warnings, write_part
from tasks.pipeline.plan import ShardPlan
from tasks.pipeline.structured import OutputSchema
from tasks.pipeline.tokens import JOB_TOKENS, JobTokens
from tasks.run import gate
from tasks.run.artifacts import COST_USD, JobBoard
from tasks.run.cost import COST_CEILING_REACHED, HELD_BACK_USD, price_usage, token_usage
from tasks.run.failpoints import failpoint
from tasks.run.layout import JSONL, OUT_SUFFIX, RunLayout, input_file
from tasks.run.owner import RunClaim
from tasks.run.progress import RunProgress
from tasks.run.state import JobAttempt, RunStateStore, ShardState, now_iso
from tasks.run.stop import register_live_store
from tasks.settings import get_settings


@dataclass
class RunContext:
    """What every shard of a run shares: where things live, the model, the gate, the state."""

    run_name: str
    layout: RunLayout
    run_id: str  # this incarnation of the run (run.json): job tokens derive from it
    run_key: str  # short digest of the run's identity that leads every job name
    model_id: str
    invocation_type: str
    role_arn: str
    gate_name: str
    store: RunStateStore
    progress: RunProgress
    watcher: JobWatcher  # follows every job of the run (one poller, events when set up)
    timeout_hours: int | None = None
    kms_key_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    flow_run_id: UUID | None = None
    max_attempts: int = 3
    retry_stopped: bool = False
    resend_lost_outputs: bool = False
    on_demand: bool = True
    on_demand_rps: float = 5.0
    claim: RunClaim | None = None
    # The template's output schema: answers are validated into typed columns, and repaired.
    output_schema: OutputSchema | None = None
    # The plan's inference options: the parser reads the embedding types they ask for.
    options: dict[str, Any] = field(default_factory=dict)
    board: JobBoard | None = None  # the live job table and timeline in the UI
    interrupted: threading.Event = field(default_factory=threading.Event)

    def changed(self) -> None:
        """A job of the run moved: let the UI's live table and timeline know."""
        if self.board is not None:
            self.board.changed()

    cost_guard: Any = None  # tasks.run.cost.CostGuard when the run has max_cost_usd
    price: Any = None  # the run's tasks.bedrock.prices.ModelPrice (None: unknown)

    @property
    def run_dir(self) -> str:
        return self.layout.run_dir

    @property
    def gate_run(self) -> str:
        """The run as its gate knows it (`gate.gate_run`): its own limit, not its name's."""
        return gate.gate_run(self.run_name, self.run_key)

    def job_uri(self, relative: str) -> str:
        return self.layout.job_file(relative)

    def output_prefix(self, shard: ShardPlan) -> str:
        return self.layout.bedrock_output_prefix(shard.name)

    def rows_uri(self, shard: ShardPlan) -> str:
        return self.layout.run_file(shard.rows_file)

    def part_uri(self, shard: ShardPlan) -> str:
        return self.layout.part_uri(shard.index)

    def check_owner(self) -> None:
        """Stop before spending if the run was interrupted or another process took it over."""
        if self.interrupted.is_set():
            raise RunInterrupted(f"Run {self.run_name} was interrupted; nothing more is sent.")
        if self.claim is not None:
            self.claim.check()

    def interrupt(self) -> None:
        """The process is going (Ctrl-C, SIGTERM): every shard stops where it waits.

        Shards waiting on a job, for a gate slot or between on-demand batches raise
        `RunInterrupted`; none creates a job after this. The jobs already created keep running
        on Bedrock and a re-run resumes them, as after a kill.
        """
        self.interrupted.set()
        self.watcher.interrupt(RunInterrupted(f"Run {self.run_name} was interrupted."))
        gate.abandon_waiters(self.model_id, self.gate_run)


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
    held_back: int = 0  # records the cost ceiling kept from being sent
    held_back_usd: float | None = None  # the most sending them may cost (None: unknown)


def _request(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt) -> JobRequest:
    tags = {
        "bedrock-batch-run": ctx.run_name,
        "bedrock-batch-run-key": ctx.run_key,
        "bedrock-batch-shard": shard.name,
        **ctx.tags,
    }
    return JobRequest(
        job_name=attempt.job_name,
        client_token=attempt.client_token,
        model_id=ctx.model_id,
        role_arn=ctx.role_arn,
        input_uri=ctx.job_uri(attempt.input_file),
        output_uri=ctx.output_prefix(shard),
        invocation_type=ctx.invocation_type,
        timeout_hours=ctx.timeout_hours,
        kms_key_id=ctx.kms_key_id,
        tags=tags,
    )


def _hold_slot(
    ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, logger: logging.LoggerAdapter
) -> None:
    """Make sure the attempt holds a gate slot that the process's lease keeper renews.

    A job not yet created waits for a slot. A job that already exists never waits: its stored
    lease is kept if the server still knows it, else the gate is recounted from Bedrock and
    the slot taken again while the job is polled.
    """
    if gate.KEEPER.holds(attempt.job_name):
        return
    register_live_store(ctx.run_dir, ctx.store)
    lease_seconds = get_settings().poll.lease_seconds

    def on_new_lease(lease_id: str) -> None:
        attempt.lease_id = lease_id
        ctx.store.save(shard.name)

    slot = gate.HeldSlot(
        attempt.job_name, ctx.model_id, ctx.gate_run, None, ctx.flow_run_id, on_new_lease
    )
    if attempt.lease_id and gate.renew_slot(attempt.lease_id, lease_seconds):
        logger.info(
            "Kept the gate slot %s held for %s before a restart", attempt.lease_id, attempt.job_name
        )
        slot.lease_id = attempt.lease_id
        gate.kept_after_restart(attempt.lease_id, ctx.model_id, ctx.gate_run)
        gate.KEEPER.hold(slot)
        return
    # A crash between create and saving the ARN leaves a running job known only by name.
    running = attempt.job_arn is not None or (
        attempt.lease_id is not None
        and find_job(attempt.job_name, attempt.client_token) is not None
    )
    if running:
        logger.warning(
            "The gate lease of %s is gone (expired or lost by the Prefect server) while its "
            "job runs; the lease keeper recounts the gate and takes the slot again while the "
            "job is polled",
            attempt.job_name,
        )
        gate.KEEPER.hold(slot)
        return
    if attempt.lease_id:
        logger.warning(
            "Lease of %s expired while nothing was running; taking a slot again", attempt.job_name
        )
    slot.lease_id = str(
        gate.acquire_slot(
            ctx.model_id,
            ctx.gate_run,
            lease_seconds,
            ctx.flow_run_id,
            logger=logger,
            leases_lost=attempt.lease_id is not None,
        )
    )
    gate.KEEPER.hold(slot)
    attempt.lease_id = slot.lease_id
    ctx.store.save(shard.name)


def _new_attempt(
    ctx: RunContext,
    shard: ShardPlan,
    state: ShardState,
    input_file: str,
    records: int,
    how: str,
    input_sha256: str = "",
) -> JobAttempt:
    number = len(state.attempts) + 1
    attempt = JobAttempt(
        attempt=number,
        job_name=job_name_for(ctx.run_name, shard.name, number, ctx.run_key),
        client_token=client_token_for(ctx.run_id, shard.name, number),
        input_file=input_file,
        input_sha256=input_sha256,
        records=records,
        served_by=how,
    )
    state.attempts.append(attempt)
    ctx.store.save(shard.name)
    return attempt


def _submit(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, resumed: bool, logger) -> None:
    """Create the attempt's job, or find the one a crashed run already created."""
    if attempt.job_arn is None:
        ctx.check_owner()
    _hold_slot(ctx, shard, attempt, logger)
    if attempt.job_arn is not None:
        return
    try:
        ctx.check_owner()  # interrupted, or taken over, while it waited for the slot
        job_arn = _create(ctx, shard, attempt, resumed, logger)
    except Exception:
        _give_back_unused_slot(ctx, shard, attempt, logger)
        raise
    failpoint("after-create")
    attempt.job_arn = job_arn
    attempt.submitted_at = attempt.submitted_at or now_iso()
    attempt.status = attempt.status or "Submitted"
    ctx.store.save(shard.name)
    ctx.changed()
    events.emit_job_submitted(
        ctx.run_name, attempt.job_arn, shard.name, ctx.model_id, attempt.records
    )


def _create(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, resumed: bool, logger) -> str:
    """The ARN of the attempt's job: created now, or found from before a restart."""
    request = _request(ctx, shard, attempt)
    # A crash between create and saving the ARN leaves a job we must not pay for twice:
    # look it up by its deterministic name, adopting it only if its token and locations prove
    # it ours; the idempotency token covers the rest.
    existing = find_own_job(request) if resumed else None
    if existing:
        logger.info("Found job %s created before a restart", attempt.job_name)
        return existing
    _verify_input(ctx, attempt, shard)
    backoff = create_backoff(get_settings().poll.create_backoff_seconds)

    def quota_held() -> bool:
        """Jobs of the model in flight hold the quota (ours or not); none stops at a loss."""
        ctx.check_owner()
        return bool(gate.in_flight_jobs(ctx.model_id))

    return create_job(request, backoff, logger, quota_held)


def _give_back_unused_slot(
    ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, logger: logging.LoggerAdapter
) -> None:
    """The create failed: free the slot unless a job was made after all.

    Left held, the lease keeper renewed it for ever and the shards waiting behind a full gate
    never moved: the flow run failed and its process hung. A job that was made unbeknown to
    us is still found by its name when the run resumes (`find_own_job`), and the gate's
    recount from Bedrock counts it meanwhile.
    """
    try:
        made = find_job(attempt.job_name, attempt.client_token) is not None
    except Exception:  # noqa: BLE001 - Bedrock unreachable too: free it rather than hang
        logger.warning("Could not tell whether %s was created; freeing its slot", attempt.job_name)
        made = False
    if not made:
        _release(ctx, shard, attempt)


def _counters(job: dict[str, Any]) -> dict[str, int]:
    """The record counters a Get or List of the job carried (a job event carries none)."""
    return {name: job[name] for name in COUNTERS if name in job}


def _watch(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, look_now: bool, logger) -> None:
    def on_change(job: dict[str, Any], previous: str | None) -> None:
        attempt.status = job["status"]
        attempt.message = job.get("message")
        attempt.counters = _counters(job)
        if attempt.is_final:
            attempt.ended_at = now_iso()
            # Its slot is handed on right after (_release): the state forgets the lease in this
            # same write, one PUT a job fewer.
            attempt.lease_id = None
        ctx.store.save(shard.name)
        if not attempt.is_final:
            failpoint("polling")
        if attempt.attempt == 1:
            ctx.progress.update(shard.name, attempt.counters.get("processedRecordCount", 0))
        ctx.changed()
        events.emit_job_status(
            ctx.run_name,
            attempt.job_arn,
            shard.name,
            ctx.model_id,
            job["status"],
            previous,
            attempt.counters,
        )

    job = wait_for_job(ctx.watcher, attempt.job_arn, attempt.job_name, on_change, logger, look_now)
    attempt.status = job["status"]


def _release(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt) -> None:
    """The attempt's job ended: its slot goes to the run's next waiting shard, or back.

    The state forgets the lease first: a crash between the two leaves a lease nobody renews,
    which frees itself when it expires, never one that two shards both believe is theirs.
    """
    slot = gate.KEEPER.drop(attempt.job_name)
    lease_id = (slot.lease_id if slot else None) or attempt.lease_id
    if attempt.lease_id:
        attempt.lease_id = None
        ctx.store.save(shard.name)
    if lease_id:
        gate.hand_over_or_release(lease_id, ctx.model_id, ctx.gate_run)


def _verify_input(ctx: RunContext, attempt: JobAttempt, shard: ShardPlan) -> None:
    """The input a job is about to read must be the one the plan (or the retry) wrote."""
    expected = shard.sha256 if attempt.attempt == 1 else attempt.input_sha256
    if not expected:
        return
    uri = ctx.job_uri(attempt.input_file)
    found = storage.digest_of(uri)
    if found != expected:
        msg = (
            f"The job input {uri} is not the file this run wrote (sha256 {found or 'missing'}, "
            f"planned {expected}); nothing was submitted for {attempt.job_name}. Another run may "
            "share this location: use a new run_name, or restart=True to start this one again."
        )
        raise PlanError(msg)


def _on_demand_answers(ctx: RunContext, attempt: JobAttempt) -> list[bytes]:
    """The durable answer batches of an on-demand attempt, as their JSONL bytes."""
    prefix = ctx.layout.on_demand_prefix(attempt.job_name)
    return [storage.read_bytes(u) for u in storage.list_files(prefix, JSONL + OUT_SUFFIX)]


def _run_on_demand(ctx: RunContext, shard: ShardPlan, attempt: JobAttempt) -> None:
    """Serve the attempt's records that have no durable answer yet, keeping each batch at once."""
    ctx.check_owner()
    lines = storage.read_bytes(ctx.job_uri(attempt.input_file))
    answered = [i for batch in _on_demand_answers(ctx, attempt) for i in record_ids_of(batch)]
    remaining = select_lines(lines, answered, keep=False) if answered else lines

    def keep(first_record_id: str, batch: bytes) -> None:
        uri = ctx.layout.on_demand_batch_uri(attempt.job_name, first_record_id)
        storage.write_bytes(uri, batch, ctx.kms_key_id)
        failpoint("on-demand")
        ctx.check_owner()  # a claim lost mid-tail: the new owner serves the rest, not both

    serve_on_demand(
        attempt.job_name, ctx.model_id, ctx.invocation_type, remaining, ctx.on_demand_rps, keep
    )
    attempt.status = "Completed"
    attempt.ended_at = now_iso()
    ctx.store.save(shard.name)


def _written_elsewhere(attempt: JobAttempt) -> list[str]:
    """The job's output files where the job itself wrote them, when that is another prefix.

    A run folder copied or moved to another output_uri (a local one: its job prefix follows
    the folder) looked for its jobs' outputs under the new prefix, found none and took the
    answers for lost. Bedrock says where it wrote (botocore's bedrock model:
    GetModelInvocationJobResponse.outputDataConfig.s3OutputDataConfig.s3Uri, with the job's
    outputs under ``<s3Uri>/<jobId>/``).
    """
    if not attempt.job_arn or not attempt.is_final:
        return []
    config = describe_job(attempt.job_arn).get("outputDataConfig", {})
    uri = config.get("s3OutputDataConfig", {}).get("s3Uri")
    if not uri:
        return []
    return storage.list_files(storage.join(uri, attempt.job_id), JSONL + OUT_SUFFIX)


def _read_manifest(ctx: RunContext, attempt: JobAttempt, uris: list[str]) -> None:
    """Keep the job's manifest numbers on ``attempt`` when its rows carry no token counts.

    One small GET a job, once: the manifest sits beside the job's ``.jsonl.out`` files
    (`tasks.bedrock.manifest`). Families whose outputs count tokens do not need it.
    """
    if attempt.manifest is not None or not uris or not attempt.is_final:
        return
    if family_for(ctx.model_id, ctx.invocation_type).reports_tokens:
        return
    uri = storage.join(uris[0].rsplit("/", 1)[0], MANIFEST_FILE)
    try:
        attempt.manifest = parse_manifest(storage.read_bytes(uri))
    except (ClientError, OSError) as exc:  # no manifest: the job's tokens stay unknown
        get_run_logger().warning("No readable manifest at %s (%s): tokens unknown", uri, exc)


def _job_tokens(attempts: list[JobAttempt]) -> JobTokens:
    """The manifest totals of the attempts that have one, by job id."""
    return {a.job_id: token_totals(a.manifest) for a in attempts if a.job_id and a.manifest}


def _attempt_output(
    ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, files: ExitStack
) -> AttemptOutput:
    """What one finished attempt produced: its output files, downloaded for as long as `files`.

    A job's outputs are parsed from files, not from bytes in memory: Polars then reads a file
    a batch of lines at a time (one Titan v2 shard of 50k x 1024 floats, 646 MB of output,
    merged at 746-786 MB of peak RSS from its file against 1,334-1,369 MB from its bytes).
    """
    job_error = None
    outputs: list[bytes | Path] = []
    if attempt.served_by == C.SERVED_ON_DEMAND:
        outputs = _on_demand_answers(ctx, attempt)
    elif attempt.job_id:
        # Expired and Stopped jobs keep the outputs of the records they processed:
        # those are served and must not be paid for again.
        prefix = storage.join(ctx.output_prefix(shard), attempt.job_id)
        uris = storage.list_files(prefix, JSONL + OUT_SUFFIX) or _written_elsewhere(attempt)
        outputs = [files.enter_context(storage.local_copy(uri)) for uri in uris]
        _read_manifest(ctx, attempt, uris)
    if attempt.served_by != C.SERVED_ON_DEMAND and not outcome(attempt.status).mergeable:
        job_error = (attempt.status or "Unknown", attempt.message or "the job did not finish")
    ids = None
    if attempt.attempt > 1:
        ids = record_ids_of(storage.read_bytes(ctx.job_uri(attempt.input_file)))
    return AttemptOutput(
        attempt.attempt,
        outputs,
        record_ids=ids,
        job_id=attempt.job_id,
        served_by=attempt.served_by,
        job_error=job_error,
    )


def _settle(
    ctx: RunContext,
    shard: ShardPlan,
    attempts: list[JobAttempt],
    kept_back: AttemptOutput | None = None,
) -> Settled:
    """The shard's rows with what `attempts` (and `kept_back`) made of them (`attempts.settle`).

    The attempts' outputs are downloaded for the parse and deleted right after it.
    """
    with ExitStack() as files:
        outputs = [_attempt_output(ctx, shard, a, files) for a in attempts]
        if kept_back is not None:
            outputs.append(kept_back)
        rows = files.enter_context(storage.local_copy(ctx.rows_uri(shard)))
        return settle(
            rows, outputs, ctx.model_id, ctx.invocation_type, ctx.output_schema, ctx.options
        )


def _plan_retry(
    ctx: RunContext, shard: ShardPlan, state: ShardState, settled: Settled, logger
) -> JobAttempt | None:
    """The next attempt for records that failed for reasons not their own, if any is due."""
    last = state.current
    if outcome(last.status).stopped and not ctx.retry_stopped:
        return None
    ids = retry_ids(settled.frame, retry_statuses(ctx.retry_stopped))
    if not ids:
        return None
    if len(state.attempts) >= ctx.max_attempts:
        _warn_gave_up(shard, last, settled, ids, logger)
        return None
    # Every attempt's: the lines of an earlier one can go too (the part deleted, merged again).
    for attempt in state.attempts:
        _check_outputs_kept(ctx, shard, attempt, settled, logger, retried=attempt is not last)
    minimum = get_settings().quotas.min_records_per_job
    how = C.SERVED_BATCH if len(ids) >= minimum else C.SERVED_ON_DEMAND
    if how == C.SERVED_ON_DEMAND and not ctx.on_demand:
        logger.warning(
            "%d records of %s need a retry but are fewer than a job's minimum (%d) and "
            "on-demand serving is off; they keep their errors",
            len(ids),
            shard.name,
            minimum,
        )
        return None
    number = len(state.attempts) + 1
    relative = input_file(shard.name, number)
    original = storage.read_bytes(ctx.job_uri(shard.input_file))
    lines = select_lines(original, ids)
    digest = storage.sha256_bytes(lines)
    storage.write_bytes(ctx.job_uri(relative), lines, ctx.kms_key_id, digest)
    logger.info("Retrying %d records of %s (attempt %d, %s)", len(ids), shard.name, number, how)
    return _new_attempt(ctx, shard, state, relative, len(ids), how, digest)


def _warn_gave_up(
    shard: ShardPlan, last: JobAttempt, settled: Settled, ids: list[str], logger
) -> None:
    """Records that would be retried but are out of attempts: the run still completes, so this
    is the line an operator must not miss among the INFO statuses."""
    codes = (
        settled.frame.filter(pl.col(C.RECORD_ID).is_in(ids)).get_column(C.ERROR_CODE).value_counts()
    )
    by_code = ", ".join(
        f"{code} ×{n}" for code, n in sorted(codes.iter_rows(), key=lambda r: (-r[1], r[0]))
    )
    ended = f"{last.status}: {last.message}" if last.message else f"{last.status}"
    logger.warning(
        "%d records of %s still failed after %d attempts (max_attempts), and keep their errors "
        "in the output: %s; the last attempt (%s) ended %s",
        len(ids),
        shard.name,
        last.attempt,
        by_code,
        last.job_name or last.served_by,
        ended,
    )


def _check_outputs_kept(
    ctx: RunContext,
    shard: ShardPlan,
    attempt: JobAttempt,
    settled: Settled,
    logger,
    retried: bool = False,
) -> None:
    """Refuse to retry records a finished job answered but whose output lines are gone.

    Bedrock's counters say how many records the job processed (botocore's bedrock model,
    GetModelInvocationJobResponse.processedRecordCount: "The number of records that have been
    processed"), success or error, each one output line; fewer lines than that mean files
    deleted or cut after the job (a lifecycle rule, a cleanup): those answers were paid for,
    and sending them again pays twice. A finished on-demand tail kept one line for every
    record it served (an answer or its error), in the run folder. An attempt already
    ``retried`` sent on every record it left without a line: one still without is lost.
    """
    on_demand = attempt.served_by == C.SERVED_ON_DEMAND
    if on_demand:
        if attempt.status != "Completed":
            return
    elif attempt.served_by != C.SERVED_BATCH or not attempt.job_id or not attempt.job_arn:
        return
    frame = settled.frame
    missing = frame.filter(
        (pl.col(C.ERROR_CODE) == C.MISSING_OUTPUT) & (pl.col(C.ATTEMPTS) == attempt.attempt)
    ).height
    if not missing:
        return
    processed = attempt.records if on_demand else attempt.counters.get("processedRecordCount")
    if processed is None:
        # The end was seen without counters (a job state-change event carries none): ask.
        job = describe_job(attempt.job_arn)
        attempt.counters = _counters(job)
        processed = attempt.counters.get("processedRecordCount")
        if processed is None:
            return
    lost = missing if retried else missing - max(attempt.records - processed, 0)
    if lost <= 0:
        return
    if on_demand:
        where = ctx.layout.on_demand_prefix(attempt.job_name)
        what = f"kept answers of the on-demand tail {attempt.job_name}"
        how = f"{processed} records it served"
    else:
        where = storage.join(ctx.output_prefix(shard), attempt.job_id) + "/"
        what = f"outputs of job {attempt.job_name}"
        how = f"{processed} records Bedrock processed"
    if ctx.resend_lost_outputs:
        logger.warning(
            "%d records of %s that %s answered have no output line in %s; they are sent "
            "and paid again (resend_lost_outputs)",
            lost,
            shard.name,
            attempt.job_name,
            where,
        )
        return
    msg = (
        f"The {what} ({shard.name}) in {where} lack {lost} of the {how}: a .jsonl.out file "
        "there was deleted or cut after they were answered. Nothing was sent again; those "
        "answers were paid for. Put the files back (S3 versioning) and run again, or pass "
        "resend_lost_outputs=True (`--resend-lost-outputs`) to send and pay for those records "
        "again."
    )
    raise OutputsLostError(msg)


def _held_by_ceiling(
    ctx: RunContext, shard: ShardPlan, attempt: JobAttempt, logger
) -> AttemptOutput | None:
    """None when the attempt may go on; else the output that marks its records held back.

    Only an attempt not yet started is checked: a created job, or an on-demand tail with
    answers kept, is already paid for and goes on.
    """
    guard = ctx.cost_guard
    on_demand = attempt.served_by == C.SERVED_ON_DEMAND
    if guard is None or attempt.job_arn is not None or attempt.is_final:
        return None
    if on_demand and _on_demand_answers(ctx, attempt):
        return None
    # Created just before a crash, its ARN not saved: the job runs and is paid, so it goes on
    # (`_submit` adopts it); held back, it was never merged nor stopped.
    if not on_demand and attempt.lease_id and find_job(attempt.job_name, attempt.client_token):
        return None
    if guard.admit(shard.name, attempt.records, on_demand, attempt.attempt):
        if attempt.status == COST_CEILING_REACHED:
            # Held by an earlier run, admitted now: left marked held, a crash after its job's
            # create (or mid-tail) had the next run's guard skip it as never sent.
            attempt.status = attempt.message = attempt.ended_at = None
            ctx.store.save(shard.name)
        return None
    message = (
        f"Not sent: max_cost_usd={guard.ceiling} would be passed by this "
        f"{'on-demand tail' if on_demand else 'batch job'} (attempt {attempt.attempt})."
    )
    logger.warning("%s of %s: %s", attempt.records, shard.name, message)
    attempt.status, attempt.message, attempt.ended_at = COST_CEILING_REACHED, message, now_iso()
    ctx.store.save(shard.name)
    ids = None
    if attempt.attempt > 1:
        ids = record_ids_of(storage.read_bytes(ctx.job_uri(attempt.input_file)))
    return AttemptOutput(
        attempt.attempt,
        [],
        record_ids=ids,
        served_by=C.SERVED_SKIPPED,
        job_error=(COST_CEILING_REACHED, message),
        extra={"held_back": attempt.records},
    )


def merge_shard_output(
    ctx: RunContext,
    shard: ShardPlan,
    settled: Settled,
    usage: pl.DataFrame,
    job_tokens: JobTokens | None = None,
) -> dict[str, Any]:
    """Write the shard's Parquet part, right as the shard finishes.

    Inside the shard's task: one task run per shard (not four) keeps the Prefect server's
    writes per job low enough that a run of thousands of jobs does not make it refuse the gate.

    Args:
        ctx: the run.
        shard: the shard.
        settled: every row of the shard with its final outcome (`_settle`).
        usage: the rows' tokens as the run counts them (`tasks.run.cost.token_usage`).
        job_tokens: manifest totals of its jobs whose rows carry no token counts.

    Returns:
        The merge statistics (records, succeeded, failed, tokens).
    """
    part = ctx.part_uri(shard)
    with storage.local_dir_for(ctx.layout.output_dir) as out_dir:
        dest = out_dir / part.rsplit("/", 1)[-1]
        stats = write_part(settled.frame, dest, settled.stray_lines, usage)
        if storage.is_s3(part):
            storage.upload_file(dest, part, ctx.kms_key_id)
    failpoint("merge")
    merged = vars(stats).copy()
    if job_tokens:
        merged[JOB_TOKENS] = {job: list(pair) for job, pair in job_tokens.items()}
    return merged


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
    # A shard whose state was unreadable may have made jobs: look them up before creating.
    resumed = bool(state.attempts) or shard.name in ctx.store.lost
    if state.part_uri is None:
        how = C.SERVED_ON_DEMAND if shard.on_demand else C.SERVED_BATCH
        attempt = state.current or _new_attempt(
            ctx, shard, state, shard.input_file, shard.records, how
        )
        settled: Settled | None = None  # the rows with their outcomes so far
        held, held_usd = 0, 0.0
        # A shard's parsed outputs are in memory from their reading to the part's write, a few
        # shards at a time; a shard whose retry job runs (maybe for hours) holds none and reads
        # the outputs again after. They are parsed once a reading, for the retry decision and
        # the part alike.
        with MergeTurn() as turn:
            while attempt is not None:
                kept_back = _held_by_ceiling(ctx, shard, attempt, logger)
                if kept_back is not None:
                    turn.take()
                    settled = _settle(ctx, shard, state.attempts[:-1], kept_back)
                    held = attempt.records
                    on_demand = attempt.served_by == C.SERVED_ON_DEMAND
                    bound = ctx.cost_guard.upper_bound(shard.name, held, on_demand)
                    held_usd = bound if math.isfinite(bound) else None
                    break
                if attempt.served_by == C.SERVED_ON_DEMAND:
                    if not attempt.is_final:
                        _run_on_demand(ctx, shard, attempt)
                elif not attempt.is_final:
                    _submit(ctx, shard, attempt, resumed, logger)
                    _watch(ctx, shard, attempt, resumed, logger)
                _release(ctx, shard, attempt)
                turn.take()
                settled = _settle(ctx, shard, state.attempts)
                attempt = _plan_retry(ctx, shard, state, settled, logger)
                if attempt is not None:
                    settled = None
                    turn.give_back()  # while the retry runs, others merge
            assert settled is not None  # the loop ends only with the final outcomes settled
            for warning in settle_warnings(settled, shard.name):
                logger.warning("%s", warning)
            job_tokens = _job_tokens(state.attempts)
            superseded = settled.superseded
            part = ctx.part_uri(shard)
            # From the rows in memory, not the part read back: one table for the merge
            # stats' tokens and the shard's cost, the answers a repair replaced included.
            usage = token_usage([part], {part: superseded}, settled.frame, job_tokens)
            state.merge_stats = merge_shard_output(ctx, shard, settled, usage, job_tokens)
            price = ctx.cost_guard.price if ctx.cost_guard is not None else ctx.price
            if price is not None:
                # Each row at the price of how it was served (the job table priced the
                # on-demand tail at the batch price).
                state.merge_stats[COST_USD] = price_usage(usage, price)["total_usd"]
            del settled  # let go of it with the turn
        state.merge_stats["held_back"] = held
        state.merge_stats[HELD_BACK_USD] = held_usd
        state.merge_stats[SUPERSEDED] = superseded
        state.part_uri = ctx.part_uri(shard)
        state.paid_usd, state.paid_attempts = None, 0  # the merge has priced every attempt
        ctx.store.save(shard.name)
        if ctx.cost_guard is not None:
            ctx.cost_guard.settle(shard.name, state.merge_stats.get(COST_USD))
        ctx.progress.update(shard.name, shard.records)
        ctx.changed()
        # The latest batch job: an on-demand tail after it has no ARN of its own.
        job = next((a for a in reversed(state.attempts) if a.job_arn), None)
        events.emit_job_merged(
            ctx.run_name,
            job.job_arn if job else None,
            shard.name,
            ctx.model_id,
            state.merge_stats,
            state.part_uri,
        )
    first, last = state.attempts[0], state.current
    return ShardResult(
        shard=shard.name,
        records=shard.records,
        job_arn=first.job_arn,
        status=first.status,
        part_uri=state.part_uri,
        stats=state.merge_stats or {},
        attempts=len(state.attempts),
        submitted_at=first.submitted_at,
        ended_at=last.ended_at,
        held_back=(state.merge_stats or {}).get("held_back", 0),
        held_back_usd=(state.merge_stats or {}).get(HELD_BACK_USD),
    )
