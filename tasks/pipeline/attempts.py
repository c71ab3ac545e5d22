"""Combining a shard's attempts: which records still need a retry, and the final merged part.

A shard's first job covers all its rows; each retry job (or the on-demand pass) covers only
the records still unserved. A record's outcome is decided by the latest attempt that included
it: its output line, else that attempt's job error, else MissingOutput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from tasks.bedrock.error_codes import RETRYABLE_RECORD
from tasks.bedrock.families import family_for
from tasks.pipeline import columns as C
from tasks.pipeline.outputs import JOIN_ENGINE, MATCHED, REPEATS, parse_outputs, result_schema
from tasks.pipeline.structured import SCHEMA_REPAIRED, SCHEMA_VALIDATION_ERROR, OutputSchema

# A record with no output line is retried like one that failed for reasons not its own, and
# an answer that does not fit the template's output schema is asked again (repair).
RETRYABLE_RECORD_ERRORS = RETRYABLE_RECORD | {C.MISSING_OUTPUT, SCHEMA_VALIDATION_ERROR}

_ATTEMPT = "__attempt"
_PAID = "__paid"  # the latest attempt whose answer, paid for, failed the output schema
_KEPT = "__kept"  # the row falls back on that answer: the repair after it brought none
# The merge stats' key for the paid answers a later attempt replaced (`Settled.superseded`).
SUPERSEDED = "superseded"
# Record ids of stray lines named in a warning.
STRAY_EXAMPLES = 5


@dataclass(frozen=True)
class Settled:
    """A shard's rows with their outcomes, and the output lines that reached none of them."""

    frame: pl.DataFrame
    # Output lines whose record is not one the attempt sent (another job's or run's outputs,
    # a retry's line for a record it did not carry) or whose recordId could not be read.
    stray_lines: int = 0
    stray_examples: tuple[str, ...] = ()  # the first few of their record ids
    unreadable_ids: int = 0  # of the stray lines, those without a readable recordId
    # Records with more than one line in one attempt's outputs (each keeps its first success).
    repeated: int = 0
    repeated_examples: tuple[str, ...] = ()
    # By attempt, the tokens of paid answers a later attempt of their record replaced.
    superseded: list[dict] = field(default_factory=list)


@dataclass
class AttemptOutput:
    """What one attempt of a shard produced."""

    number: int
    outputs: list[bytes | Path]
    record_ids: list[str] | None = None  # None: every row of the shard
    job_id: str | None = None
    served_by: str = C.SERVED_BATCH
    job_error: tuple[str, str] | None = None
    extra: dict = field(default_factory=dict)


def _included(rows: pl.LazyFrame, attempts: list[AttemptOutput]) -> pl.LazyFrame:
    """(record_id, attempt, job_id, served_by, default error) for every record an attempt had."""
    frames = []
    for a in attempts:
        ids = (
            rows.select(C.RECORD_ID)
            if a.record_ids is None
            else pl.LazyFrame({C.RECORD_ID: a.record_ids}, schema={C.RECORD_ID: pl.String})
        )
        job = f", job {a.job_id}" if a.job_id else ""
        code, message = a.job_error or (
            C.MISSING_OUTPUT,
            f"No output line for this record (attempt {a.number}{job}).",
        )
        frames.append(
            ids.with_columns(
                pl.lit(a.number, pl.Int32).alias(_ATTEMPT),
                pl.lit(a.job_id, pl.String).alias(C.JOB_ID),
                pl.lit(a.served_by, pl.String).alias(C.SERVED_BY),
                pl.lit(code, pl.String).alias("__code"),
                pl.lit(message, pl.String).alias("__message"),
            )
        )
    return pl.concat(frames)


