"""Preprocess: validate the source, render prompts, build model bodies and write job shards."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from prefect import task

from prompt_templates import PromptTemplate, get_template
from tasks import columns as C
from tasks.errors import (
    DuplicateIdError,
    EmptyDatasetError,
    InputValidationError,
    MissingColumnsError,
    MissingValuesError,
    RecordTooLargeError,
    SourceEncodingError,
    SourceError,
)
from tasks.model_formats import ModelFamily, family_for
from tasks.plan import (
    INPUT_DIR,
    ROWS_DIR,
    SKIPPED_FILE,
    RunPlan,
    ShardPlan,
    shard_name,
)
from tasks.settings import QuotaSettings, get_settings
from tasks.sharding import cut_shards
from tasks.sources import encoding_message, load_source

DEFAULT_TEXT_COLUMN = "input_text"
CHARS_PER_TOKEN = 4
_ROW = "__row"
_LINE = "__line"
_MISSING = "__missing"
_BYTES = "__bytes"
_CHARS = "__chars"
_SHOW_IDS = 5
# Rows per streamed batch: big enough for vectorised speed, small enough to bound memory.
_BATCH_ROWS = 50_000
RESERVED_COLUMNS = (
    C.RECORD_ID,
    C.RESPONSE_TEXT,
    C.STOP_REASON,
    C.INPUT_TOKENS,
    C.OUTPUT_TOKENS,
    C.EMBEDDING,
    *C.STATUS_COLUMNS,
)


def record_id_expr(row_index: pl.Expr) -> pl.Expr:
    """Bedrock-valid record ids (11 alphanumerics): `R` + the 10-digit source row index."""
    return pl.concat_str([pl.lit("R"), row_index.cast(pl.String).str.zfill(10)])


def _template_for(
    prompt_id: str | None, text_column: str | None, family: ModelFamily
) -> PromptTemplate:
    if prompt_id and text_column:
        msg = (
            f"Give prompt_id ({prompt_id!r}) or text_column ({text_column!r}), not both: a "
            "template decides which columns it reads."
        )
        raise InputValidationError(msg)
    if prompt_id:
        return get_template(prompt_id)
    if not family.is_embedding and text_column is None:
        msg = (
            f"Model family {family.name} generates text and needs a prompt_id (a template in "
            "prompt_templates.py); or pass text_column to send a column as the prompt verbatim."
        )
        raise InputValidationError(msg)
    column = text_column or DEFAULT_TEXT_COLUMN
    if any(ch in column for ch in "{}.[]!:"):
        msg = f"text_column {column!r} has characters a template cannot name; rename the column."
        raise InputValidationError(msg)
    return PromptTemplate(text="{" + column + "}")


def _check_columns(
    schema: pl.Schema, needed: tuple[str, ...], id_column: str | None, prompt: str
) -> None:
    found = list(schema.names())
    missing = [c for c in needed if c not in schema]
    if missing:
        msg = (
            f"The source has no column {', '.join(repr(c) for c in missing)}, which {prompt} "
            f"needs. Columns found: {', '.join(found) or '(none)'}. Rename the column in the "
            "source, or pick a template / text_column that matches it."
        )
        raise MissingColumnsError(msg)
    if id_column is not None and id_column not in schema:
        msg = f"id_column {id_column!r} is not in the source. Columns found: {', '.join(found)}."
        raise MissingColumnsError(msg)
    clashes = [c for c in found if c in RESERVED_COLUMNS or c.startswith("__")]
    if clashes:
        msg = (
            f"The source has column(s) {', '.join(clashes)}, which the output writes itself. "
            "Rename or drop them (a user id belongs in id_column)."
        )
        raise InputValidationError(msg)


def _missing_expr(needed: tuple[str, ...], schema: pl.Schema) -> pl.Expr:
    flags = []
    for column in needed:
        value = pl.col(column)
        flag = value.is_null()
        if schema[column] == pl.String:
            flag = flag | (value.str.strip_chars() == "")
        flags.append(flag)
    return pl.any_horizontal(flags)


def _collect(lf: pl.LazyFrame, source: str) -> pl.DataFrame:
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.ComputeError as exc:
        raise _source_error(exc, source) from None


def _source_error(exc: Exception, source: str) -> Exception:
    text = str(exc)
    if "utf-8" in text.lower() or "utf8" in text.lower():
        return SourceEncodingError(encoding_message(source))
    return SourceError(f"Could not read source {source!r}: {text}")


def _first_ids(frame: pl.DataFrame, mask: pl.Expr) -> list[str]:
    return frame.filter(mask).head(_SHOW_IDS)[C.RECORD_ID].to_list()


def _missing_message(lf: pl.LazyFrame, needed: tuple[str, ...], schema: pl.Schema, n: int) -> str:
    details = (
        lf.with_row_index(_ROW)
        .with_columns(record_id_expr(pl.col(_ROW)).alias(C.RECORD_ID))
        .select(
            [
                pl.col(C.RECORD_ID)
                .filter(_missing_expr((c,), schema))
                .head(_SHOW_IDS)
                .implode()
                .alias(c)
                for c in needed
            ]
            + [_missing_expr((c,), schema).sum().alias(f"n_{c}") for c in needed]
        )
        .collect(engine="streaming")
    )
    parts = []
    for column in needed:
        count = details[f"n_{column}"][0]
        if count:
            ids = ", ".join(details[column][0].to_list())
            parts.append(f"column {column!r}: {count} null or empty (first record ids: {ids})")
    return (
        f"{n} rows have no value for the prompt: " + "; ".join(parts) + ". Fill them in, or "
        'pass on_missing="skip" to leave them out of the jobs (they still appear in the output '
        "with an error)."
    )


def _check_ids(lf: pl.LazyFrame, id_column: str, source: str) -> None:
    stats = _collect(
        lf.select(
            pl.col(id_column).is_null().sum().alias("nulls"),
            pl.col(id_column)
            .filter(pl.col(id_column).is_duplicated())
            .unique(maintain_order=True)
            .head(_SHOW_IDS)
            .cast(pl.String)
            .implode()
            .alias("dups"),
            pl.col(id_column).is_duplicated().sum().alias("n_dup"),
        ),
        source,
    )
    dups = stats["dups"][0].to_list()
    if dups:
        msg = (
            f"id_column {id_column!r} repeats ids ({stats['n_dup'][0]} rows share an id), e.g. "
            f"{', '.join(dups)}. Each row needs its own id so outputs can be matched; "
            "de-duplicate the source or drop id_column."
        )
        raise DuplicateIdError(msg)
    if stats["nulls"][0]:
        msg = f"id_column {id_column!r} has {stats['nulls'][0]} null ids; fill them in."
        raise DuplicateIdError(msg)


def preprocess(
    source: str,
    *,
    model_id: str,
    out_dir: Path,
    prompt_id: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    invocation_type: str = "InvokeModel",
    inference_overrides: dict | None = None,
    on_missing: Literal["fail", "skip"] = "fail",
    max_records_per_job: int | None = None,
    max_concurrent_jobs: int = 10,
    quotas: QuotaSettings | None = None,
) -> RunPlan:
    """Validate `source`, then write Bedrock JSONL shards, their input rows and plan.json.

    Args:
        source: hf:// dataset, s3:// URI or local path / glob (see tasks.sources).
        model_id: Bedrock model id or inference profile id.
        out_dir: local folder for input/, rows/ and plan.json (replaced if it holds a plan).
        prompt_id: template from prompt_templates.py; None sends `text_column` verbatim.
        text_column: column sent verbatim (embeddings); defaults to `input_text`.
        id_column: the user's own id column, checked for duplicates and kept.
        invocation_type: "InvokeModel" or "Converse".
        inference_overrides: options overriding the template's (strict per family).
        on_missing: "fail" on null/empty prompt values, or "skip" those rows.
        max_records_per_job: records per shard; default spreads rows over the gate.
        max_concurrent_jobs: the gate; shards default to about this many jobs.
        quotas: Bedrock quotas; default from settings.

    Returns:
        The RunPlan that was written to `out_dir/plan.json`.
    """
    quotas = quotas or get_settings().quotas
    if on_missing not in ("fail", "skip"):
        msg = f'on_missing={on_missing!r}; use "fail" or "skip".'
        raise InputValidationError(msg)
    family = family_for(model_id, invocation_type)
    template = _template_for(prompt_id, text_column, family)
    options = family.options(template.inference_params(), inference_overrides)
    max_records = quotas.max_records_per_job
    if max_records_per_job is not None:
        if max_records_per_job < quotas.min_records_per_job:
            msg = (
                f"max_records_per_job={max_records_per_job} is under the job minimum of "
                f"{quotas.min_records_per_job} (BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB)."
            )
            raise InputValidationError(msg)
        max_records = min(max_records, max_records_per_job)
    max_bytes = min(quotas.max_file_bytes, quotas.max_job_bytes)

    lf = load_source(source)
    try:
        schema = lf.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise _source_error(exc, source) from None
    needed = template.columns
    what = f"prompt template {prompt_id!r}" if prompt_id else "the text column"
    _check_columns(schema, needed, id_column, what)

    prompt = template.render_expr()
    body = family.body_expr(prompt, template.system, options)
    row = pl.col(_ROW)
    line = pl.struct(record_id_expr(row).alias("recordId"), body.alias("modelInput"))
    missing = _missing_expr(needed, schema)

    # 1. Validate everything before writing anything: one streaming pass of small columns.
    stats = _collect(
        lf.with_row_index(_ROW).select(
            missing.alias(_MISSING),
            pl.when(~missing)
            .then(line.struct.json_encode().str.len_bytes())
            .cast(pl.UInt32)
            .alias(_BYTES),
            prompt.str.len_chars().cast(pl.UInt32).alias(_CHARS),
        ),
        source,
    )
    total = stats.height
    if total == 0:
        msg = f"The source {source!r} has no rows; nothing to send."
        raise EmptyDatasetError(msg)
    n_missing = int(stats[_MISSING].sum())
    if n_missing and on_missing == "fail":
        raise MissingValuesError(_missing_message(lf, needed, schema, n_missing))
    stats = stats.with_row_index(_ROW).with_columns(record_id_expr(row).alias(C.RECORD_ID))
    ok = ~pl.col(_MISSING)
    if family.max_input_chars is not None:
        over = ok & (pl.col(_CHARS) > family.max_input_chars)
        ids = _first_ids(stats, over)
        if ids:
            worst = stats.filter(over)[_CHARS].max()
            msg = (
                f"Record(s) {', '.join(ids)} have prompts over the {family.name} input limit of "
                f"{family.max_input_chars:,} characters (longest {worst:,}). Shorten or split "
                "those texts before embedding them."
            )
            raise RecordTooLargeError(msg)
    over = ok & (pl.col(_BYTES) > max_bytes)
    ids = _first_ids(stats, over)
    if ids:
        worst = stats.filter(over)[_BYTES].max()
        msg = (
            f"Record(s) {', '.join(ids)} are over the input file limit of {max_bytes:,} bytes "
            f"(largest {worst:,} bytes as a JSONL line). Shorten them, or raise "
            "BEDROCK_BATCH_QUOTA_MAX_FILE_BYTES if your quota allows."
        )
        raise RecordTooLargeError(msg)
    if id_column is not None:
        _check_ids(lf, id_column, source)

    valid = stats.filter(ok)
    target_jobs = 1 if max_records_per_job is not None else max_concurrent_jobs
    ranges = cut_shards(
        valid[_BYTES].to_numpy(),
        min_records=quotas.min_records_per_job,
        max_records=max_records,
        max_bytes=max_bytes,
        target_jobs=target_jobs,
    )
    valid_rows = valid[_ROW].to_numpy()
    cum_bytes = np.concatenate([[0], np.cumsum(valid[_BYTES].to_numpy(), dtype=np.int64)])
    cum_chars = np.concatenate([[0], np.cumsum(valid[_CHARS].to_numpy(), dtype=np.int64)])
    starts = np.array([valid_rows[a] for a, _ in ranges], dtype=np.int64)
    del stats, valid

    # 2. Write: stream the source once more, batch by batch, appending to the open shard.
    out_dir = Path(out_dir)
    for sub in (INPUT_DIR, ROWS_DIR):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    shards = [
        ShardPlan(
            index=i,
            name=shard_name(i),
            records=b - a,
            bytes=int(cum_bytes[b] - cum_bytes[a]),
            est_input_tokens=math.ceil(int(cum_chars[b] - cum_chars[a]) / CHARS_PER_TOKEN),
            input_file=f"{INPUT_DIR}/{shard_name(i)}.jsonl",
            rows_file=f"{ROWS_DIR}/{shard_name(i)}.parquet",
        )
        for i, (a, b) in enumerate(ranges)
    ]
    input_columns = list(schema.names())
    batches = (
        lf.with_row_index(_ROW)
        .with_columns(missing.alias(_MISSING))
        .with_columns(
            record_id_expr(row).alias(C.RECORD_ID),
            pl.when(~pl.col(_MISSING)).then(line.struct.json_encode()).alias(_LINE),
            (pl.lit(pl.Series(starts)).search_sorted(row, side="right").cast(pl.Int64) - 1).alias(
                "__shard"
            ),
        )
    )
    skipped = _write_shards(batches, shards, out_dir, input_columns, source)
    skipped_file = None
    if n_missing:
        skipped_file = f"{ROWS_DIR}/{SKIPPED_FILE}"
        _write_parquet(_skipped_rows(skipped, needed), out_dir / skipped_file)

    plan = RunPlan(
        model_id=model_id,
        family=family.name,
        invocation_type=invocation_type,
        prompt_id=prompt_id,
        text_column=text_column,
        id_column=id_column,
        source=source,
        total_records=total,
        skipped_records=n_missing,
        columns=input_columns,
        shards=shards,
        skipped_file=skipped_file,
        quotas=quotas.model_dump(),
        options=options.model_dump(exclude_none=True),
    )
    plan.save(out_dir)
    return plan


def _batches(lf: pl.LazyFrame, source: str) -> Iterator[pl.DataFrame]:
    try:
        yield from lf.collect_batches(chunk_size=_BATCH_ROWS, engine="streaming")
    except pl.exceptions.ComputeError as exc:
        raise _source_error(exc, source) from None


def _write_shards(
    batches: pl.LazyFrame,
    shards: list[ShardPlan],
    out_dir: Path,
    input_columns: list[str],
    source: str,
) -> list[pl.DataFrame]:
    """Write each shard's JSONL and rows Parquet; return the skipped rows."""
    keep = [*input_columns, C.RECORD_ID]
    pending: list[pl.DataFrame] = []
    current = 0
    skipped: list[pl.DataFrame] = []
    for batch in _batches(batches, source):
        if batch[_MISSING].any():
            skipped.append(batch.filter(pl.col(_MISSING)).select(keep))
            batch = batch.filter(~pl.col(_MISSING))
        for (shard_index,), part in batch.partition_by("__shard", as_dict=True).items():
            while shard_index > current:
                _flush(pending, shards[current], out_dir)
                pending, current = [], current + 1
            pending.append(part.select([*keep, _LINE]))
    if shards:
        _flush(pending, shards[current], out_dir)
    return skipped


