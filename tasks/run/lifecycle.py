"""Run-level tasks of the batch flow: resolve the run, prepare its shards, open the gate, finish."""

from __future__ import annotations

import json
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prompt_templates import output_schema_for
from tasks.aws import storage
from tasks.aws.clients import polars_storage_options, use_credentials_block
from tasks.aws.submit import jobs_named_for, run_key_of
from tasks.errors import PlanError, RunIdentityError
from tasks.monitoring import events
from tasks.pipeline.columns import RECORD_ID
from tasks.pipeline.merge import merge_skipped
from tasks.pipeline.plan import RunPlan
from tasks.pipeline.preprocess import preprocess_params
from tasks.pipeline.summary import check_output, summary_artifacts
from tasks.run import gate
from tasks.run.artifacts import COST_USD
from tasks.run.cost import COST_CEILING_REACHED, save_estimate
from tasks.run.failpoints import failpoint
from tasks.run.identity import (
    RunIdentity,
    check_identity,
    fingerprint_digest,
    fingerprint_of,
    has_run_files,
    missing_identity_message,
    name_digest,
    read_identity,
)
from tasks.run.layout import (
    OUTPUT_DIR,
    OWNER_FILE,
    PARQUET,
    PLAN_FILE,
    ROWS_DIR,
    SKIPPED_FILE,
    RunLayout,
    expand_run_name,
    replaced_stamp,
    resolve_layout,
    resolve_role_arn,
)
from tasks.run.owner import RunClaim, claim_run
from tasks.run.state import RunStateStore, ShardState, now_iso
from tasks.run.stop import stop_run_jobs
from tasks.settings import get_settings

if TYPE_CHECKING:
    from tasks.run.params import BatchParams
    from tasks.run.shard import RunContext, ShardResult


def default_run_name(params: BatchParams, fingerprint: dict[str, Any]) -> str:
    """A name that follows the run's identity: the same inputs resume, changed inputs are new
    (the same local file named another way is the same input: `name_digest`)."""
    return expand_run_name(_named(params, name_digest(fingerprint)))


def _named(params: BatchParams, digest: str) -> str:
    label = re.sub(r"[^a-zA-Z0-9]+", "-", params.prompt_id or "embed").strip("-")[:40]
    return f"{label}-{digest[:10]}"


def _default_layout(params: BatchParams, fingerprint: dict[str, Any]) -> RunLayout:
    """The layout of the default run name, or of the name an earlier version gave the run.

    Before `name_digest`, a local source's name followed its path as typed; a run begun then
    and resumed now keeps its folder instead of starting again and paying twice.
    """
    layout = resolve_layout(
        params.output_uri, default_run_name(params, fingerprint), params.kms_key_id
    )
    earlier = expand_run_name(_named(params, fingerprint_digest(fingerprint)))
    if earlier == layout.run_name or has_run_files(layout):
        return layout
    before = resolve_layout(params.output_uri, earlier, params.kms_key_id)
    return before if has_run_files(before) else layout


def name_for_events(params: BatchParams) -> str:
    """The run name for a failure event, computed again (best effort: the source may be gone)."""
    if params.run_name:
        return expand_run_name(params.run_name)
    return _default_layout(params, fingerprint_of(params)).run_name


@dataclass
class ResolvedRun:
    """A run's layout, role, identity, claim and state, and its summary if it finished."""

    layout: RunLayout
    role_arn: str
    store: RunStateStore
    finished_summary: dict[str, Any] | None
    identity: RunIdentity
    claim: RunClaim


def _move_aside(layout: RunLayout, logger) -> None:
    """``restart``: the old run's files go to a sibling folder, kept for reference.

    Its jobs still in flight are stopped first: nobody would merge their answers, they would
    be paid in full beside the new run's, and once the state is moved aside no `stop` finds
    them. The state records each stop, as `bedrock-batch stop` does.
    """
    stopped = stop_run_jobs(layout.run_dir, layout.run_name, "restart", layout.kms_key_id)
    if stopped:
        logger.warning(
            "restart: stopped %d jobs of the old run still in flight: %s",
            len(stopped),
            ", ".join(stopped),
        )
    aside = layout.aside(replaced_stamp())
    moved = storage.move_tree(layout.run_dir, aside.run_dir, keep=(OWNER_FILE,))
    if layout.job_prefix != layout.run_dir:
        moved += storage.move_tree(layout.job_prefix, aside.job_prefix)
    logger.warning("restart: moved %d files of run %s to %s", moved, layout.run_name, aside.run_dir)


