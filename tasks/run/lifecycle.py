"""Run-level tasks of the batch flow: resolve the run, prepare its shards, open the gate, finish."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.aws import storage
from tasks.monitoring import events
from tasks.pipeline.merge import merge_skipped
from tasks.pipeline.plan import OUTPUT_DIR, PLAN_FILE, SKIPPED_FILE, RunPlan
from tasks.pipeline.preprocess import preprocess
from tasks.pipeline.summary import check_output, summary_artifacts
from tasks.run import gate
from tasks.run.failpoints import failpoint
from tasks.run.layout import RunLayout, expand_run_name, resolve_layout, resolve_role_arn
from tasks.run.state import RunStateStore, now_iso

if TYPE_CHECKING:
    from tasks.run.params import BatchParams
    from tasks.run.shard import RunContext, ShardResult

SUMMARY_FILE = "summary.json"


def default_run_name(params: BatchParams) -> str:
    """A name that is the same for the same inputs, so re-running resumes instead of re-paying."""
    key = json.dumps(
        [
            params.source,
            params.prompt_id,
            params.text_column,
            params.model_id,
            params.invocation_type,
            params.inference.as_dict(),
        ],
        sort_keys=True,
    )
    label = re.sub(r"[^a-zA-Z0-9]+", "-", params.prompt_id or "embed").strip("-")[:40]
    return f"{label}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def preprocess_params(
    params: BatchParams, out_dir: Path, on_shard: Callable[[int, int], None] | None = None
) -> RunPlan:
    """Preprocess with a run's parameters into a local folder (the flow and the dry run)."""
    return preprocess(
        params.source,
        model_id=params.model_id,
        out_dir=out_dir,
        prompt_id=params.prompt_id,
        text_column=params.text_column,
        id_column=params.id_column,
        invocation_type=params.invocation_type,
        inference_overrides=params.inference.as_dict(),
        on_missing=params.on_missing,
        max_records_per_job=params.max_records_per_job,
        max_concurrent_jobs=params.max_concurrent_jobs,
        on_shard=on_shard,
    )


@dataclass
class ResolvedRun:
    """A run's layout, role and state, and its summary if it already finished."""

    layout: RunLayout
    role_arn: str
    store: RunStateStore
    finished_summary: dict[str, Any] | None


@task(cache_policy=NO_CACHE)
def resolve_run(params: BatchParams, run_name: str) -> ResolvedRun:
    """Check the output location, staging bucket and role, and load any earlier state."""
    run_name = expand_run_name(run_name)
    layout = resolve_layout(params.output_uri, run_name, params.kms_key_id)
    role_arn = resolve_role_arn(params.role_arn)
    store = RunStateStore(layout.run_dir, run_name, params.kms_key_id)
    finished = None
    summary_uri = storage.join(layout.run_dir, SUMMARY_FILE)
    if store.state.finished_at and storage.exists(summary_uri):
        finished = json.loads(storage.read_bytes(summary_uri))
    return ResolvedRun(layout, role_arn, store, finished)


@task(cache_policy=NO_CACHE)
def prepare_run(params: BatchParams, layout: RunLayout) -> RunPlan:
    """Preprocess into shards, or reuse the plan an earlier attempt wrote; put inputs on S3.

    Args:
        params: the run's parameters.
        layout: where its files go.

    Returns:
        The plan: one shard per Bedrock job.
    """
    logger = get_run_logger()
    plan_uri = storage.join(layout.run_dir, PLAN_FILE)
    if storage.exists(plan_uri):
        plan = RunPlan.from_json(storage.read_bytes(plan_uri).decode())
        logger.info("Resuming run %s: plan of %d shards found", layout.run_name, len(plan.shards))
        if not storage.is_s3(layout.run_dir):
            # A crash may have come between writing the shards and putting them on S3.
            _upload_inputs(plan, Path(layout.run_dir), layout)
        return plan
    with storage.local_dir_for(layout.run_dir) as out_dir:
        plan = preprocess_params(params, out_dir)
        failpoint("preprocess")
        _upload_inputs(plan, out_dir, layout)
        if plan.skipped_file:
            _write_skipped_part(plan, out_dir, params)
        if storage.is_s3(layout.run_dir):
            _upload_run_files(plan, out_dir, layout)
    logger.info(
        "Planned %d records in %d jobs (%d rows skipped)",
        plan.total_records,
        len(plan.shards),
        plan.skipped_records,
    )
    return plan


def _upload_inputs(plan: RunPlan, out_dir: Path, layout: RunLayout) -> None:
    """The JSONL shards go where Bedrock reads them (those already there are kept)."""
    for shard in plan.shards:
        uri = storage.join(layout.job_prefix, shard.input_file)
        if not storage.exists(uri):
            storage.upload_file(out_dir / shard.input_file, uri, layout.kms_key_id)


def _write_skipped_part(plan: RunPlan, out_dir: Path, params: BatchParams) -> None:
    """Rows skipped by on_missing="skip" go straight to the output, with their error."""
    merge_skipped(
        out_dir / plan.skipped_file,
        params.model_id,
        params.invocation_type,
        out_dir / OUTPUT_DIR / SKIPPED_FILE,
    )


def _upload_run_files(plan: RunPlan, out_dir: Path, layout: RunLayout) -> None:
    """Rows and plan to an S3 run folder; the plan last, as the mark that all else is there."""
    for folder in ("rows", OUTPUT_DIR):
        for path in sorted((out_dir / folder).glob("*.parquet")):
            uri = storage.join(layout.run_dir, folder, path.name)
            storage.upload_file(path, uri, layout.kms_key_id)
    plan_uri = storage.join(layout.run_dir, PLAN_FILE)
    storage.upload_file(out_dir / PLAN_FILE, plan_uri, layout.kms_key_id)


@task
def open_gate(model_id: str, max_concurrent_jobs: int, run_name: str) -> str:
    """Open the model's gate (the account's job quota) and size the run's own to its cap."""
    name, quota, run_gate = gate.ensure_gates(model_id, run_name, max_concurrent_jobs)
    get_run_logger().info(
        "Gate %s allows %d jobs of the model in flight (%d taken now); %s allows %d of this run",
        name,
        quota,
        gate.active_slots(name),
        run_gate,
        max_concurrent_jobs,
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
    check = check_output(ctx.run_dir, plan)
    summary = summary_artifacts(ctx, plan, results, check)
    summary_json = json.dumps(summary, indent=1).encode()
    storage.write_bytes(storage.join(ctx.run_dir, SUMMARY_FILE), summary_json, ctx.kms_key_id)
    ctx.store.state.finished_at = now_iso()
    ctx.store.save()
    events.emit_run_finished(
        ctx.run_name, ctx.model_id, summary["counts"], summary["tokens"], summary["output_uri"]
    )
    return summary
