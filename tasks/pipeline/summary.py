"""The end of a run: the exactly-once check over all parts, and the summary artifacts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl
from prefect.artifacts import create_markdown_artifact

from tasks.aws import storage
from tasks.aws.clients import polars_storage_options
from tasks.bedrock.jobs import job_id_from_arn
from tasks.errors import IncompleteOutputError
from tasks.pipeline import tokens
from tasks.pipeline.columns import (
    CONTENT_FILTERED,
    ERROR_CODE,
    INPUT_TOKENS,
    JOB_ID,
    OUTPUT_TOKENS,
    RECORD_ID,
    SERVED_BY,
    UNPARSEABLE_OUTPUT,
)
from tasks.pipeline.tokens import fmt_tokens
from tasks.run.artifacts import absolute_location
from tasks.run.layout import PARQUET

if TYPE_CHECKING:
    from tasks.pipeline.plan import RunPlan
    from tasks.run.layout import RunLayout
    from tasks.run.shard import RunContext, ShardResult

SHOWN_IDS = 20


def check_output(layout: RunLayout, plan: RunPlan) -> dict[str, Any]:
    """Every input record id exactly once in the output, or IncompleteOutputError naming ids.

    Read back from storage, each rows file against its own part (`rows/shard-N` with
    `output/part-N`, `rows/skipped` with `output/skipped`), so a record in another shard's
    part is caught too. Shards are read in batches of about CHECK_RECORDS_AT_ONCE records
    (CHECK_SHARDS_AT_ONCE shards at most): a 100M-row run is checked in the memory of a few
    shards, not of 100M ids at once, and small shards still share a scan.

    The same reading collects the parts' token usage (`tokens.tally` by `tokens.BY_PART`),
    one row a job and part a batch, which the run's cost is priced from: the parts are read
    once at the run's end.
    """
    inputs = storage.list_files(layout.rows_dir, PARQUET)
    parts = storage.list_files(layout.output_dir, PARQUET)
    # The plan, not the listing, says which shards there are: a shard whose rows file and
    # part were both deleted left no file to pair, and the run passed without its records.
    gone = _planned_rows_gone(layout, plan, set(inputs))
    if not parts:
        msg = f"No output parts under {layout.output_dir}; nothing was merged."
        raise IncompleteOutputError(msg)
    pairs: dict[str, tuple[list[str], list[str]]] = {}
    for uris, side in ((inputs, 0), (parts, 1)):
        for uri in uris:
            pairs.setdefault(_shard_key(uri), ([], []))[side].append(uri)
    largest = max([s.records for s in plan.shards] + [plan.skipped_records, 1])
    per_batch = min(max(CHECK_RECORDS_AT_ONCE // largest, 1), CHECK_SHARDS_AT_ONCE)
    keys = sorted(pairs)
    found = _Found()
    for first in range(0, len(keys), per_batch):
        batch = {key: pairs[key] for key in keys[first : first + per_batch]}
        found.add(_check_batch(batch))
    if found.missing or found.duplicated or found.unexpected or gone:
        msg = (
            f"The output of {layout.run_dir} does not hold every input record exactly once: "
            f"{found.missing} missing {found.shown['missing']}, "
            f"{found.duplicated} duplicated {found.shown['duplicated']}, "
            f"{found.unexpected} unexpected {found.shown['unexpected']}."
        )
        if gone:
            msg += (
                f" The plan's rows files {', '.join(gone)} are gone, so their "
                f"{sum(gone.values())} records were not checked: run the same run again, "
                "which rebuilds them from the source before anything is sent."
            )
        raise IncompleteOutputError(msg)
    return {
        "records": found.records,
        "succeeded": found.records - found.failed,
        "failed": found.failed,
        # Paid answers the family could not parse (counted in failed too; not retried).
        "unparseable": found.unparseable,
        # Refusals and filtered answers (counted in failed too; not retried).
        "filtered": found.filtered,
        # By part, job and how it was served: rows, tokens, answered rows without counts. The
        # run's token totals come from it once resolved (`summary_artifacts`).
        "token_usage": found.usage(),
        "parts": parts,
    }


# Record ids the exactly-once check reads at a time: its peak was +250 MB at 5M and at 10M
# rows in 50k-row shards on S3 (+1.1 GB at 5M when it read every id at once). At most so many
# shards a scan, as each file's metadata and buffers count too: 2,000 shards of 100 records
# took +43 MB in scans of 256 shards, +107 MB in one scan, in the same 14.5 s.
CHECK_RECORDS_AT_ONCE = 500_000
CHECK_SHARDS_AT_ONCE = 256
_FILE, _SHARD = "__file", "__shard"


def _planned_rows_gone(layout: RunLayout, plan: RunPlan, present: set[str]) -> dict[str, int]:
    """The rows files the plan lists that are not in the run folder, with their records."""
    planned = [(s.rows_file, s.records) for s in plan.shards]
    if plan.skipped_file:
        planned.append((plan.skipped_file, plan.skipped_records))
    return {name: n for name, n in planned if layout.run_file(name) not in present}


def _shard_key(uri: str) -> str:
    """What pairs a rows file with its part: the shard number (`shard-00007`, `part-00007`),
    else the file's own stem (`skipped`; any other file stays alone and is reported)."""
    stem = uri.rsplit("/", 1)[-1].removesuffix(PARQUET)
    number = re.fullmatch(r"(?:shard|part)-(\d+)", stem)
    return f"{int(number[1]):09d}" if number else stem