@task(cache_policy=NO_CACHE)
def resolve_run(params: BatchParams, flow_run_id: Any = None) -> ResolvedRun:
    """Name the run, claim it, check it is the same run as before, and load its state.

    Nothing is uploaded or submitted here: a run held by a live process, or one created from
    different inputs, stops with a message before anything is spent.

    Args:
        params: the run's parameters.
        flow_run_id: the flow run claiming the run (named to a second process).

    Returns:
        The run's layout, role, identity, claim (release it at the end) and state.
    """
    logger = get_run_logger()
    # Every AWS client of this run comes from the named AwsCredentials block, if one is named.
    use_credentials_block(params.aws_credentials_block)
    if params.run_name:
        run_name = expand_run_name(params.run_name)
        layout = resolve_layout(params.output_uri, run_name, params.kms_key_id)
        earlier = read_identity(layout)  # its file hashes spare re-reading unchanged files
        fingerprint = fingerprint_of(params, earlier.fingerprint if earlier else None)
    else:
        fingerprint = fingerprint_of(params)
        layout = _default_layout(params, fingerprint)
        run_name = layout.run_name
    role_arn = resolve_role_arn(params.role_arn)
    claim = claim_run(layout, flow_run_id, logger)
    try:
        current = RunIdentity(fingerprint, created_at=now_iso())
        recorded = read_identity(layout)
        if params.restart and (recorded is not None or has_run_files(layout)):
            _move_aside(layout, logger)
            recorded = None
        if recorded is None and has_run_files(layout):
            recorded = _recover_identity(layout, current, params.kms_key_id, logger)
        check_identity(layout, recorded, current)
        if recorded is None:
            storage.write_bytes(layout.identity_uri, current.to_json(), params.kms_key_id)
        identity = recorded or current
        store = RunStateStore(layout.run_dir, run_name, params.kms_key_id)
        for where in store.lost.values():
            logger.warning(
                "Run state %s is unreadable and left out: what it held is rebuilt (a shard "
                "starts again from its plan; its jobs are found by their names and adopted, "
                "not paid again)",
                where,
            )
        # Read before a lost part is forgotten, which forgets the run's end too: the rows it
        # held back are still sent under a higher ceiling (the figure it named says so).
        ended = store.state.finished_at is not None and storage.exists(layout.summary_uri)
        _forget_missing_parts(store, layout, logger)
        finished = None
        if ended:
            finished = json.loads(storage.read_bytes(layout.summary_uri))
            sent = _send_what_was_held(store, finished, params.max_cost_usd, logger)
            if sent or not store.state.finished_at:
                finished = None
    except BaseException:
        claim.release()
        raise
    return ResolvedRun(layout, role_arn, store, finished, identity, claim)


def _recover_identity(
    layout: RunLayout, current: RunIdentity, kms_key_id: str | None, logger
) -> RunIdentity:
    """run.json made again when plan and state prove the run, else RunIdentityError.

    The plan keeps the digest of the inputs it was made from, and each attempt is recorded
    with its job's name and token before the job is created: with every job Bedrock has under
    the run's names in the state, the lost run_id is needed for no job. The run key those
    names carry is kept in the new run.json, so later attempts and the gate follow them.
    """

    def refuse(reason: str) -> RunIdentityError:
        return RunIdentityError(missing_identity_message(layout, reason))

    try:
        plan = RunPlan.from_json(storage.read_bytes(layout.plan_uri).decode())
    except Exception:  # gone or unreadable: the same answer, nothing proves the inputs
        plan = None
    if plan is None or plan.identity != current.digest:
        raise refuse(f"{layout.plan_uri} is missing or was made from other inputs than these")
    store = RunStateStore(layout.run_dir, layout.run_name, kms_key_id)
    if store.lost:
        raise refuse(f"the run's state {', '.join(store.lost.values())} is unreadable")
    recorded = {a.job_name for s in store.state.shards.values() for a in s.attempts}
    keys = {run_key_of(name) for name in recorded}
    if len(keys) > 1 or None in keys:
        raise refuse(f"its state's jobs carry several run keys ({', '.join(map(str, keys))})")
    key = next(iter(keys), None)
    unknown = [
        name
        for name in jobs_named_for(layout.run_name)
        if name not in recorded and (key is None or run_key_of(name) == key)
    ]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise refuse(f"Bedrock has jobs of this run that its state does not record ({shown})")
    identity = RunIdentity(current.fingerprint, created_at=now_iso(), run_key=key)
    storage.write_bytes(layout.identity_uri, identity.to_json(), kms_key_id)
    logger.warning(
        "%s was missing; made again from %s and the state, which prove the run (its jobs keep "
        "their names and are not paid again)",
        layout.identity_uri,
        layout.plan_uri,
    )
    return identity


