"""Preprocess: validate the source, render prompts, build model bodies and write job shards."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

from prompt_templates import PromptTemplate
from tasks.bedrock.families import ModelFamily, Options, family_for
from tasks.errors import (
    EmptyDatasetError,
    InputValidationError,
    MissingValuesError,
    ShardingError,
    SourceError,
    TooFewRecordsError,
)
from tasks.files import atomic_path, write_parquet_atomic
from tasks.pipeline import columns as C
from tasks.pipeline import validation as V
from tasks.pipeline.lines import ROW, LineFormat, compile_line, record_id_expr
from tasks.pipeline.plan import RunPlan, ShardPlan
from tasks.pipeline.sharding import cut_shards, even_bounds, shard_count
from tasks.pipeline.sources import (
    CsvTypes,
    check_header,
    check_integers_kept,
    check_lone_surrogates,
    file_format,
    load_source,
    read_error,
    source_format,
)
from tasks.run.layout import (
    INPUT_DIR,
    ROWS_DIR,
    SKIPPED_ROWS_FILE,
    input_file,
    rows_file,
    shard_name,
)
from tasks.settings import QuotaSettings, get_settings

if TYPE_CHECKING:
    from tasks.run.params import BatchParams

CHARS_PER_TOKEN = 4
# Request lines spread over the shards, kept beside the plan for the cost estimate's CountTokens.
SAMPLE_FILE = "estimate-sample.jsonl"
_LINE = "__line"
_MISSING = "__missing"
_BYTES = "__bytes"
_CHARS = "__chars"
# A shard's file holds its lines and a newline after each: the byte limit counts both. The
# quota ("Batch inference input file size", Amazon Bedrock endpoints and quotas in the AWS
# General Reference; batch-inference-data.html: one JSON object per line) is the file's size.
_NEWLINE_BYTES = 1


@dataclass(frozen=True)
class PreprocessOptions:
    """What a run asks of preprocess: the model, the prompt, and how to cut the jobs.

    Attributes:
        model_id: Bedrock model id or inference profile id.
        prompt_id: template from prompt_templates.py; None sends `text_column` verbatim.
        text_column: column sent verbatim (embeddings); defaults to `input_text`.
        id_column: the user's own id column, checked for duplicates and kept.
        invocation_type: "InvokeModel" or "Converse".
        inference_overrides: options overriding the template's (strict per family).
        on_missing: "fail" on null/empty prompt values, or "skip" those rows.
        max_records_per_job: records per shard; default spreads rows over the gate.
        max_concurrent_jobs: the gate; shards default to about this many jobs.
        quotas: Bedrock quotas; default from settings.
        csv_types: "text" keeps CSV values as written; "infer" guesses numbers and dates.
        small_on_demand: fewer records than a job's minimum make one shard served on demand
            (bedrock-runtime, the full price) instead of a refusal.
    """

    model_id: str
    prompt_id: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    invocation_type: str = "InvokeModel"
    inference_overrides: dict = field(default_factory=dict)
    on_missing: Literal["fail", "skip"] = "fail"
    max_records_per_job: int | None = None
    max_concurrent_jobs: int = 10
    quotas: QuotaSettings | None = None
    csv_types: CsvTypes = "text"
    small_on_demand: bool = False


@dataclass
class _Work:
    """One preprocess in progress: the options resolved against the model and the source."""

    source: str
    opts: PreprocessOptions
    quotas: QuotaSettings
    family: ModelFamily
    template: PromptTemplate
    options: Options
    line: LineFormat
    lf: pl.LazyFrame
    schema: pl.Schema
    missing: pl.Expr
    out_dir: Path
    max_records: int
    max_bytes: int
    # A JSONL source's text columns, looked at for U+0000 until it is found (`_check_text`).
    nul_columns: list[str] = field(default_factory=list)
    # Float columns of a JSONL or typed CSV source, looked at for integers they may have rounded
    # until one of 2^53 or beyond is found (`_check_text`).
    float_columns: list[str] = field(default_factory=list)


def _sliceable(source: str) -> bool:
    """Whether row ranges of the source can be read without re-reading it from the start."""
    if source.startswith("hf://"):
        return True
    if Path(source).is_dir():
        return all(file_format(p.name) in (None, "parquet") for p in Path(source).iterdir())
    return file_format(source) == "parquet"


def preprocess(
    source: str,
    options: PreprocessOptions | None = None,
    *,
    out_dir: Path,
    on_shard: Callable[[int, int], None] | None = None,
    **fields,
) -> RunPlan:
    """Validate `source`, then write Bedrock JSONL shards, their input rows and plan.json.

    Args:
        source: hf:// dataset, s3:// URI or local path / glob (see tasks.pipeline.sources).
        options: what to send and how to cut it; or give its fields as keywords.
        out_dir: local folder for input/, rows/ and plan.json (its input/ and rows/ are replaced).
        on_shard: called with (shards done, shards in all) as each shard is cut, for progress.

    Returns:
        The RunPlan that was written to `out_dir/plan.json`.
    """
    if options is None:
        if fields.get("inference_overrides") is None:
            fields.pop("inference_overrides", None)
        options = PreprocessOptions(**fields)
    work = _resolve(source, options, Path(out_dir))
    staged = work.out_dir / "source.parquet.tmp"
    try:
        if not _sliceable(source):
            # CSV and JSONL cannot be read from a row offset; stage them once as Parquet.
            try:
                work.lf.sink_parquet(
                    staged, compression="lz4", statistics=False, engine="streaming"
                )
            except pl.exceptions.ComputeError as exc:
                raise read_error(exc, source) from None
            work.lf = pl.scan_parquet(staged)
        if work.opts.on_missing == "fail" and work.line.pieces:
            try:
                return _write_shards(work, *_even_ranges(work), 0, on_shard, speculative=True)
            except (_Replan, InputValidationError) as exc:
                # A failed check leaves no shard behind, as it did before any was written; the
                # two-pass plan finds the error, or the cut by bytes, the even one missed.
                for sub in (INPUT_DIR, ROWS_DIR):
                    shutil.rmtree(work.out_dir / sub, ignore_errors=True)
                if not isinstance(exc, _Replan):
                    raise
        return _write_shards(work, *_plan_ranges(work), on_shard)
    finally:
        staged.unlink(missing_ok=True)


def preprocess_params(
    params: BatchParams, out_dir: Path, on_shard: Callable[[int, int], None] | None = None
) -> RunPlan:
    """Preprocess with a run's parameters into a local folder (the flow and the dry run).

    It lives here rather than beside the flow's tasks so the dry run imports no Prefect.
    """
    options = PreprocessOptions(
        model_id=params.model_id,
        prompt_id=params.prompt_id,
        text_column=params.text_column,
        id_column=params.id_column,
        invocation_type=params.invocation_type,
        inference_overrides=params.inference.as_dict(),
        on_missing=params.on_missing,
        csv_types=params.csv_types,
        max_records_per_job=params.max_records_per_job,
        max_concurrent_jobs=params.max_concurrent_jobs,
        small_on_demand=params.on_demand,
    )
    return preprocess(params.source, options, out_dir=out_dir, on_shard=on_shard)


def _resolve(source: str, opts: PreprocessOptions, out_dir: Path) -> _Work:
    """Check the options against the model and the source's columns; nothing is read yet."""
    quotas = opts.quotas or get_settings().quotas
    if opts.on_missing not in ("fail", "skip"):
        msg = f'on_missing={opts.on_missing!r}; use "fail" or "skip".'
        raise InputValidationError(msg)
    family = family_for(opts.model_id, opts.invocation_type)
    template = V.template_for(opts.prompt_id, opts.text_column, family)
    options = family.options(template.inference_params(), opts.inference_overrides)
    max_records = quotas.max_records_per_job
    if opts.max_records_per_job is not None:
        if opts.max_records_per_job < quotas.min_records_per_job:
            msg = (
                f"max_records_per_job={opts.max_records_per_job} is under the job minimum of "
                f"{quotas.min_records_per_job} (BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB)."
            )
            raise InputValidationError(msg)
        max_records = min(max_records, opts.max_records_per_job)
    lf = load_source(source, opts.csv_types)
    try:
        schema = lf.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise read_error(exc, source) from None
    check_header(schema.names(), source)
    what = f"prompt template {opts.prompt_id!r}" if opts.prompt_id else "the text column"
    answer = template.output_schema.fields if template.output_schema is not None else ()
    V.check_columns(schema, template.columns, opts.id_column, what, answer)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = source_format(source)  # a local glob is listed for it: once
    return _Work(
        source=source,
        opts=opts,
        quotas=quotas,
        family=family,
        template=template,
        options=options,
        line=compile_line(family, template, options),
        lf=lf,
        schema=schema,
        missing=V.missing_expr(template.columns, schema),
        out_dir=out_dir,
        max_records=max_records,
        max_bytes=min(quotas.max_file_bytes, quotas.max_job_bytes),
        nul_columns=[n for n, t in schema.items() if t == pl.String] if fmt == "jsonl" else [],
        float_columns=[n for n, t in schema.items() if t in (pl.Float32, pl.Float64)]
        if fmt == "jsonl" or (fmt == "csv" and opts.csv_types == "infer")
        else [],
    )


