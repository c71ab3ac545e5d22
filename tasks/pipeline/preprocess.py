"""Preprocess: validate the source, render prompts, build model bodies and write job shards."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from prompt_templates import PromptTemplate, get_template
from tasks.bedrock.families import ModelFamily, family_for
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
from tasks.files import atomic_path
from tasks.pipeline import columns as C
from tasks.pipeline.plan import RunPlan, ShardPlan
from tasks.pipeline.sharding import cut_shards, even_bounds, shard_count
from tasks.pipeline.sources import encoding_message, load_source
from tasks.run.layout import (
    INPUT_DIR,
    ROWS_DIR,
    SKIPPED_ROWS_FILE,
    input_file,
    rows_file,
    shard_name,
)
from tasks.settings import QuotaSettings, get_settings

DEFAULT_TEXT_COLUMN = "input_text"
CHARS_PER_TOKEN = 4
_ROW = "__row"
_LINE = "__line"
_MISSING = "__missing"
_BYTES = "__bytes"
_CHARS = "__chars"
_SHOW_IDS = 5
# The rows files are read back once, by the merge: writing speed matters more than their size.
ROWS_COMPRESSION = "uncompressed"
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
    return (
        frame.filter(mask)
        .head(_SHOW_IDS)
        .select(record_id_expr(pl.col(_ROW)))
        .to_series()
        .to_list()
    )


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


_RID_SENTINEL = "RIDSENTINELQXZ"
_PROMPT_SENTINEL = "PROMPTSENTINELQXZ"


def _escaped(value: pl.Expr) -> pl.Expr:
    """The JSON-escaped text of `value` (no quotes), escaped by Polars' own JSON encoder."""
    encoded = pl.struct(value.cast(pl.String).alias("s")).struct.json_encode()
    return encoded.str.head(-2).str.tail(-6)


def _escape_literal(text: str) -> str:
    return pl.select(_escaped(pl.lit(text, dtype=pl.String))).item()


@dataclass(frozen=True)
class LineFormat:
    """How one JSONL line `{"recordId":..,"modelInput":..}` is built for a family and template.

    The family's body is encoded once with `struct.json_encode` around placeholders; each row
    then only escapes its own column values into that skeleton, which gives the same bytes as
    encoding the whole struct per row at a fraction of the cost (checked in the tests).
    """

    pieces: tuple[tuple[str, str], ...]  # ("const", json text) | ("column", name) | ("id", "")
    reference: pl.Expr  # the plain per-row struct encoding, used when no skeleton applies
    literal_chars: int

    @property
    def const_bytes(self) -> int:
        """Bytes of every line that do not depend on the row (record id included)."""
        return 11 + sum(len(v.encode()) for k, v in self.pieces if k == "const")

    @property
    def columns(self) -> list[str]:
        """The columns whose escaped values go into the line."""
        return [v for k, v in self.pieces if k == "column"]

    def expr(self, record_id: pl.Expr) -> pl.Expr:
        """The JSONL line of every row."""
        if not self.pieces:
            return self.reference
        parts = []
        for kind, value in self.pieces:
            if kind == "const":
                parts.append(pl.lit(value, dtype=pl.String))
            elif kind == "id":
                parts.append(record_id)
            else:
                parts.append(_escaped(pl.col(value)))
        return pl.concat_str(parts)

    def value_bytes_upper(self) -> pl.Expr:
        """An upper bound of the row-dependent bytes (an escape is at most 6 bytes a byte)."""
        return pl.sum_horizontal(
            [pl.col(c).cast(pl.String).str.len_bytes().cast(pl.UInt64) * 6 for c in self.columns]
            or [pl.lit(0, dtype=pl.UInt64)]
        )

    def value_bytes(self) -> pl.Expr:
        """The exact row-dependent bytes."""
        return pl.sum_horizontal(
            [_escaped(pl.col(c)).str.len_bytes().cast(pl.UInt64) for c in self.columns]
            or [pl.lit(0, dtype=pl.UInt64)]
        )


