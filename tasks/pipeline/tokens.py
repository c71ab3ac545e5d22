"""A run's token figures: the rows' counts, else each job's manifest, else unknown (never 0).

Some families' outputs carry no token counts (Cohere Embed, the older Mistral text models):
their rows keep null tokens, and a job's tokens are the totals Bedrock wrote in its manifest
(`tasks.bedrock.manifest`). Rows served on demand take InvokeModel's header counts
(`tasks.aws.on_demand.header_tokens`); without those they stay unknown.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tasks.pipeline import columns as C

# The merge stats' key for the manifest totals of the shard's jobs: {job_id: [in, out]}.
JOB_TOKENS = "job_tokens"
UNCOUNTED = "__uncounted"

JobTokens = dict[str, tuple[int, int]]


def uncounted_expr(names: list[str]) -> pl.Expr:
    """Answered rows without an input token count: their tokens are the job's manifest's."""
    answered = pl.col(C.ERROR_CODE).is_null() if C.ERROR_CODE in names else pl.lit(True)
    counted = pl.col(C.INPUT_TOKENS).is_not_null() if C.INPUT_TOKENS in names else pl.lit(False)
    return answered & ~counted


def per_job(frame: pl.LazyFrame, keys: tuple[str, ...] = (C.JOB_ID,)) -> pl.LazyFrame:
    """Rows' tokens summed by ``keys`` (a job at least), with how many answered rows had none."""
    names = frame.collect_schema().names()
    tokens = [
        (pl.col(c) if c in names else pl.lit(0, pl.Int64)).fill_null(0).sum().alias(c)
        for c in (C.INPUT_TOKENS, C.OUTPUT_TOKENS)
    ]
    job = [] if C.JOB_ID in names else [pl.lit(None, pl.String).alias(C.JOB_ID)]
    return (
        frame.with_columns(*job)
        .group_by(list(keys))
        .agg(*tokens, uncounted_expr(names).sum().cast(pl.Int64).alias(UNCOUNTED))
    )


def with_replaced(usage: pl.DataFrame, replaced: list[dict[str, Any]] | None) -> pl.DataFrame:
    """`per_job` rows (by job alone) plus the tokens of paid answers a later attempt replaced.

    A schema repair re-asks a record Bedrock already answered and charged for; the part keeps
    the repair alone, so the replaced answers (`tasks.pipeline.attempts.SUPERSEDED`) are added
    to their job's tokens, as the cost adds them (`tasks.run.cost.token_usage`).
    """
    if not replaced:
        return usage
    extra = pl.DataFrame(
        {
            C.JOB_ID: [r.get(C.JOB_ID) for r in replaced],
            C.INPUT_TOKENS: [int(r.get(C.INPUT_TOKENS) or 0) for r in replaced],
            C.OUTPUT_TOKENS: [int(r.get(C.OUTPUT_TOKENS) or 0) for r in replaced],
            UNCOUNTED: [0] * len(replaced),
        },
        schema={
            C.JOB_ID: pl.String,
            C.INPUT_TOKENS: pl.Int64,
            C.OUTPUT_TOKENS: pl.Int64,
            UNCOUNTED: pl.Int64,
        },
    )
    both = pl.concat([usage.select(extra.columns), extra], how="vertical_relaxed")
    return both.group_by(C.JOB_ID, maintain_order=True).agg(pl.all().sum())


def with_manifests(usage: pl.DataFrame, job_tokens: JobTokens | None) -> pl.DataFrame:
    """`per_job` rows whose answers had no counts take their job's manifest totals; those
    still without any get null tokens (unknown) and keep their uncounted rows."""
    known = job_tokens or {}
    if not usage.height:
        return usage
    table = pl.DataFrame(
        {
            C.JOB_ID: list(known),
            "__m_in": [v[0] for v in known.values()],
            "__m_out": [v[1] for v in known.values()],
        },
        schema={C.JOB_ID: pl.String, "__m_in": pl.Int64, "__m_out": pl.Int64},
    )
    uncounted = pl.col(UNCOUNTED) > 0
    found = pl.col("__m_in").is_not_null()
    return (
        usage.join(table, on=C.JOB_ID, how="left", maintain_order="left")
        .with_columns(
            *(
                pl.when(uncounted & found)
                .then(pl.col(manifest))
                .when(uncounted)
                .then(None)
                .otherwise(pl.col(column))
                .alias(column)
                for column, manifest in ((C.INPUT_TOKENS, "__m_in"), (C.OUTPUT_TOKENS, "__m_out"))
            ),
            pl.when(uncounted & found).then(0).otherwise(pl.col(UNCOUNTED)).alias(UNCOUNTED),
        )
        .drop("__m_in", "__m_out")
    )


def totals(usage: pl.DataFrame, job_tokens: JobTokens | None) -> tuple[int | None, int | None]:
    """(input, output) tokens over `per_job` rows; None when any of them is unknown."""
    resolved = with_manifests(usage, job_tokens)
    if not resolved.height:
        return 0, 0
    if resolved.get_column(C.INPUT_TOKENS).null_count():
        return None, None
    return (
        int(resolved.get_column(C.INPUT_TOKENS).sum()),
        int(resolved.get_column(C.OUTPUT_TOKENS).sum()),
    )


def job_tokens_of(stats: dict[str, Any] | None) -> JobTokens:
    """The manifest totals a shard's merge stats carry."""
    return {job: (int(v[0]), int(v[1])) for job, v in ((stats or {}).get(JOB_TOKENS) or {}).items()}


def fmt_tokens(value: int | None) -> str:
    """A token count for people: "unknown" where no count exists, never 0."""
    return "unknown" if value is None else f"{value:,}"