def _forget_missing_parts(store: RunStateStore, layout: RunLayout, logger) -> None:
    """A shard recorded as merged whose part is gone is merged again from its jobs' outputs.

    Without this a deleted part (a cleanup, a sync tool) was never written again, and a
    finished run was reported finished with that shard's rows missing from its output.
    """
    present = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(layout.output_dir, PARQUET)}
    gone = [
        shard
        for shard in store.state.shards.values()
        if shard.part_uri is not None and shard.part_uri.rsplit("/", 1)[-1] not in present
    ]
    for shard in gone:
        logger.warning(
            "The merged part %s of %s is missing; it is merged again from its jobs' outputs",
            shard.part_uri,
            shard.name,
        )
    _merge_again(store, gone)


def _merge_again(store: RunStateStore, shards: list[ShardState]) -> None:
    """Forget the merge of ``shards`` and the run's end: both are done again.

    Written at once: a re-run killed before it merged them left state.json saying finished,
    and the next re-run returned the old summary with their parts still missing (the shards
    no longer listed as merged, so not found again).
    """
    for shard in shards:
        if shard.merge_stats is not None:  # not forgotten already (a lost part, then held)
            # Its attempts that ended (all but a held one) cost what the merge said.
            shard.paid_usd = shard.merge_stats.get(COST_USD)
            shard.paid_attempts = sum(a.status != COST_CEILING_REACHED for a in shard.attempts)
        shard.part_uri, shard.merge_stats = None, None
        store.save(shard.name)
    if shards and store.state.finished_at:
        store.state.finished_at = None
        store.save()


def _send_what_was_held(
    store: RunStateStore, summary: dict[str, Any], ceiling: float | None, logger
) -> bool:
    """A finished run re-run with a higher max_cost_usd (or none) sends what it held back.

    Only the attempts the ceiling held are sent, decided again by the new ceiling; every
    answer the run has is kept. Without this the re-run returned the old summary, and the
    way left to finish the held rows, `restart`, paid for every answered record again.
    """
    cost = summary.get("cost") or {}
    old = cost.get("max_cost_usd")
    if not cost.get("held_back_rows") or old is None or (ceiling is not None and ceiling <= old):
        return False
    held = [
        shard
        for shard in store.state.shards.values()
        if shard.current is not None and shard.current.status == COST_CEILING_REACHED
    ]
    if not held:
        return False
    logger.warning(
        "Run %s finished with %s rows of %d shards held back by max_cost_usd=%s; with "
        "max_cost_usd=%s they are sent now (answered rows are kept, not paid again)",
        store.state.run_name,
        f"{cost['held_back_rows']:,}",
        len(held),
        old,
        ceiling,
    )
    _merge_again(store, held)
    return True


def release_run(run: ResolvedRun) -> None:
    """Give up the run's claim (the end of the flow, whatever happened)."""
    run.claim.release()


@task(cache_policy=NO_CACHE)
def prepare_run(params: BatchParams, run: ResolvedRun) -> RunPlan:
    """Preprocess into shards, or reuse the plan this run wrote; put inputs on S3.

    Args:
        params: the run's parameters.
        run: the resolved run (where its files go, and its identity).

    Returns:
        The plan: one shard per Bedrock job.
    """
    logger = get_run_logger()
    layout = run.layout
    if storage.exists(layout.plan_uri):
        plan = RunPlan.from_json(storage.read_bytes(layout.plan_uri).decode())
        if plan.identity == run.identity.digest:
            logger.info(
                "Resuming run %s: plan of %d shards found", layout.run_name, len(plan.shards)
            )
            local = None if storage.is_s3(layout.run_dir) else Path(layout.run_dir)
            _check_inputs(plan, layout, local)
            _check_rows(params, plan, layout, logger)
            return plan
        # A plan without the run's identity was left by a preprocess that did not finish.
    with storage.local_dir_for(layout.run_dir) as out_dir:
        plan = preprocess_params(params, out_dir)
        # Before the plan is sealed: a local run folder's sealed plan is what a resume trusts,
        # and a crash between the two left the skipped rows out of the output for good.
        if plan.skipped_file:
            _write_skipped_part(plan, out_dir, params)
        plan = _seal(plan, out_dir, run.identity)
        save_estimate(plan, out_dir, layout, params.kms_key_id)
        failpoint("preprocess")
        _upload_inputs(plan, out_dir, layout)
        failpoint("inputs-uploaded")
        if storage.is_s3(layout.run_dir):
            _upload_run_files(plan, out_dir, layout)
    logger.info(
        "Planned %d records in %s (%d rows skipped)",
        plan.total_records,
        plan.jobs_phrase(),
        plan.skipped_records,
    )
    return plan