def _check_text(w: _Work, frame: pl.DataFrame) -> None:
    """Refuse a JSONL source whose text holds half a surrogate pair (Polars reads U+0000), and
    a JSONL or typed CSV source whose float column rounded an integer written in it.

    U+0000 in a shard's text, and a float of 2^53 or beyond, are rare and cost a comparison per
    value to rule out; only then is the source read again (`check_lone_surrogates`,
    `check_integers_kept`), once.
    """
    if w.nul_columns:
        nul = pl.col(w.nul_columns).str.contains("\x00", literal=True).any()
        if frame.select(pl.any_horizontal(nul)).item():
            w.nul_columns = []
            check_lone_surrogates(w.source)
    if w.float_columns:
        large = (pl.col(w.float_columns).abs() >= _EXACT_INTEGERS).any()
        if frame.select(pl.any_horizontal(large)).item():
            columns, w.float_columns = w.float_columns, []
            check_integers_kept(w.source, columns)


# Every integer of smaller magnitude is exact in a Float64; from here on floats skip integers.
_EXACT_INTEGERS = float(2**53)


class _Replan(Exception):
    """The even cut planned from the row count alone does not hold: plan from every row."""


def _chars(w: _Work) -> pl.Expr:
    """A row's prompt characters: its template values and the template's own text."""
    return pl.sum_horizontal(
        [pl.col(c).cast(pl.String).str.len_chars().cast(pl.UInt32) for c in w.template.columns]
    ) + pl.lit(w.line.literal_chars, dtype=pl.UInt32)


