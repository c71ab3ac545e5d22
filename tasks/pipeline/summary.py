"""The end of a run: the exactly-once check over all parts, and the summary artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl
from prefect.artifacts import create_markdown_artifact

from tasks.aws import storage
from tasks.aws.clients import polars_storage_options
from tasks.bedrock.jobs import job_id_from_arn
from tasks.errors import IncompleteOutputError
from tasks.pipeline.columns import (
    ERROR_CODE,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    RECORD_ID,
    UNPARSEABLE_OUTPUT,
)
from tasks.run.artifacts import absolute_location
from tasks.run.layout import PARQUET

if TYPE_CHECKING:
    from tasks.pipeline.plan import RunPlan
    from tasks.run.layout import RunLayout
    from tasks.run.shard import RunContext, ShardResult

SHOWN_IDS = 20


def _scan(uris: list[str]) -> pl.LazyFrame:
    options = polars_storage_options() if uris and storage.is_s3(uris[0]) else None
    return pl.scan_parquet(uris, storage_options=options, missing_columns="insert")


def check_output(layout: RunLayout, plan: RunPlan) -> dict[str, Any]:
    """Every input record id exactly once in the output, or IncompleteOutputError naming ids."""
    run_dir = layout.run_dir
    inputs = storage.list_files(layout.rows_dir, PARQUET)
    parts = storage.list_files(layout.output_dir, PARQUET)
    expected = _scan(inputs).select(RECORD_ID)
    if not parts:
        msg = f"No output parts under {layout.output_dir}; nothing was merged."
        raise IncompleteOutputError(msg)
    out = _scan(parts)
    names = out.collect_schema().names()
    got = out.select(
        RECORD_ID,
        pl.col(ERROR_CODE) if ERROR_CODE in names else pl.lit(None, pl.String).alias(ERROR_CODE),
        *(pl.col(c) for c in (INPUT_TOKENS, OUTPUT_TOKENS) if c in names),
    ).collect()
    dup = got.group_by(RECORD_ID).len().filter(pl.col("len") > 1).get_column(RECORD_ID)
    expected_ids = expected.collect()
    missing = expected_ids.join(got, on=RECORD_ID, how="anti").get_column(RECORD_ID)
    extra = got.join(expected_ids, on=RECORD_ID, how="anti").get_column(RECORD_ID)
    if len(dup) or len(missing) or len(extra):
        msg = (
            f"The output of {run_dir} does not hold every input record exactly once: "
            f"{len(missing)} missing {missing.head(SHOWN_IDS).to_list()}, "
            f"{len(dup)} duplicated {dup.head(SHOWN_IDS).to_list()}, "
            f"{len(extra)} unexpected {extra.head(SHOWN_IDS).to_list()}."
        )
        raise IncompleteOutputError(msg)
    failed = got.get_column(ERROR_CODE).is_not_null().sum()
    unparseable = (got.get_column(ERROR_CODE) == UNPARSEABLE_OUTPUT).sum()
    return {
        "records": got.height,
        "succeeded": got.height - failed,
        "failed": int(failed),
        # Paid answers the family could not parse (counted in failed too; not retried).
        "unparseable": int(unparseable),
        "input_tokens": int(got[INPUT_TOKENS].sum() or 0) if INPUT_TOKENS in got.columns else 0,
        "output_tokens": int(got[OUTPUT_TOKENS].sum() or 0) if OUTPUT_TOKENS in got.columns else 0,
        "parts": parts,
    }


def summary_artifacts(
    ctx: RunContext, plan: RunPlan, results: list[ShardResult], check: dict[str, Any]
) -> dict[str, Any]:
    """A table of jobs and a markdown note of where the output is; returns the summary."""
    from tasks.run.cost import cost_markdown, cost_summary

    cost = cost_summary(ctx, results, check["parts"])
    part_cost = cost["parts"]
    rows = [
        {
            "shard": r.shard,
            "job": job_id_from_arn(r.job_arn or ""),
            "status": r.status,
            "records": r.records,
            "ok": r.stats.get("succeeded", 0),
            "failed": r.stats.get("failed", 0),
            "input_tokens": r.stats.get("input_tokens", 0),
            "output_tokens": r.stats.get("output_tokens", 0),
            "attempts": r.attempts,
            "submitted": r.submitted_at,
            "ended": r.ended_at,
            "duration_s": _seconds_between(r.submitted_at, r.ended_at),
            **_shard_cost(part_cost.get(r.part_uri.rsplit("/", 1)[-1]), r.held_back),
        }
        for r in results
    ]
    # The job table itself is the run's live one (tasks.run.artifacts), final at this point.
    output_dir = ctx.layout.output_dir
    markdown = "\n".join(
        [
            f"# Run `{ctx.run_name}`",
            "",
            f"- Output: `{absolute_location(output_dir)}/` ({len(check['parts'])} Parquet files)",
            f"- Model: `{ctx.model_id}` ({ctx.invocation_type})",
            f"- Records: {check['records']:,} — ok {check['succeeded']:,},"
            f" failed {check['failed']:,} (unparseable outputs: {check.get('unparseable', 0):,};"
            f" skipped before submit: {plan.skipped_records:,})",
            f"- Tokens: {check['input_tokens']:,} in, {check['output_tokens']:,} out",
            cost_markdown(cost),
            "- Every input record is in the output exactly once (checked).",
        ]
    )
    create_markdown_artifact(markdown, key=_key(ctx.run_name, "output"), description="Output")
    return {
        "run_name": ctx.run_name,
        "output_uri": output_dir,
        "parts": check["parts"],
        "counts": {k: check.get(k, 0) for k in ("records", "succeeded", "failed", "unparseable")},
        "tokens": {"input": check["input_tokens"], "output": check["output_tokens"]},
        "jobs": rows,
        "cost": cost,
        # What following the run cost us: state objects written, Bedrock polls made.
        "overhead": {
            "state_writes": ctx.store.writes,
            "state_bytes_written": ctx.store.bytes_written,
            "bedrock_polls": dict(ctx.watcher.calls),
            "events": ctx.watcher.events_active,
        },
    }


def _shard_cost(part: dict[str, Any] | None, held_back: int) -> dict[str, Any]:
    """The job table's cost columns: batch and on demand apart, and rows the ceiling held."""
    part = part or {}
    return {
        "batch_usd": part.get("batch_usd"),
        "on_demand_usd": part.get("on_demand_usd"),
        "held_back": held_back,
    }


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return round(delta.total_seconds(), 1)


def _key(run_name: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    safe = "".join(c if c.isalnum() else "-" for c in run_name.lower())
    return f"bedrock-batch-{safe}-{what}"[:100].strip("-")