def _seal(plan: RunPlan, out_dir: Path, identity: RunIdentity) -> RunPlan:
    """The plan with each shard's input digest and the run's identity, saved again."""
    plan.shards = [
        replace(s, sha256=storage.sha256_file(out_dir / s.input_file)) for s in plan.shards
    ]
    plan.identity = identity.digest
    plan.save(out_dir)
    return plan


def _upload_inputs(plan: RunPlan, out_dir: Path, layout: RunLayout) -> None:
    """The JSONL shards go where Bedrock reads them; one already there is kept only if equal."""
    for shard in plan.shards:
        uri = layout.job_file(shard.input_file)
        if storage.digest_of(uri) != shard.sha256:
            storage.upload_file(out_dir / shard.input_file, uri, layout.kms_key_id, shard.sha256)


def _check_inputs(plan: RunPlan, layout: RunLayout, local: Path | None) -> None:
    """Before a resume reuses them, every shard on S3 must be the one the plan digested."""
    for shard in plan.shards:
        uri = layout.job_file(shard.input_file)
        found = storage.digest_of(uri)
        if found == shard.sha256:
            continue
        copy = local / shard.input_file if local else None
        if copy and copy.is_file() and storage.sha256_file(copy) == shard.sha256:
            # A crash came between writing the shards and putting them on S3.
            storage.upload_file(copy, uri, layout.kms_key_id, shard.sha256)
            continue
        msg = (
            f"The input {uri} of {shard.name} is not the file this run planned (sha256 "
            f"{found or 'missing'}, planned {shard.sha256}); nothing was submitted. Another "
            "run may share this location: use a new run_name, or restart=True to start again."
        )
        raise PlanError(msg)


def _check_rows(params: BatchParams, plan: RunPlan, layout: RunLayout, logger) -> None:
    """Every shard's rows file holds that shard's records, or is rebuilt before any job.

    The merge reads them once the jobs ran: a deleted one stopped it ("No such file") after
    the jobs were paid, and one replaced by another shard's made jobs of 0 records, then
    "100 duplicated". A shard's rows are the shard's slice of the source's preprocess: made
    again, they are used only when their input lines are byte for byte the ones the plan
    digested (and so the ones the jobs read), else the run stops naming the file.
    """
    damaged = _damaged_rows(plan, layout)
    if not damaged:
        return
    uris = ", ".join(layout.run_file(name) for name in damaged)
    logger.warning(
        "Rows files %s are missing or hold other rows than their shard's; they are made again "
        "from the source, which the run's fingerprint and the plan's digests still match",
        uris,
    )
    with tempfile.TemporaryDirectory(prefix="bedrock-batch-rows-") as tmp:
        out_dir = Path(tmp)
        rebuilt = preprocess_params(params, out_dir)
        if not _same_inputs(plan, rebuilt, out_dir):
            msg = (
                f"{uris} of run {layout.run_name!r} are missing or hold other rows, and the "
                "source no longer gives the records this run sent (the input lines made from "
                "it again differ from the plan's sha256), so they cannot be rebuilt; nothing "
                "was sent: put the file back (a copy, S3 versioning) and run again, or pass "
                "restart=True (`--restart`) to start the run again and pay for it again."
            )
            raise PlanError(msg)
        for name in damaged:
            storage.upload_file(out_dir / name, layout.run_file(name), layout.kms_key_id)


def _damaged_rows(plan: RunPlan, layout: RunLayout) -> list[str]:
    """The plan's rows files (relative names) that are gone, unreadable or not their shard's."""
    present = set(storage.list_files(layout.rows_dir, PARQUET))
    damaged, skipped = [], None
    if plan.skipped_file:
        skipped = _record_ids(layout.run_file(plan.skipped_file), present)
        if skipped is None:
            damaged.append(plan.skipped_file)
    # Without the skipped rows' ids a shard's ids are unknown; its count still tells.
    known = skipped is not None or not plan.skipped_file
    # One read a shard, side by side: on S3 each is a request of tens of ms, and a resume of
    # thousands of shards read one after another waited minutes before its first job.
    uris = [layout.run_file(shard.rows_file) for shard in plan.shards]
    with ThreadPoolExecutor(max_workers=16) as pool:
        found_ids = pool.map(lambda uri: _record_ids(uri, present), uris)
        for shard, ids, found in zip(plan.shards, plan.shard_ids(skipped), found_ids, strict=True):
            if found is None or (not found.equals(ids) if known else found.len() != shard.records):
                damaged.append(shard.rows_file)
    return damaged


