"""Merge Bedrock batch outputs onto a shard's input rows: one Parquet row per input row."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tasks.bedrock.families import ModelFamily, family_for
from tasks.errors import PlanError
from tasks.files import LINE, atomic_path, scan_lines
from tasks.pipeline import columns as C
from tasks.pipeline.plan import RunPlan
from tasks.run.layout import (
    JSONL,
    OUT_SUFFIX,
    OUTPUT_DIR,
    SKIPPED_FILE,
    input_file,
    output_file_name,
    part_name,
    shard_name,
)

logger = logging.getLogger(__name__)

ERROR_DTYPE = pl.Struct({"errorCode": pl.String, "errorMessage": pl.String})
_OK = "__ok"
_MATCHED = "__matched"
# Shards merge_offline merges at once.
_MERGE_WORKERS = 2


@dataclass(frozen=True)
class MergeStats:
    """Counts of one merged shard."""

    records: int
    succeeded: int
    failed: int
    input_tokens: int
    output_tokens: int


def result_schema(family: ModelFamily) -> dict[str, pl.DataType]:
    """The columns merge adds after the input columns and record_id, with their dtypes."""
    return {
        **family.result_schema,
        C.ERROR_CODE: pl.String(),
        C.ERROR_MESSAGE: pl.String(),
        C.RAW_OUTPUT: pl.String(),
        C.JOB_ID: pl.String(),
        C.SERVED_BY: pl.String(),
        C.ATTEMPTS: pl.Int32(),
    }


_RAW = "__raw"
_LINE_OK = "__line_ok"
_PROBLEM = "__problem"
_DECODED = "__decoded"
_HAS_OUTPUT = "__has_output"
# recordId and error of a line; modelOutput is taken as raw text by a JSON path, and the
# echoed modelInput is skipped by the dtype.
_TOP_DTYPE = pl.Struct({"recordId": pl.String, "error": ERROR_DTYPE})
_RECORD_ID_PATTERN = r'"recordId"\s*:\s*"([^"\\]*)"'


def _scan(outputs: list[Path | bytes]) -> pl.LazyFrame:
    scans = [
        scan_lines(out) for out in outputs if not isinstance(out, bytes | bytearray) or out.strip()
    ]
    if not scans:
        return pl.LazyFrame(schema={LINE: pl.String})
    return pl.concat(scans, how="vertical")


def _strict_lines(lines: pl.LazyFrame, family: ModelFamily) -> pl.LazyFrame:
    """The fast plan: one strict, typed decode of every line, lazily and in parallel.

    The echoed modelInput is skipped by the dtype; the raw modelOutput text is not kept here
    (see `_with_raw`). Families whose models answer in several shapes decode it from its text.
    """
    line = pl.col(LINE)
    if type(family).decode_raw is ModelFamily.decode_raw:
        dtype = pl.Struct(
            {"recordId": pl.String, "modelOutput": family.output_dtype, "error": ERROR_DTYPE}
        )
        decoded = pl.col("__top").struct.field("modelOutput")
        top = lines.select("__n", line.str.json_decode(dtype).alias("__top"))
    else:
        decoded = family.decode_raw(line.str.json_path_match("$.modelOutput"))
        top = lines.select("__n", line.str.json_decode(_TOP_DTYPE).alias("__top"), line)
    error = pl.col("__top").struct.field("error")
    return (
        top.select(
            "__n",
            pl.col("__top").struct.field("recordId"),
            error.struct.field("errorCode").alias("__code"),
            error.struct.field("errorMessage").alias("__msg"),
            decoded.alias(_DECODED),
        )
        .filter(pl.col("recordId").is_not_null())
        .with_columns(
            pl.col(_DECODED).is_not_null().alias(_HAS_OUTPUT),
            pl.lit(True).alias(_LINE_OK),
            pl.lit(None, dtype=pl.String).alias(LINE),
            *family.parse_exprs(pl.col(_DECODED)),
        )
        .with_columns(
            pl.when(pl.col(_HAS_OUTPUT) & pl.col("__code").is_null())
            .then(family.problem_expr())
            .alias(_PROBLEM)
        )
        .drop(_DECODED)
    )


def _with_raw(frame: pl.DataFrame, lines: pl.LazyFrame) -> pl.DataFrame:
    """Add the raw modelOutput text of the rows that need it (unparseable ones: rare)."""
    bad = frame.filter(pl.col(_PROBLEM).is_not_null()).select("__n")
    if not bad.height:
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias(_RAW))
    raws = (
        lines.join(bad.lazy(), on="__n")
        .select("__n", pl.col(LINE).str.json_path_match("$.modelOutput").alias(_RAW))
        .collect()
    )
    return frame.join(raws, on="__n", how="left", maintain_order="left")


def _lenient_lines(lines: pl.DataFrame, family: ModelFamily) -> pl.DataFrame:
    """The slow plan, for files the fast one cannot decode: every field by JSON path.

    A JSON path yields null for a line that is not JSON (its recordId is then found by a
    regex), and modelOutputs of another shape are isolated by `_parse_raw`.
    """
    line = pl.col(LINE)
    record_id = line.str.json_path_match("$.recordId")
    top = lines.select(
        "__n",
        pl.coalesce(record_id, line.str.extract(_RECORD_ID_PATTERN, 1)).alias("recordId"),
        line.str.json_path_match("$.error.errorCode").alias("__code"),
        line.str.json_path_match("$.error.errorMessage").alias("__msg"),
        line.str.json_path_match("$.modelOutput").alias(_RAW),
        record_id.is_not_null().alias(_LINE_OK),
        pl.when(record_id.is_null()).then(line).alias(LINE),
    ).filter(pl.col("recordId").is_not_null())
    top = top.with_columns(pl.col(_RAW).is_not_null().alias(_HAS_OUTPUT))
    answered = pl.col(_HAS_OUTPUT) & pl.col("__code").is_null()
    nulls = [pl.lit(None, dtype=dtype).alias(n) for n, dtype in family.result_schema.items()]
    rest = top.filter(~answered).with_columns(*nulls, pl.lit(None, pl.String).alias(_PROBLEM))
    good = top.filter(answered)
    if not good.height:
        return rest
    good = _parse_raw(good, family).with_columns(
        pl.coalesce(pl.col(_PROBLEM), family.problem_expr()).alias(_PROBLEM)
    )
    return pl.concat([good, rest.select(good.columns)], how="vertical_relaxed")


def _parse_raw(frame: pl.DataFrame, family: ModelFamily) -> pl.DataFrame:
    """The family's result columns from the raw modelOutput, isolating undecodable rows.

    Polars decodes JSON strictly: one modelOutput of another shape (an object where a list
    was expected, or not JSON at all) fails the whole column. Then the frame is halved until
    the failing rows stand alone, so a shard with k bad lines costs about k*log(n) decodes
    and the good rows keep their results.
    """
    try:
        return (
            frame.with_columns(family.decode_raw(pl.col(_RAW)).alias(_DECODED))
            .with_columns(*family.parse_exprs(pl.col(_DECODED)))
            .drop(_DECODED)
            .with_columns(pl.lit(None, dtype=pl.String).alias(_PROBLEM))
        )
    except pl.exceptions.ComputeError:
        if frame.height > 1:
            mid = frame.height // 2
            return pl.concat([_parse_raw(frame[:mid], family), _parse_raw(frame[mid:], family)])
        reason = (
            f"modelOutput is not JSON of the {family.name} family's shape"
            + (f" (expected {family.expected_shape})" if family.expected_shape else "")
            + "."
        )
        return frame.with_columns(
            *[pl.lit(None, dtype=dtype).alias(n) for n, dtype in family.result_schema.items()],
            pl.lit(reason).alias(_PROBLEM),
        )


def parse_outputs(outputs: list[Path | bytes], family: ModelFamily) -> pl.LazyFrame:
    """One row per record id: the parsed result or the record's error (success wins duplicates).

    A record succeeds only when its modelOutput holds everything its family must return
    (`ModelFamily.problem_expr`); otherwise it becomes an UnparseableOutput row that keeps
    the raw modelOutput. No line, however malformed, fails the merge: the outputs are parsed
    here, by the fast strict plan or, when that cannot decode them, by the lenient one.
    """
    lines = _scan(outputs).with_row_index("__n")
    try:
        frame = _with_raw(_strict_lines(lines, family).collect(), lines)
    except pl.exceptions.ComputeError:
        frame = _lenient_lines(lines.collect(), family)
    answered = pl.col(_HAS_OUTPUT) & pl.col("__code").is_null()
    ok = answered & pl.col(_PROBLEM).is_null()
    unparseable = answered | ~pl.col(_LINE_OK)
    return (
        frame.lazy()
        .select(
            pl.col("recordId").alias(C.RECORD_ID),
            *[pl.col(name) for name in family.result_schema],
            pl.when(ok)
            .then(None)
            .when(unparseable)
            .then(pl.lit(C.UNPARSEABLE_OUTPUT))
            .otherwise(pl.coalesce(pl.col("__code"), pl.lit(C.INVALID_OUTPUT)))
            .alias(C.ERROR_CODE),
            pl.when(ok)
            .then(None)
            .when(~pl.col(_LINE_OK))
            .then(pl.lit("The output line is not valid JSON."))
            .when(unparseable)
            .then(pl.col(_PROBLEM))
            .otherwise(
                pl.coalesce(
                    pl.col("__msg"), pl.lit("The output line has neither modelOutput nor error.")
                )
            )
            .alias(C.ERROR_MESSAGE),
            pl.when(ok)
            .then(None)
            .when(~pl.col(_LINE_OK))
            .then(pl.col(LINE))
            .when(unparseable)
            .then(pl.col(_RAW))
            .alias(C.RAW_OUTPUT),
            ok.alias(_OK),
        )
        .sort(_OK, descending=True, maintain_order=True)
        .unique(C.RECORD_ID, keep="first", maintain_order=True)
        .drop(_OK)
        .with_columns(pl.lit(True).alias(_MATCHED))
    )


def merged_frame(
    rows: pl.LazyFrame,
    outputs: list[Path | bytes],
    family: ModelFamily,
    job_id: str | None = None,
    job_error: tuple[str, str] | None = None,
) -> pl.LazyFrame:
    """The shard's input rows left-joined with their outputs, with status columns filled in."""
    if job_error is not None:
        code, message = job_error
    else:
        code = C.MISSING_OUTPUT
        message = "No output line for this record in the job's output" + (
            f" (job {job_id})." if job_id else "."
        )
    input_columns = rows.collect_schema().names()
    matched = pl.col(_MATCHED).fill_null(False)
    schema = result_schema(family)
    return (
        rows.join(parse_outputs(outputs, family), on=C.RECORD_ID, how="left", maintain_order="left")
        .with_columns(
            pl.when(matched).then(pl.col(C.ERROR_CODE)).otherwise(pl.lit(code)).alias(C.ERROR_CODE),
            pl.when(matched)
            .then(pl.col(C.ERROR_MESSAGE))
            .otherwise(pl.lit(message))
            .alias(C.ERROR_MESSAGE),
            pl.lit(job_id, dtype=pl.String).alias(C.JOB_ID),
            pl.lit(C.SERVED_BATCH).alias(C.SERVED_BY),
            pl.lit(1, dtype=pl.Int32).alias(C.ATTEMPTS),
        )
        .select(
            *[c for c in input_columns],
            *[pl.col(name).cast(dtype) for name, dtype in schema.items()],
        )
    )