@dataclass
class _Found:
    """What the exactly-once check found so far, summed over batches of shards."""

    records: int = 0
    failed: int = 0
    unparseable: int = 0
    filtered: int = 0
    usages: list[pl.DataFrame] = field(default_factory=list)  # `tokens.tally` frames
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0
    shown: dict[str, list[str]] = field(
        default_factory=lambda: {"missing": [], "duplicated": [], "unexpected": []}
    )

    def add(self, other: _Found) -> None:
        for name in ("records", "failed", "unparseable", "filtered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.usages.extend(other.usages)
        for name in ("missing", "duplicated", "unexpected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
            self.shown[name] = (self.shown[name] + other.shown[name])[:SHOWN_IDS]

    def usage(self) -> pl.DataFrame:
        """The usage over every batch (a part is read in one batch, so its rows are whole)."""
        return pl.concat(self.usages)


def _tagged(uris: list[str], shard_of: dict[str, str]) -> pl.LazyFrame:
    """The files as one scan, each row tagged with the shard its file belongs to."""
    keys = pl.DataFrame({_FILE: list(shard_of), _SHARD: list(shard_of.values())})
    scan = pl.scan_parquet(
        uris,
        storage_options=polars_storage_options() if storage.is_s3(uris[0]) else None,
        missing_columns="insert",
        # rows/skipped.parquet has error columns the shards' rows files lack: a scan that
        # met both failed every run with skipped rows at its last step.
        extra_columns="ignore",
        include_file_paths=_FILE,
    )
    return scan.join(keys.lazy(), on=_FILE, how="left")


# What the check reads of each output row besides its shard, id and part: its outcome, and
# what the cost is priced by (`tokens.tally` by `tokens.BY_PART`).
_READ = {
    ERROR_CODE: pl.String,
    JOB_ID: pl.String,
    SERVED_BY: pl.String,
    INPUT_TOKENS: pl.Int64,
    OUTPUT_TOKENS: pl.Int64,
}
# A part without the column: no error, job, served_by nor input count (unknown, as the cost
# takes it); 0 output tokens (an embedding family's parts have no such column).
_ABSENT = {OUTPUT_TOKENS: 0}


def _usage(got: pl.DataFrame) -> pl.DataFrame:
    """A batch's rows as a `tokens.tally` table by part, job and how they were served."""
    usage = tokens.tally(got.lazy(), tokens.BY_PART).collect()
    return usage.with_columns(pl.col(tokens.PART).cast(pl.String))


def _check_batch(batch: dict[str, tuple[list[str], list[str]]]) -> _Found:
    """Each shard's rows against its own part, for a batch of shards (either file may lack)."""
    shard_of = {uri: key for key, (rows, outs) in batch.items() for uri in (*rows, *outs)}
    rows = [uri for r, _ in batch.values() for uri in r]
    outs = [uri for _, o in batch.values() for uri in o]
    ids = pl.col(RECORD_ID).cast(pl.String)
    expected = pl.DataFrame(schema={_SHARD: pl.String, RECORD_ID: pl.String})
    if rows:
        expected = _tagged(rows, shard_of).select(_SHARD, ids).collect()
    got = pl.DataFrame(
        schema={_SHARD: pl.String, RECORD_ID: pl.String, **_READ, tokens.PART: pl.Categorical}
    )
    if outs:
        out = _tagged(outs, shard_of)
        names = out.collect_schema().names()
        # Null stays null: a row without a count is not a row of 0 tokens (`tokens.tally`).
        got = out.select(
            _SHARD,
            ids,
            *(
                (pl.col(c) if c in names else pl.lit(_ABSENT.get(c))).cast(dtype).alias(c)
                for c, dtype in _READ.items()
            ),
            # Categorical: a part's path once, not once a row.
            pl.col(_FILE).cast(pl.Categorical).alias(tokens.PART),
        ).collect()
    on = [_SHARD, RECORD_ID]
    dup = got.group_by(RECORD_ID).len().filter(pl.col("len") > 1).get_column(RECORD_ID).sort()
    missing = expected.join(got, on=on, how="anti").get_column(RECORD_ID)
    # In the part of another shard than its own, or in no rows file at all.
    extra = got.join(expected, on=on, how="anti").get_column(RECORD_ID)
    errors = got.get_column(ERROR_CODE)
    return _Found(
        records=got.height,
        failed=int(errors.is_not_null().sum()),
        unparseable=int((errors == UNPARSEABLE_OUTPUT).sum()),
        filtered=int((errors == CONTENT_FILTERED).sum()),
        usages=[_usage(got)],
        missing=len(missing),
        duplicated=len(dup),
        unexpected=len(extra),
        shown={
            "missing": missing.head(SHOWN_IDS).to_list(),
            "duplicated": dup.head(SHOWN_IDS).to_list(),
            "unexpected": extra.head(SHOWN_IDS).to_list(),
        },
    )


def summary_artifacts(
    ctx: RunContext, plan: RunPlan, results: list[ShardResult], check: dict[str, Any]
) -> dict[str, Any]:
    """A table of jobs and a markdown note of where the output is; returns the summary."""
    from tasks.run.cost import cost_markdown, cost_summary, run_usage

    # One table for the cost and the tokens: the check's rows, the paid answers a schema
    # repair replaced and the manifests of jobs whose rows carry no counts.
    usage = run_usage(check["token_usage"], check["parts"], results)
    cost = cost_summary(ctx, results, usage)
    tokens_in, tokens_out = tokens.totals(usage)
    part_cost = cost["parts"]
    rows = [
        {
            "shard": r.shard,
            "job": job_id_from_arn(r.job_arn or ""),
            "status": r.status,
            "records": r.records,
            "ok": r.stats.get("succeeded", 0),
            "failed": r.stats.get("failed", 0),
            "input_tokens": r.stats.get("input_tokens"),
            "output_tokens": r.stats.get("output_tokens"),
            "attempts": r.attempts,
            "stray_lines": r.stats.get("stray_lines", 0),
            "submitted": r.submitted_at,
            "ended": r.ended_at,
            "duration_s": _seconds_between(r.submitted_at, r.ended_at),
            **_shard_cost(part_cost.get(r.part_uri.rsplit("/", 1)[-1]), r.held_back),
        }
        for r in results
    ]
    # The job table itself is the run's live one (tasks.run.artifacts), final at this point.
    output_dir = ctx.layout.output_dir
    # Output lines that reached no row: each shard's log names how many and which ids.
    strays = {r.shard: r.stats.get("stray_lines", 0) for r in results}
    stray_total = sum(strays.values())
    stray_note = (
        [
            f"- Output lines that match no record of their shard: {stray_total:,}, ignored (in "
            + ", ".join(s for s, n in strays.items() if n)[:300]
            + "; see their logs)"
        ]
        if stray_total
        else []
    )
    markdown = "\n".join(
        [
            f"# Run `{ctx.run_name}`",
            "",
            f"- Output: `{absolute_location(output_dir)}/` ({len(check['parts'])} Parquet files)",
            f"- Model: `{ctx.model_id}` ({ctx.invocation_type})",
            f"- Records: {check['records']:,} — ok {check['succeeded']:,},"
            f" failed {check['failed']:,} (unparseable outputs: {check.get('unparseable', 0):,};"
            f" refused or filtered: {check.get('filtered', 0):,};"
            f" skipped before submit: {plan.skipped_records:,})",
            f"- Tokens: {fmt_tokens(tokens_in)} in, {fmt_tokens(tokens_out)} out",
            cost_markdown(cost),
            "- Every input record is in the output exactly once (checked).",
            *stray_note,
        ]
    )
    create_markdown_artifact(markdown, key=_key(ctx.run_name, "output"), description="Output")
    return {
        "run_name": ctx.run_name,
        "output_uri": output_dir,
        "parts": check["parts"],
        "counts": {k: check.get(k, 0) for k in ("records", "succeeded", "failed", "unparseable")},
        # None (null) where neither the rows nor their jobs' manifests give a count.
        "tokens": {"input": tokens_in, "output": tokens_out},
        "stray_output_lines": stray_total,
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