def _even_ranges(w: _Work) -> tuple[list[tuple[int, int]], list[int], int]:
    """The shards of the usual run, from the row count alone (Parquet keeps it in its footer).

    With on_missing="fail", no missing value and no shard over the byte limit, the two-pass
    plan cuts the rows evenly by count; `_write_shards` checks those conditions shard by shard
    as it writes, so the source is read once. Anything else raises _Replan.
    """
    total = V.collect(w.lf.select(pl.len()), w.source).item()
    target_jobs = 1 if w.opts.max_records_per_job is not None else w.opts.max_concurrent_jobs
    try:
        k = shard_count(
            total,
            min_records=w.quotas.min_records_per_job,
            max_records=w.max_records,
            target_jobs=target_jobs,
        )
    except (TooFewRecordsError, ShardingError):
        raise _Replan from None  # the two-pass plan says why, after the checks that come first
    bounds = [int(b) for b in even_bounds(total, k)]
    return list(zip(bounds[:-1], bounds[1:], strict=True)), bounds, total


def _plan_ranges(w: _Work) -> tuple[list[tuple[int, int]], list[int], int, int]:
    """Validate every row in one streaming pass of small columns, then cut the shards.

    Returns the shards' ranges among valid rows, their bounds among source rows, the row count
    and the count of rows with a missing value.
    """
    needed, line, source = w.template.columns, w.line, w.source
    stats = V.collect(
        w.lf.select(
            w.missing.alias(_MISSING),
            _chars(w).alias(_CHARS),
            (line.value_bytes_upper() + line.const_bytes + _NEWLINE_BYTES).alias(_BYTES),
        ),
        source,
    )
    total = stats.height
    if total == 0:
        msg = f"The source {source!r} has no rows; nothing to send."
        raise EmptyDatasetError(msg)
    n_missing = int(stats[_MISSING].sum())
    if n_missing and w.opts.on_missing == "fail":
        csv = source_format(w.source) == "csv"
        raise MissingValuesError(V.missing_message(w.lf, needed, w.schema, n_missing, csv))
    ok = ~pl.col(_MISSING)
    stats = stats.with_row_index(ROW)
    V.check_input_chars(stats, ok, _CHARS, w.family)
    if w.opts.id_column is not None:
        V.check_ids(w.lf, w.opts.id_column, source)

    valid = stats.filter(ok) if n_missing else stats
    target_jobs = 1 if w.opts.max_records_per_job is not None else w.opts.max_concurrent_jobs
    try:
        ranges = _cut(valid, w.max_records, w.max_bytes, target_jobs, w.quotas)
    except TooFewRecordsError as exc:
        if w.opts.small_on_demand and valid.height:
            ranges = [(0, valid.height)]  # one shard, served on demand (`ShardPlan.on_demand`)
        else:
            raise _too_few(exc, total, n_missing, w.opts.small_on_demand) from None
    if ranges is None:
        # The cheap bound says a limit may bind: measure the exact line sizes.
        exact = V.collect(
            w.lf.select((line.value_bytes() + line.const_bytes + _NEWLINE_BYTES).alias(_BYTES)),
            source,
        )
        stats = stats.with_columns(exact[_BYTES])
        valid = stats.filter(ok) if n_missing else stats
        V.check_line_bytes(stats, ok, _BYTES, w.max_bytes)
        ranges = cut_shards(
            valid[_BYTES].to_numpy(),
            min_records=w.quotas.min_records_per_job,
            max_records=w.max_records,
            max_bytes=w.max_bytes,
            target_jobs=target_jobs,
        )
    # A shard's source rows run from its first valid row to the next shard's; the first shard's
    # from row 0, so that rows skipped before the first valid one are written as skipped too.
    valid_rows = valid[ROW].to_numpy()
    bounds = [0] + [int(valid_rows[a]) for a, _ in ranges[1:]] + [total]
    return ranges, bounds, total, n_missing