def outcomes(
    rows: pl.LazyFrame,
    attempts: list[AttemptOutput],
    model_id: str,
    invocation_type: str,
    output_schema: OutputSchema | None = None,
    lines: pl.LazyFrame | None = None,
    options: dict | None = None,
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Each input row with the result of the latest attempt that included it, and the record
    ids (null when unreadable) of output lines that match no record their attempt sent.

    ``options``: the plan's inference options (the embedding types the parser reads)."""
    family = family_for(model_id, invocation_type, options)
    included = _included(rows, attempts)
    if lines is None:
        lines = _lines(attempts, family, output_schema)
    latest = _row_attempts(included, attempts, lines, output_schema)
    strays = lines.select(C.RECORD_ID, _ATTEMPT).join(
        included.select(C.RECORD_ID, _ATTEMPT), on=[C.RECORD_ID, _ATTEMPT], how="anti"
    )
    matched = pl.col(MATCHED).fill_null(False)
    schema = result_schema(family, output_schema)
    input_columns = rows.collect_schema().names()
    if output_schema is not None:
        schema[SCHEMA_REPAIRED] = pl.Boolean()
        failed_before = lines.group_by(C.RECORD_ID).agg(
            (pl.col(C.ERROR_CODE) == SCHEMA_VALIDATION_ERROR).any().alias("__failed_before")
        )
        rows = rows.join(failed_before, on=C.RECORD_ID, how="left", maintain_order="left")
    # One attempt of every row (a shard without retries): its lines join on the record id
    # alone. The same join on (record id, attempt) peaked 120-190 MB higher on a Titan v2 shard
    # of 50k x 1024 floats (927-945 MB against 758-811).
    whole = len(attempts) == 1 and attempts[0].record_ids is None
    keys = C.RECORD_ID if whole else [C.RECORD_ID, _ATTEMPT]
    frame = (
        rows.join(latest, on=C.RECORD_ID, how="left", maintain_order="left")
        .join(lines.drop(_ATTEMPT) if whole else lines, on=keys, how="left", maintain_order="left")
        .with_columns(
            pl.when(matched)
            .then(pl.col(C.ERROR_CODE))
            .otherwise(pl.col("__code"))
            .alias(C.ERROR_CODE),
            pl.when(matched)
            .then(pl.col(C.ERROR_MESSAGE))
            .otherwise(pl.col("__message"))
            .alias(C.ERROR_MESSAGE),
        )
    )
    if _keeps_paid(output_schema, attempts):
        frame = _keep_paid_answers(frame)
    if output_schema is not None:
        frame = frame.with_columns(
            (pl.col("__failed_before").fill_null(False) & pl.col(C.ERROR_CODE).is_null()).alias(
                SCHEMA_REPAIRED
            )
        )
    return frame.select(
        *input_columns,
        *[pl.col(name).cast(dtype) for name, dtype in schema.items()],
    ), strays.select(C.RECORD_ID)


def _keeps_paid(output_schema: OutputSchema | None, attempts: list[AttemptOutput]) -> bool:
    """Whether a row may fall back on an earlier answer: a repair is only asked of a schema."""
    return output_schema is not None and len(attempts) > 1


def _row_attempts(
    included: pl.LazyFrame,
    attempts: list[AttemptOutput],
    lines: pl.LazyFrame,
    output_schema: OutputSchema | None,
) -> pl.LazyFrame:
    """Per record: the attempt whose line its row takes (the latest that included it), with
    that attempt's job, how it was served, its default error and the tries that sent it.

    An answer that failed the schema was paid for, then asked again (a repair). When that
    repair brought no answer back (its job failed or expired, the record was throttled or had
    no line, or the cost ceiling held the repair back) and no attempt is left, the row takes the
    latest such answer instead (`_KEPT`), so nothing paid for is dropped; the error of the
    latest attempt stays the row's error (`_keep_paid_answers`).
    """
    # `attempts` counts the tries that sent the record: an attempt the cost ceiling held back
    # (served_by skipped) sent nothing. Counted, a record sent once and then held read
    # attempts 2, and a shard held whole read 1 (rows skipped by on_missing read 0).
    sent = (pl.col(C.SERVED_BY) != C.SERVED_SKIPPED).sum().cast(pl.Int32).alias(C.ATTEMPTS)
    latest = included.sort(_ATTEMPT).group_by(C.RECORD_ID).agg(sent, pl.all().last())
    if not _keeps_paid(output_schema, attempts):
        return latest
    names = lines.collect_schema().names()
    answer = [c for c in (C.RESPONSE_TEXT, C.RAW_OUTPUT, C.INPUT_TOKENS) if c in names]
    answered = pl.any_horizontal([pl.col(c).is_not_null() for c in answer])
    # The latest attempt's own line: its error, and whether it carries an answer.
    final = lines.select(
        C.RECORD_ID,
        _ATTEMPT,
        answered.alias("__answered"),
        pl.col(C.ERROR_CODE).alias("__final_code"),
        pl.col(C.ERROR_MESSAGE).alias("__final_message"),
    )
    # The latest answer that failed the schema, among the attempts that sent the record.
    paid = (
        lines.filter(pl.col(C.ERROR_CODE) == SCHEMA_VALIDATION_ERROR)
        .select(C.RECORD_ID, _ATTEMPT)
        .join(included.select(C.RECORD_ID, _ATTEMPT), on=[C.RECORD_ID, _ATTEMPT], how="semi")
        .group_by(C.RECORD_ID)
        .agg(pl.col(_ATTEMPT).max().alias(_PAID))
    )
    by_attempt = pl.LazyFrame(
        {
            _PAID: [a.number for a in attempts],
            "__paid_job": [a.job_id for a in attempts],
            "__paid_by": [a.served_by for a in attempts],
        },
        schema={_PAID: pl.Int32, "__paid_job": pl.String, "__paid_by": pl.String},
    )
    latest = (
        latest.join(final, on=[C.RECORD_ID, _ATTEMPT], how="left")
        .join(paid, on=C.RECORD_ID, how="left")
        .join(by_attempt, on=_PAID, how="left")
    )
    kept = pl.col(_PAID) < pl.col(_ATTEMPT)
    kept = (kept & ~pl.col("__answered").fill_null(False)).fill_null(False)
    return latest.with_columns(
        kept.alias(_KEPT),
        pl.when(kept).then(_PAID).otherwise(_ATTEMPT).alias(_ATTEMPT),
        # The latest attempt's error: its line's, else its default (no line, job error, held).
        pl.coalesce("__final_code", "__code").alias("__code"),
        pl.when(pl.col("__final_code").is_not_null())
        .then(pl.col("__final_message"))
        .otherwise(pl.col("__message"))
        .alias("__message"),
    )


def _keep_paid_answers(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Rows that fell back on a paid answer (`_row_attempts`) keep it with both reasons.

    The row keeps that answer's text, tokens, job and `served_by`; its error code is the
    latest attempt's (CostCeilingReached for a held repair, so it counts with the held-back
    rows; Failed, a throttling code, MissingOutput...), and its message adds why the kept answer
    failed validation.
    """
    kept = pl.col(_KEPT).fill_null(False)
    note = pl.concat_str(
        pl.col("__message"),
        pl.lit(" Kept the paid answer of attempt "),
        pl.col(_ATTEMPT).cast(pl.String),
        pl.lit(f", which failed validation ({SCHEMA_VALIDATION_ERROR}): "),
        pl.col(C.ERROR_MESSAGE).fill_null(""),
    )
    return frame.with_columns(
        pl.when(kept).then(pl.col("__code")).otherwise(C.ERROR_CODE).alias(C.ERROR_CODE),
        pl.when(kept).then(note).otherwise(C.ERROR_MESSAGE).alias(C.ERROR_MESSAGE),
        pl.when(kept).then(pl.col("__paid_job")).otherwise(C.JOB_ID).alias(C.JOB_ID),
        pl.when(kept).then(pl.col("__paid_by")).otherwise(C.SERVED_BY).alias(C.SERVED_BY),
    )


def _lines(
    attempts: list[AttemptOutput], family, output_schema: OutputSchema | None
) -> pl.LazyFrame:
    """Every output line of every attempt, parsed once, with its attempt number."""
    return pl.concat(
        [
            parse_outputs(a.outputs, family, output_schema).with_columns(
                pl.lit(a.number, pl.Int32).alias(_ATTEMPT)
            )
            for a in attempts
        ]
    )


def _superseded(
    rows: pl.LazyFrame,
    attempts: list[AttemptOutput],
    lines: pl.LazyFrame,
    output_schema: OutputSchema | None = None,
) -> list[dict]:
    """Tokens of the answers a later attempt of the same record replaced, by attempt.

    Bedrock charged for them (a schema repair re-asks a record that was answered), but the
    part keeps only each record's latest outcome: without these the run's cost left them out.
    Lines with an ``error`` and no output carry no tokens and are not counted.
    """
    names = lines.collect_schema().names()
    tokens = [c for c in (C.INPUT_TOKENS, C.OUTPUT_TOKENS) if c in names]
    if C.INPUT_TOKENS not in tokens:
        return []  # a family that reports no tokens: its cost is unknown anyway
    # Replaced: answered before the attempt whose line the row took. A paid answer the row
    # fell back on (`_row_attempts`) is in the part, and not counted here again.
    latest = _row_attempts(_included(rows, attempts), attempts, lines, output_schema).select(
        C.RECORD_ID, pl.col(_ATTEMPT).alias("__latest")
    )
    by_attempt = {a.number: a for a in attempts}
    usage = (
        lines.join(latest, on=C.RECORD_ID, how="inner")
        .filter((pl.col(_ATTEMPT) < pl.col("__latest")) & pl.col(C.INPUT_TOKENS).is_not_null())
        .group_by(_ATTEMPT)
        .agg(pl.len().alias("rows"), *[pl.col(c).fill_null(0).sum() for c in tokens])
        .sort(_ATTEMPT)
        .collect()
    )
    return [
        {
            "attempt": r[_ATTEMPT],
            C.JOB_ID: by_attempt[r[_ATTEMPT]].job_id,
            C.SERVED_BY: by_attempt[r[_ATTEMPT]].served_by,
            "rows": r["rows"],
            C.INPUT_TOKENS: int(r[C.INPUT_TOKENS]),
            C.OUTPUT_TOKENS: int(r.get(C.OUTPUT_TOKENS) or 0),
        }
        for r in usage.iter_rows(named=True)
    ]


def settle(
    rows_file: Path,
    attempts: list[AttemptOutput],
    model_id: str,
    invocation_type: str,
    output_schema: OutputSchema | None = None,
    options: dict | None = None,
) -> Settled:
    """The shard's part as its attempts leave it: every row once, with its latest outcome.

    The one parse of the attempts' outputs: the same frame tells which records a retry takes
    (`retry_ids`) and, when there is none, is the part written (`write_part`). Beside it: the
    lines that reached no row, for the merge's warning and the run's summary, and the paid
    answers a later attempt replaced (`_superseded`), for the cost.
    """
    family = family_for(model_id, invocation_type, options)
    rows = pl.scan_parquet(rows_file)
    lines = _lines(attempts, family, output_schema)
    frame, strays = outcomes(
        rows, attempts, model_id, invocation_type, output_schema, lines, options
    )
    frame = frame.collect(engine=JOIN_ENGINE)
    # Only the lines' ids: the projection reads no answer again.
    ids = strays.collect(engine=JOIN_ENGINE).get_column(C.RECORD_ID)
    # The lines are parsed already (parse_outputs collects them): this reads two columns.
    repeated = (
        lines.filter(pl.col(REPEATS) > 1).select(C.RECORD_ID).unique(maintain_order=True).collect()
    ).get_column(C.RECORD_ID)
    return Settled(
        frame,
        stray_lines=len(ids),
        stray_examples=tuple(ids.drop_nulls().head(STRAY_EXAMPLES).to_list()),
        unreadable_ids=ids.null_count(),
        repeated=len(repeated),
        repeated_examples=tuple(repeated.head(STRAY_EXAMPLES).to_list()),
        superseded=_superseded(rows, attempts, lines, output_schema) if len(attempts) > 1 else [],
    )


def retry_ids(
    settled: pl.DataFrame, job_errors: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Record ids whose latest outcome is a retryable failure (not a fault of the record).

    ``job_errors`` names the job statuses (Failed, Expired, ...) whose records count too.
    """
    retryable = list(RETRYABLE_RECORD_ERRORS | set(job_errors))
    return settled.filter(pl.col(C.ERROR_CODE).is_in(retryable)).get_column(C.RECORD_ID).to_list()