def _record_ids(uri: str, present: set[str]) -> pl.Series | None:
    """The record ids of a rows file, or None when it is gone or unreadable."""
    if uri not in present:
        return None
    options = polars_storage_options() if storage.is_s3(uri) else None
    try:
        scan = pl.scan_parquet(uri, storage_options=options)
        return scan.select(pl.col(RECORD_ID).cast(pl.String)).collect().to_series()
    except (OSError, pl.exceptions.PolarsError):
        return None


def _same_inputs(plan: RunPlan, rebuilt: RunPlan, out_dir: Path) -> bool:
    """Whether a preprocess made again gave the planned shards: each input line the same."""
    if len(rebuilt.shards) != len(plan.shards) or rebuilt.skipped_records != plan.skipped_records:
        return False
    return all(
        (mine.name, mine.records, storage.sha256_file(out_dir / mine.input_file))
        == (planned.name, planned.records, planned.sha256)
        for mine, planned in zip(rebuilt.shards, plan.shards, strict=True)
    )


def _write_skipped_part(plan: RunPlan, out_dir: Path, params: BatchParams) -> None:
    """Rows skipped by on_missing="skip" go straight to the output, with their error."""
    merge_skipped(
        out_dir / plan.skipped_file,
        params.model_id,
        params.invocation_type,
        out_dir / OUTPUT_DIR / SKIPPED_FILE,
        output_schema_for(params.prompt_id),
        plan.options,
    )


def _upload_run_files(plan: RunPlan, out_dir: Path, layout: RunLayout) -> None:
    """Rows and plan to an S3 run folder; the plan last, as the mark that all else is there."""
    for folder, dest in ((ROWS_DIR, layout.rows_dir), (OUTPUT_DIR, layout.output_dir)):
        for path in sorted((out_dir / folder).glob(f"*{PARQUET}")):
            storage.upload_file(path, storage.join(dest, path.name), layout.kms_key_id)
    storage.upload_file(out_dir / PLAN_FILE, layout.plan_uri, layout.kms_key_id)


@task
def open_gate(
    model_id: str,
    max_concurrent_jobs: int,
    gate_run: str,
    new_shards: int = 0,
    flow_run_id: UUID | None = None,
) -> str:
    """Open the model's gate (the account's job quota) and size the run's own to its cap.

    ``gate_run``: the run as its gate knows it (`gate.gate_run`, its name and key).

    ``new_shards``: shards of a run with no job yet, whose first wave takes its slots here,
    while the Prefect server is still quiet (`gate.take_ahead`).
    """
    logger = get_run_logger()
    name, quota, run_gate = gate.ensure_gates(model_id, gate_run, max_concurrent_jobs)
    gate.abandon_waiters(model_id, gate_run, abandoned=False)  # interrupted before, here
    in_use = gate.active_slots(name)
    ahead = gate.take_ahead(
        model_id,
        gate_run,
        min(new_shards, max_concurrent_jobs),
        get_settings().poll.lease_seconds,
        flow_run_id,
        logger,
    )
    logger.info(
        "Gate %s allows %d jobs of the model in flight (%d taken before this run); %s allows %d "
        "of this run; %d slots taken for its first shards",
        name,
        quota,
        in_use,
        run_gate,
        max_concurrent_jobs,
        ahead,
    )
    return name


@task(cache_policy=NO_CACHE)
def finish_run(ctx: RunContext, plan: RunPlan, results: list[ShardResult]) -> dict[str, Any]:
    """Check every input row is in the output once, write the artifacts, tell automations.

    Args:
        ctx: the run.
        plan: its shards.
        results: what each shard ended with.

    Returns:
        The summary: output location, parts, counts and tokens.
    """
    failpoint("finish")
    check = check_output(ctx.layout, plan)
    ctx.progress.complete()  # every record is in the output: the bar ends at 100 %
    if ctx.board is not None:
        ctx.board.close()
    summary = summary_artifacts(ctx, plan, results, check)
    summary_json = json.dumps(summary, indent=1).encode()
    storage.write_bytes(ctx.layout.summary_uri, summary_json, ctx.kms_key_id)
    ctx.store.state.finished_at = now_iso()
    ctx.store.save()
    events.emit_run_finished(
        ctx.run_name,
        ctx.model_id,
        summary["counts"],
        summary["tokens"],
        summary["output_uri"],
        cost=summary.get("cost"),
    )
    return summary