def _write_atomic(frame: pl.DataFrame, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        frame.write_parquet(tmp, compression="zstd", compression_level=1, statistics=False)


def write_part(frame: pl.DataFrame, dest: Path) -> MergeStats:
    """Write a merged part atomically and count what it holds."""
    _write_atomic(frame, dest)
    return _stats(frame)


def _stats(frame: pl.DataFrame) -> MergeStats:
    has_output = C.OUTPUT_TOKENS in frame.columns
    row = frame.select(
        pl.len().alias("records"),
        pl.col(C.ERROR_CODE).is_null().sum().alias("succeeded"),
        pl.col(C.INPUT_TOKENS).sum().alias("input_tokens"),
        (pl.col(C.OUTPUT_TOKENS).sum() if has_output else pl.lit(0)).alias("output_tokens"),
    ).row(0, named=True)
    return MergeStats(
        records=row["records"],
        succeeded=row["succeeded"],
        failed=row["records"] - row["succeeded"],
        input_tokens=int(row["input_tokens"] or 0),
        output_tokens=int(row["output_tokens"] or 0),
    )


def merge_shard(
    rows_file: Path,
    outputs: list[Path | bytes],
    model_id: str,
    invocation_type: str,
    dest: Path,
    job_id: str | None = None,
    job_error: tuple[str, str] | None = None,
) -> MergeStats:
    """Write `dest` Parquet: every row of `rows_file` once, with its output or its error.

    Args:
        rows_file: the shard's rows Parquet written by preprocess.
        outputs: the job's `.out` JSONL files (paths or their bytes); may be empty.
        model_id: the model the job ran, to pick the output parser.
        invocation_type: "InvokeModel" or "Converse".
        dest: Parquet file to write (atomically: a temp file, then a rename).
        job_id: the Bedrock job id, written to the job_id column.
        job_error: (code, message) for rows without output, e.g. a Failed or Expired job.

    Returns:
        Counts of records, successes, failures and tokens.
    """
    family = family_for(model_id, invocation_type)
    # The whole shard is needed in memory (for the write and the counts) anyway; the in-memory
    # engine takes about a tenth less CPU than streaming here.
    frame = merged_frame(
        pl.scan_parquet(rows_file), outputs, family, job_id=job_id, job_error=job_error
    ).collect()
    return write_part(frame, dest)


def merge_skipped(rows_file: Path, model_id: str, invocation_type: str, dest: Path) -> MergeStats:
    """Write the rows preprocess skipped (on_missing="skip") with the output's columns."""
    family = family_for(model_id, invocation_type)
    rows = pl.scan_parquet(rows_file)
    names = rows.collect_schema().names()
    schema = result_schema(family)
    frame = (
        rows.with_columns(
            pl.lit(C.SERVED_SKIPPED).alias(C.SERVED_BY), pl.lit(0, dtype=pl.Int32).alias(C.ATTEMPTS)
        )
        .select(
            *[c for c in names if c not in schema],
            *[
                (pl.col(n) if n in names or n in (C.SERVED_BY, C.ATTEMPTS) else pl.lit(None))
                .cast(dtype)
                .alias(n)
                for n, dtype in schema.items()
            ],
        )
        .collect()
    )
    return write_part(frame, dest)


def merge_offline(
    run_dir: Path, outputs_dir: Path, on_part: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Merge the `*.jsonl.out` files under `outputs_dir` onto the shards of `run_dir`.

    Outputs are found at any depth (Bedrock writes `<jobId>/<input file>.out`) and matched to
    shards by input file name; the job id is the folder they sit in. A shard without output
    gets MissingOutput errors, so every input row is in `run_dir/output/`. ``on_part`` is
    called with (parts done, parts in all) as each part is written, for progress.

    Returns:
        The Parquet files written: `output/part-NNNNN.parquet` per shard, plus
        `output/skipped.parquet` when preprocess skipped rows.
    """
    run_dir, outputs_dir = Path(run_dir), Path(outputs_dir)
    plan = RunPlan.load(run_dir)
    if not outputs_dir.is_dir():
        msg = f"Outputs folder {outputs_dir} does not exist; point --outputs at the job outputs."
        raise PlanError(msg)
    by_name = {output_file_name(s.input_file): s for s in plan.shards}
    found: dict[int, list[Path]] = {}
    job_ids: dict[int, str] = {}
    for path in sorted(outputs_dir.rglob(f"*{JSONL}{OUT_SUFFIX}")):
        shard = by_name.get(path.name)
        if shard is None:
            logger.warning("%s matches no shard of %s; skipped", path, run_dir)
            continue
        found.setdefault(shard.index, []).append(path)
        if path.parent != outputs_dir:
            job_ids[shard.index] = path.parent.name
    if not found:
        msg = (
            f"No output under {outputs_dir} matches the shards of {run_dir} (expected files "
            f"named like {next(iter(by_name), output_file_name(input_file(shard_name(0))))})."
        )
        raise PlanError(msg)
    written = [run_dir / OUTPUT_DIR / part_name(shard.index) for shard in plan.shards]
    # One shard's plan does not keep every core busy (decoding, joining and writing Parquet
    # are partly serial), so shards are merged side by side; memory grows with the workers,
    # not with the number of shards.
    with ThreadPoolExecutor(max_workers=_MERGE_WORKERS, thread_name_prefix="merge") as pool:
        merges = [
            pool.submit(
                merge_shard,
                run_dir / shard.rows_file,
                found.get(shard.index, []),
                plan.model_id,
                plan.invocation_type,
                dest,
                job_id=job_ids.get(shard.index),
            )
            for shard, dest in zip(plan.shards, written, strict=True)
        ]
        try:
            for done, merge in enumerate(merges, start=1):
                merge.result()
                if on_part:
                    on_part(done, len(merges))
        except BaseException:
            for merge in merges:
                merge.cancel()
            raise
    if plan.skipped_file:
        dest = run_dir / OUTPUT_DIR / SKIPPED_FILE
        merge_skipped(run_dir / plan.skipped_file, plan.model_id, plan.invocation_type, dest)
        written.append(dest)
    return written