def _write_shards(
    w: _Work,
    ranges: list[tuple[int, int]],
    bounds: list[int],
    total: int,
    n_missing: int,
    on_shard: Callable[[int, int], None] | None,
    *,
    speculative: bool = False,
) -> RunPlan:
    """Write each shard's JSONL and rows, then the plan.

    `speculative` ranges come from `_even_ranges`: each shard is checked for what the plan
    from every row would have caught (a missing value, a prompt over the model's limit, a
    shard over the byte limit), and _Replan is raised at the first one.
    """
    out_dir, lf, source, missing, line = w.out_dir, w.lf, w.source, w.missing, w.line
    needed, schema = w.template.columns, w.schema
    row = pl.col(ROW)
    # 2. Write each shard from its own row range: memory follows the shard, not the dataset.
    for sub in (INPUT_DIR, ROWS_DIR):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    input_columns = list(schema.names())
    keep = [*input_columns, C.RECORD_ID]
    shards = []
    skipped: list[pl.DataFrame] = []
    samples: list[pl.DataFrame] = []
    picks = _sample_picks(ranges, get_settings().cost.sample_records)
    # A shard's two files are written side by side; at most two shards' writes are pending, so
    # memory stays at a few shards whatever the row count.
    writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer")
    writes: list[Future] = []
    try:
        for i, (a, b) in enumerate(ranges):
            first, stop = bounds[i], bounds[i + 1]
            frame = V.collect(
                lf.slice(first, stop - first)
                .with_row_index(ROW, offset=first)
                .with_columns(
                    # Without missing rows (the usual case) the flag need not be recomputed.
                    (missing if n_missing or speculative else pl.lit(False)).alias(_MISSING),
                    record_id_expr(row).alias(C.RECORD_ID),
                    _chars(w).alias(_CHARS),
                )
                .with_columns(line.expr(pl.col(C.RECORD_ID)).alias(_LINE)),
                source,
            )
            _check_text(w, frame)
            if n_missing:
                skipped.append(frame.filter(pl.col(_MISSING)).select(keep))
                frame = frame.filter(~pl.col(_MISSING))
            if frame.height != b - a:
                msg = f"Shard {i} has {frame.height} rows, planned {b - a}: did the source change?"
                raise SourceError(msg)
            file_bytes = int(frame[_LINE].str.len_bytes().sum()) + frame.height * _NEWLINE_BYTES
            if speculative:
                _check_even(w, frame, file_bytes)
            name = shard_name(i)
            samples.append(_sample(frame, name, picks[(picks >= a) & (picks < b)] - a))
            chars = int(frame[_CHARS].sum())
            shard = ShardPlan(
                index=i,
                name=name,
                records=b - a,
                bytes=file_bytes,
                est_input_tokens=math.ceil(chars / CHARS_PER_TOKEN),
                chars=chars,
                input_file=input_file(name),
                rows_file=rows_file(name),
                on_demand=b - a < w.quotas.min_records_per_job,
            )
            # Files are written in the background while the next shard is computed.
            writes.append(
                writer.submit(_write_lines, frame.get_column(_LINE), out_dir / shard.input_file)
            )
            writes.append(
                writer.submit(write_parquet_atomic, frame.select(keep), out_dir / shard.rows_file)
            )
            shards.append(shard)
            if on_shard:
                on_shard(len(shards), len(ranges))
            del frame
            while len(writes) > 4:
                writes.pop(0).result()
        for pending in writes:
            pending.result()
        if speculative and w.opts.id_column is not None:
            V.check_ids(w.lf, w.opts.id_column, source)
    finally:
        writer.shutdown(wait=True)
    _write_sample(samples, out_dir / SAMPLE_FILE)
    skipped_file = None
    if n_missing:
        skipped_file = SKIPPED_ROWS_FILE
        write_parquet_atomic(_skipped_rows(skipped, needed), out_dir / skipped_file)

    plan = RunPlan(
        model_id=w.opts.model_id,
        family=w.family.name,
        invocation_type=w.opts.invocation_type,
        prompt_id=w.opts.prompt_id,
        text_column=w.opts.text_column,
        id_column=w.opts.id_column,
        source=source,
        total_records=total,
        skipped_records=n_missing,
        columns=input_columns,
        shards=shards,
        skipped_file=skipped_file,
        quotas=w.quotas.model_dump(),
        options=w.options.model_dump(exclude_none=True),
    )
    plan.save(out_dir)
    return plan