def _flush(parts: list[pl.DataFrame], shard: ShardPlan, out_dir: Path) -> None:
    frame = pl.concat(parts, how="vertical", rechunk=False) if parts else None
    if frame is None or frame.height != shard.records:
        got = 0 if frame is None else frame.height
        msg = f"{shard.name}: wrote {got} rows, planned {shard.records}; the source changed?"
        raise SourceError(msg)
    input_path = out_dir / shard.input_file
    tmp = input_path.with_name(input_path.name + ".tmp")
    frame.select(_LINE).write_csv(tmp, include_header=False, quote_style="never")
    os.replace(tmp, input_path)
    _write_parquet(frame.drop(_LINE), out_dir / shard.rows_file)


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp, compression="zstd", compression_level=1, statistics=False)
    os.replace(tmp, path)


def _skipped_rows(parts: list[pl.DataFrame], needed: tuple[str, ...]) -> pl.DataFrame:
    frame = pl.concat(parts, how="vertical")
    return frame.with_columns(
        pl.lit(C.MISSING_INPUT).alias(C.ERROR_CODE),
        pl.lit(f"Skipped by on_missing='skip': null or empty value in {', '.join(needed)}.").alias(
            C.ERROR_MESSAGE
        ),
    )


@task(name="preprocess")
def preprocess_task(source: str, **kwargs) -> RunPlan:
    """Validate the source and write job shards (see `preprocess`)."""
    return preprocess(source, **kwargs)
