"""An example downstream flow: summarise a finished run's Parquet output in a markdown artifact."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.aws.clients import polars_storage_options
from tasks.pipeline.columns import (
    ERROR_CODE,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    RESPONSE_TEXT,
    SERVED_BY,
)
from tasks.pipeline.tokens import uncounted_expr


def _parquet_glob(output_uri: str) -> str:
    return output_uri.rstrip("/") + "/**/*.parquet"


@task
def summarize_output(output_uri: str) -> dict[str, Any]:
    """Row, error and token counts of every Parquet part under `output_uri`.

    Args:
        output_uri: The run's output folder, local or s3://, as in `bedrock.batch.run.finished`.

    Returns:
        Counts and, for text outputs, the mean response length.
    """
    options = polars_storage_options() if output_uri.startswith("s3://") else None
    frame = pl.scan_parquet(_parquet_glob(output_uri), storage_options=options)
    names = frame.collect_schema().names()
    exprs = [pl.len().alias("rows")]
    if ERROR_CODE in names:
        exprs.append(pl.col(ERROR_CODE).is_not_null().sum().alias("errors"))
    exprs += _token_sums(names)
    if RESPONSE_TEXT in names:
        exprs.append(pl.col(RESPONSE_TEXT).str.len_chars().mean().alias("mean_response_chars"))
    stats = frame.select(exprs).collect().row(0, named=True)
    return {"output_uri": output_uri, "columns": names, **stats, **_served_by(frame, names)}


def _token_sums(names: list[str]) -> list[pl.Expr]:
    """Token sums of the rows; null (unknown) where answered rows carry no count (Cohere
    Embed): their sum of nulls read 0. The run's summary.json has them from the manifests."""
    unknown = uncounted_expr(names).any()
    return [
        pl.when(unknown).then(None).otherwise(pl.col(c).fill_null(0).sum()).alias(c)
        for c in (INPUT_TOKENS, OUTPUT_TOKENS)
        if c in names
    ]


def _served_by(frame: pl.LazyFrame, names: list[str]) -> dict[str, Any]:
    """Rows and tokens by how they were served: the on-demand tail costs the full price."""
    if SERVED_BY not in names:
        return {}
    by = frame.group_by(SERVED_BY).agg(pl.len().alias("rows"), *_token_sums(names)).collect()
    return {"served_by": {r.pop(SERVED_BY): r for r in by.sort(SERVED_BY).iter_rows(named=True)}}


def _run_summary(output_uri: str) -> dict[str, Any]:
    """The summary.json the batch run wrote beside its output folder ({} when none)."""
    from tasks.aws import storage

    uri = output_uri.rstrip("/").rsplit("/", 1)[0] + "/summary.json"
    try:
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    except (OSError, ValueError):
        return {}


@flow(name="summarize-run")
def summarize_run(output_uri: str, run_name: str | None = None) -> dict[str, Any]:
    """Summarise a finished batch run; started by the run-finished automation.

    Args:
        output_uri: Where the run's Parquet parts are (the event payload's `output_uri`).
        run_name: The run's name, for the artifact's title.

    Returns:
        The summary counts.
    """
    logger = get_run_logger()
    summary = summarize_output(output_uri)
    run = _run_summary(output_uri)
    cost = run.get("cost")
    run_tokens = run.get("tokens") or {}
    for column, key in ((INPUT_TOKENS, "input"), (OUTPUT_TOKENS, "output")):
        # The run's own figure: where rows carry no counts, their jobs' manifests give them.
        if column in summary and summary[column] is None and run_tokens.get(key) is not None:
            summary[column] = run_tokens[key]
    if cost:
        summary["cost_usd"] = {
            k: cost.get(k) for k in ("batch_usd", "on_demand_usd", "total_usd", "held_back_rows")
        }
    logger.info("Run %s: %s", run_name or output_uri, summary)
    create_markdown_artifact(
        key="bedrock-batch-run-summary",
        markdown=summary_markdown(summary, run_name or output_uri),
        # The UI renders the description as markdown too.
        description=f"Summary of `{run_name or output_uri}`",
    )
    return summary


def _value(value: Any) -> str:
    """A count with separators, a fraction to 2 places, anything else as code (kept literal)."""
    if isinstance(value, bool) or value is None:
        return f"`{value}`"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"`{value}`"


def summary_markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as markdown people read: paths and names in code spans (an underscore or
    star in a folder name is not emphasis), money as dollars, nested counts one line each."""
    from tasks.bedrock.prices import format_usd

    lines = [f"# Summary of `{title}`", ""]
    for key, value in summary.items():
        if key == "columns":
            continue
        if key == "served_by":
            for how, counts in value.items():
                parts = ", ".join(f"{name} {_value(n)}" for name, n in counts.items())
                lines.append(f"- **served by `{how}`**: {parts}")
        elif key == "cost_usd":
            money = [
                f"{name.removesuffix('_usd')} {format_usd(v)}"
                for name, v in value.items()
                if name.endswith("_usd")
            ]
            held = value.get("held_back_rows")
            lines.append(f"- **cost**: {', '.join(money)}; held back rows {_value(held)}")
        else:
            lines.append(f"- **{key}**: {_value(value)}")
    lines.append(f"- **columns**: {', '.join(f'`{c}`' for c in summary['columns'])}")
    return "\n".join(lines)