def compile_line(family: ModelFamily, template: PromptTemplate, options) -> LineFormat:
    """The LineFormat of `family` with `template` and `options`."""
    body = family.body_expr(template.render_expr(), template.system, options)
    reference = pl.struct(
        record_id_expr(pl.col(_ROW)).alias("recordId"), body.alias("modelInput")
    ).struct.json_encode()
    literal_chars = sum(len(literal) for literal, _ in template.parts)
    skeleton_body = family.body_expr(pl.lit(_PROMPT_SENTINEL), template.system, options)
    skeleton = pl.select(
        pl.struct(
            pl.lit(_RID_SENTINEL).alias("recordId"), skeleton_body.alias("modelInput")
        ).struct.json_encode()
    ).item()
    if skeleton.count(_RID_SENTINEL) != 1 or skeleton.count(_PROMPT_SENTINEL) != 1:
        return LineFormat((), reference, literal_chars)
    head, rest = skeleton.split(_RID_SENTINEL)
    mid, tail = rest.split(_PROMPT_SENTINEL)
    pieces: list[tuple[str, str]] = [("const", head), ("id", ""), ("const", mid)]
    for literal, column in template.parts:
        if literal:
            pieces.append(("const", _escape_literal(literal)))
        if column is not None:
            pieces.append(("column", column))
    pieces.append(("const", tail))
    merged: list[tuple[str, str]] = []
    for kind, value in pieces:
        if kind == "const" and merged and merged[-1][0] == "const":
            merged[-1] = ("const", merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return LineFormat(tuple(merged), reference, literal_chars)


def _sliceable(source: str) -> bool:
    """Whether row ranges of the source can be read without re-reading it from the start."""
    if source.startswith("hf://"):
        return True
    path = source.split("?", 1)[0].lower()
    return (
        path.endswith((".parquet", ".pq"))
        or Path(source).is_dir()
        and not any(
            p.suffix.lower() in (".csv", ".jsonl", ".ndjson") for p in Path(source).iterdir()
        )
    )


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
    on_shard: Callable[[int, int], None] | None = None,
) -> RunPlan:
    """Validate `source`, then write Bedrock JSONL shards, their input rows and plan.json.

    Args:
        source: hf:// dataset, s3:// URI or local path / glob (see tasks.pipeline.sources).
        model_id: Bedrock model id or inference profile id.
        out_dir: local folder for input/, rows/ and plan.json (its input/ and rows/ are replaced).
        prompt_id: template from prompt_templates.py; None sends `text_column` verbatim.
        text_column: column sent verbatim (embeddings); defaults to `input_text`.
        id_column: the user's own id column, checked for duplicates and kept.
        invocation_type: "InvokeModel" or "Converse".
        inference_overrides: options overriding the template's (strict per family).
        on_missing: "fail" on null/empty prompt values, or "skip" those rows.
        max_records_per_job: records per shard; default spreads rows over the gate.
        max_concurrent_jobs: the gate; shards default to about this many jobs.
        quotas: Bedrock quotas; default from settings.
        on_shard: called with (shards done, shards in all) as each shard is cut, for progress.

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
    line = compile_line(family, template, options)
    missing = _missing_expr(needed, schema)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / "source.parquet.tmp"
    try:
        if not _sliceable(source):
            # CSV and JSONL cannot be read from a row offset; stage them once as Parquet.
            try:
                lf.sink_parquet(staged, compression="lz4", statistics=False, engine="streaming")
            except pl.exceptions.ComputeError as exc:
                raise _source_error(exc, source) from None
            lf = pl.scan_parquet(staged)
        return _preprocess(
            lf, schema, source, family, template, line, missing, out_dir, quotas, max_bytes,
            max_records, max_records_per_job, max_concurrent_jobs, on_missing, model_id,
            invocation_type, prompt_id, text_column, id_column, options, on_shard,
        )  # fmt: skip
    finally:
        staged.unlink(missing_ok=True)


def _preprocess(
    lf, schema, source, family, template, line, missing, out_dir, quotas, max_bytes,
    max_records, max_records_per_job, max_concurrent_jobs, on_missing, model_id,
    invocation_type, prompt_id, text_column, id_column, options, on_shard=None,
) -> RunPlan:  # fmt: skip
    needed = template.columns
    # 1. Validate everything before writing anything: one streaming pass of small columns.
    chars = pl.sum_horizontal(
        [pl.col(c).cast(pl.String).str.len_chars().cast(pl.UInt32) for c in needed]
    ) + pl.lit(line.literal_chars, dtype=pl.UInt32)
    stats = _collect(
        lf.select(
            missing.alias(_MISSING),
            chars.alias(_CHARS),
            (line.value_bytes_upper() + line.const_bytes).alias(_BYTES),
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
    row = pl.col(_ROW)
    ok = ~pl.col(_MISSING)
    stats = stats.with_row_index(_ROW)
    if family.max_input_chars is not None:
        over = ok & (pl.col(_CHARS) > family.max_input_chars)
        if stats.select(over.any()).item():
            ids = _first_ids(stats, over)
            worst = stats.filter(over)[_CHARS].max()
            msg = (
                f"Record(s) {', '.join(ids)} have prompts over the {family.name} input limit of "
                f"{family.max_input_chars:,} characters (longest {worst:,}). Shorten or split "
                "those texts before sending them."
            )
            raise RecordTooLargeError(msg)
    if id_column is not None:
        _check_ids(lf, id_column, source)

    valid = stats.filter(ok) if n_missing else stats
    target_jobs = 1 if max_records_per_job is not None else max_concurrent_jobs
    ranges = _cut(valid, max_records, max_bytes, target_jobs, quotas)
    if ranges is None:
        # The cheap bound says a limit may bind: measure the exact line sizes.
        exact = _collect(lf.select((line.value_bytes() + line.const_bytes).alias(_BYTES)), source)
        stats = stats.with_columns(exact[_BYTES])
        valid = stats.filter(ok) if n_missing else stats
        over = ok & (pl.col(_BYTES) > max_bytes)
        if stats.select(over.any()).item():
            ids = _first_ids(stats, over)
            worst = stats.filter(over)[_BYTES].max()
            msg = (
                f"Record(s) {', '.join(ids)} are over the input file limit of {max_bytes:,} "
                f"bytes (largest {worst:,} bytes as a JSONL line). Shorten them, or raise "
                "BEDROCK_BATCH_QUOTA_MAX_FILE_BYTES if your quota allows."
            )
            raise RecordTooLargeError(msg)
        ranges = cut_shards(
            valid[_BYTES].to_numpy(),
            min_records=quotas.min_records_per_job,
            max_records=max_records,
            max_bytes=max_bytes,
            target_jobs=target_jobs,
        )
    valid_rows = valid[_ROW].to_numpy()
    cum_chars = np.concatenate([[0], np.cumsum(valid[_CHARS].to_numpy(), dtype=np.int64)])
    bounds = [int(valid_rows[a]) for a, _ in ranges] + [total]
    del stats, valid, valid_rows

    # 2. Write each shard from its own row range: memory follows the shard, not the dataset.
    for sub in (INPUT_DIR, ROWS_DIR):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    input_columns = list(schema.names())
    keep = [*input_columns, C.RECORD_ID]
    shards = []
    skipped: list[pl.DataFrame] = []
    # A shard's two files are written side by side; at most two shards' writes are pending, so
    # memory stays at a few shards whatever the row count.
    writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer")
    writes: list[Future] = []
    try:
        for i, (a, b) in enumerate(ranges):
            first, stop = bounds[i], bounds[i + 1]
            frame = _collect(
                lf.slice(first, stop - first)
                .with_row_index(_ROW, offset=first)
                .with_columns(
                    # Without missing rows (the usual case) the flag need not be recomputed.
                    (missing if n_missing else pl.lit(False)).alias(_MISSING),
                    record_id_expr(row).alias(C.RECORD_ID),
                )
                .with_columns(line.expr(pl.col(C.RECORD_ID)).alias(_LINE)),
                source,
            )
            if n_missing:
                skipped.append(frame.filter(pl.col(_MISSING)).select(keep))
                frame = frame.filter(~pl.col(_MISSING))
            if frame.height != b - a:
                msg = f"Shard {i} has {frame.height} rows, planned {b - a}: did the source change?"
                raise SourceError(msg)
            name = shard_name(i)
            shard = ShardPlan(
                index=i,
                name=name,
                records=b - a,
                bytes=int(frame[_LINE].str.len_bytes().sum()) + frame.height,
                est_input_tokens=math.ceil(int(cum_chars[b] - cum_chars[a]) / CHARS_PER_TOKEN),
                input_file=input_file(name),
                rows_file=rows_file(name),
            )
            # Files are written in the background while the next shard is computed.
            writes.append(
                writer.submit(_write_lines, frame.get_column(_LINE), out_dir / shard.input_file)
            )
            writes.append(
                writer.submit(_write_parquet, frame.select(keep), out_dir / shard.rows_file)
            )
            shards.append(shard)
            if on_shard:
                on_shard(len(shards), len(ranges))
            del frame
            while len(writes) > 4:
                writes.pop(0).result()
        for pending in writes:
            pending.result()
    finally:
        writer.shutdown(wait=True)
    skipped_file = None
    if n_missing:
        skipped_file = SKIPPED_ROWS_FILE
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


def _cut(
    valid: pl.DataFrame, max_records: int, max_bytes: int, target_jobs: int, quotas: QuotaSettings
) -> list[tuple[int, int]] | None:
    """Shards cut by count when the byte bound cannot bind, else None (sizes are needed)."""
    n = valid.height
    k = shard_count(
        n,
        min_records=quotas.min_records_per_job,
        max_records=max_records,
        target_jobs=target_jobs,
    )
    bounds = even_bounds(n, k)
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(valid[_BYTES].to_numpy(), out=cum[1:])
    if int(np.max(cum[bounds[1:]] - cum[bounds[:-1]])) > max_bytes:
        return None
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _write_lines(lines: pl.Series, path: Path) -> None:
    with atomic_path(path) as tmp:
        lines.to_frame().write_csv(tmp, include_header=False, quote_style="never")


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression=ROWS_COMPRESSION, statistics=False)


def _skipped_rows(parts: list[pl.DataFrame], needed: tuple[str, ...]) -> pl.DataFrame:
    frame = pl.concat(parts, how="vertical")
    return frame.with_columns(
        pl.lit(C.MISSING_INPUT).alias(C.ERROR_CODE),
        pl.lit(f"Skipped by on_missing='skip': null or empty value in {', '.join(needed)}.").alias(
            C.ERROR_MESSAGE
        ),
    )