def _too_few(
    exc: TooFewRecordsError, total: int, n_missing: int, on_demand: bool
) -> TooFewRecordsError:
    """The refusal of a run under the job minimum, with what the user can do about it."""
    msg = str(exc)
    if n_missing:
        # "Only 0 records to send ... Add rows" said nothing of the rows the source has.
        msg += (
            f" Of the source's {total:,} rows, {n_missing:,} were skipped for a missing "
            'value (on_missing="skip"): fill them in to send them.'
        )
    if not on_demand and total > n_missing:
        msg += " Or set on_demand=True to serve them through bedrock-runtime at the full price."
    return TooFewRecordsError(msg)


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


def _check_even(w: _Work, frame: pl.DataFrame, file_bytes: int) -> None:
    """Raise _Replan where the plan from every row would not have cut this shard evenly."""
    limit = w.family.max_input_chars
    if (
        frame[_MISSING].any()
        or (limit is not None and frame[_CHARS].max() > limit)
        or file_bytes > w.max_bytes
    ):
        raise _Replan


def _sample_picks(ranges: list[tuple[int, int]], k: int) -> np.ndarray:
    """Positions of `k` records spread evenly over all the shards' records (fewer if fewer).

    The sample is what the estimate counts with CountTokens, one call a record: its size is
    the setting's, however many shards the run has (a share per shard rounded up counted one
    record a shard, 2,000 calls for a 2,000-shard run).
    """
    n = ranges[-1][1] if ranges else 0
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).astype(np.int64))


def _sample(frame: pl.DataFrame, name: str, picks: np.ndarray) -> pl.DataFrame:
    """The lines at `picks` of the shard, with their prompt characters (for CountTokens)."""
    at = pl.Series(picks, dtype=pl.Int64)
    return pl.DataFrame(
        {
            "shard": [name] * len(at),
            "chars": frame.get_column(_CHARS).gather(at).cast(pl.Int64),
            "line": frame.get_column(_LINE).gather(at),
        }
    )


def _write_sample(samples: list[pl.DataFrame], path: Path) -> None:
    frame = pl.concat(samples) if samples else pl.DataFrame()
    with atomic_path(path) as tmp:
        frame.write_ndjson(tmp)


def _write_lines(lines: pl.Series, path: Path) -> None:
    with atomic_path(path) as tmp:
        lines.to_frame().write_csv(tmp, include_header=False, quote_style="never")


def _skipped_rows(parts: list[pl.DataFrame], needed: tuple[str, ...]) -> pl.DataFrame:
    frame = pl.concat(parts, how="vertical")
    return frame.with_columns(
        pl.lit(C.MISSING_INPUT).alias(C.ERROR_CODE),
        pl.lit(f"Skipped by on_missing='skip': null or empty value in {', '.join(needed)}.").alias(
            C.ERROR_MESSAGE
        ),
    )
