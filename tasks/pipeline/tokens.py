"""A run's token figures: the rows' counts, else each job's manifest, else unknown (never 0).

Some families' outputs carry no token counts (Cohere Embed, the older Mistral text models):
their rows keep null tokens, and a job's tokens are the totals Bedrock wrote in its manifest
(`tasks.bedrock.manifest`). Rows served on demand take InvokeModel's header counts
(`tasks.aws.on_demand.header_tokens`); without those they stay unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from tasks.pipeline import columns as C

# The merge stats' key for the manifest totals of the shard's jobs: {job_id: [in, out]}.
JOB_TOKENS = "job_tokens"
# A usage table's columns beside its keys (`tally`): the rows, their token sums, the paid
# answers a later attempt replaced (`with_replaced`) and the answered rows without counts.
ROWS = "rows"
SUPERSEDED_ROWS = "superseded_rows"
UNCOUNTED = "__uncounted"
# The part file a row is in: with the job and how it was served, the keys a cost is priced by.
PART = "__part"
BY_PART = (PART, C.JOB_ID, C.SERVED_BY)

JobTokens = dict[str, tuple[int, int]]


def uncounted_expr(names: list[str]) -> pl.Expr:
    """Answered rows without an input token count: their tokens are the job's manifest's."""
    answered = pl.col(C.ERROR_CODE).is_null() if C.ERROR_CODE in names else pl.lit(True)
    counted = pl.col(C.INPUT_TOKENS).is_not_null() if C.INPUT_TOKENS in names else pl.lit(False)
    return answered & ~counted


def tally(frame: pl.LazyFrame, keys: Sequence[str] = (C.JOB_ID,)) -> pl.LazyFrame:
    """The usage table of rows: by ``keys``, their count, token sums and uncounted answers.

    A key the frame lacks is null (a part without `served_by`). A null count adds 0 to the
    sum and 1 to the uncounted answers, which say the sum is not the whole (`with_manifests`).
    """
    names = frame.collect_schema().names()
    absent = [pl.lit(None, pl.String).alias(k) for k in keys if k not in names]
    sums = [
        (pl.col(c) if c in names else pl.lit(0, pl.Int64)).fill_null(0).sum().alias(c)
        for c in (C.INPUT_TOKENS, C.OUTPUT_TOKENS)
    ]
    return (
        frame.with_columns(*absent)
        .group_by(list(keys))
        .agg(
            pl.len().cast(pl.Int64).alias(ROWS),
            *sums,
            pl.lit(0, pl.Int64).alias(SUPERSEDED_ROWS),
            uncounted_expr(names).sum().cast(pl.Int64).alias(UNCOUNTED),
        )
    )


def with_replaced(
    usage: pl.DataFrame, replaced: list[dict[str, Any]] | None, keys: Sequence[str]
) -> pl.DataFrame:
    """A `tally` table plus the tokens of paid answers a later attempt replaced, by ``keys``.

    A schema repair re-asks a record Bedrock already answered and charged for; the part keeps
    the repair alone, so the replaced answers (`tasks.pipeline.attempts.SUPERSEDED`, each
    with its job, how it was served, its rows and tokens) are added to their key's tokens and
    to its ``superseded_rows``, not to its ``rows``.
    """
    if not replaced:
        return usage
    numbers = {
        ROWS: [0] * len(replaced),
        C.INPUT_TOKENS: [int(r.get(C.INPUT_TOKENS) or 0) for r in replaced],
        C.OUTPUT_TOKENS: [int(r.get(C.OUTPUT_TOKENS) or 0) for r in replaced],
        SUPERSEDED_ROWS: [int(r.get("rows") or 0) for r in replaced],
        UNCOUNTED: [0] * len(replaced),
    }
    extra = pl.DataFrame(
        {**{k: [r.get(k) for r in replaced] for k in keys}, **numbers},
        schema={**{k: usage.schema[k] for k in keys}, **dict.fromkeys(numbers, pl.Int64)},
    )
    both = pl.concat([usage.select(extra.columns), extra], how="vertical_relaxed")
    return both.group_by(list(keys), maintain_order=True).agg(pl.all().sum())


def with_manifests(usage: pl.DataFrame, job_tokens: JobTokens | None) -> pl.DataFrame:
    """`tally` rows whose answers had no counts take their job's manifest totals; those
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


def totals(
    usage: pl.DataFrame, job_tokens: JobTokens | None = None
) -> tuple[int | None, int | None]:
    """(input, output) tokens over a `tally` table; None when any of its rows' are unknown.

    ``job_tokens`` resolves the rows without counts first (`with_manifests`); a table the
    cost already resolved needs none, and keeps unknown what stayed unknown.
    """
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
