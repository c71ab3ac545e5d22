"""Parse Bedrock batch output lines strictly per model family, without ever failing a shard.

A record succeeds only when its family's required fields parse; anything else becomes an
UnparseableOutput row that keeps the raw modelOutput (DESIGN: strict results).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tasks.bedrock.families import ModelFamily
from tasks.files import LINE, scan_lines
from tasks.pipeline import columns as C
from tasks.pipeline.structured import OutputSchema, apply_schema

# The engine that joins parsed outputs onto a shard's rows (merge and settle). Polars 2 runs
# `collect()` on its streaming engine by default, which suits the parse (a file's lines are
# cut and decoded a batch at a time); joining a Titan v2 shard's outputs (50k x 1024 floats)
# it peaked at 1.05 GB of RSS against 0.57 GB in memory, and took 0.29-0.32 s against 0.16-0.18.
JOIN_ENGINE = "in-memory"
ERROR_DTYPE = pl.Struct({"errorCode": pl.String, "errorMessage": pl.String})
_OK = "__ok"
MATCHED = "__matched"
# How many lines of one attempt's outputs named the line's record id (1 but for repeats).
REPEATS = "__repeats"
# An on-demand answer's line keeps the token counts of its InvokeModel response's headers
# here, {"input": n, "output": m} (`tasks.aws.on_demand.header_tokens`): the row's tokens where
# the modelOutput counts none (Cohere Embed). Batch output lines have no such key.
HEADER_TOKENS = "headerTokenCounts"
_HEADER_DTYPE = pl.Struct({"input": pl.Int64, "output": pl.Int64})
_HEADER_IN = "__header_in"
_HEADER_OUT = "__header_out"


def result_schema(family: ModelFamily, output_schema: OutputSchema | None = None) -> dict:
    """The columns merge adds after the input columns and record_id, with their dtypes."""
    typed = output_schema.columns if output_schema is not None else {}
    return {
        **family.result_schema,
        **typed,
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
_TOP_DTYPE = pl.Struct({"recordId": pl.String, "error": ERROR_DTYPE, HEADER_TOKENS: _HEADER_DTYPE})
_RECORD_ID_PATTERN = r'"recordId"\s*:\s*"([^"\\]*)"'


def _scan(outputs: list[Path | bytes]) -> pl.LazyFrame:
    scans = [
        scan_lines(out) for out in outputs if not isinstance(out, bytes | bytearray) or out.strip()
    ]
    if not scans:
        return pl.LazyFrame(schema={LINE: pl.String})
    return pl.concat(scans, how="vertical")


_TOOL = "__tool"
_SHORT = "__short"
_HEAD = r'^\{"recordId":"[^"\\]*"$'


# Polars up to 2.1 gives `str.find` offsets in bytes; 2.2 in characters, "the same unit as
# `slice`" (its docstring). Asked once: a byte offset cut as characters (or the reverse) lands
# inside a multi-byte character or the echo, and every line with non-ASCII text in its echo
# went to the lenient plan (seen on 2.2.0 with "é 😀": `invalid utf8`).
_FIND_COUNTS_BYTES = pl.select(pl.lit("é,").str.find(",", literal=True)).item() == 2


def _without_model_input(line: pl.Expr) -> pl.Expr:
    """The line without its echoed modelInput, when it can be cut out safely; else the line.

    The echo is most of a line's bytes and nothing we read, so cutting it roughly halves the
    decode. The cut runs from the `,"modelInput":` right after the recordId to the first
    `,"modelOutput":` (else the first `,"error":{"errorCode":`, so that a tool schema in the echo
    naming an "error" property is passed over): a `,"` never occurs inside a JSON string (its
    quote would be escaped), so both are keys. Should the end be a key nested in the echo, the
    cut leaves unbalanced braces, the strict decode fails and the lenient plan reads the whole
    lines. Other shapes (spaces, key orders) are decoded whole.
    """
    start = line.str.find(',"modelInput":', literal=True)
    end = pl.coalesce(
        line.str.find(',"modelOutput":', literal=True),
        line.str.find(',"error":{"errorCode":', literal=True),
    )
    if _FIND_COUNTS_BYTES:  # cut the bytes: no walk over the characters before the offset
        raw = line.cast(pl.Binary)
        head = raw.bin.slice(0, start).cast(pl.String)
        tail = raw.bin.slice(end).cast(pl.String)
    else:
        head, tail = line.str.slice(0, start), line.str.slice(end)
    cut = start.is_not_null() & (end > start) & head.str.contains(_HEAD)
    return pl.when(cut).then(pl.concat_str([head, tail])).otherwise(line)


def _tool_input(line: pl.Expr, family: ModelFamily, structured: bool) -> pl.Expr:
    """A forced tool call's input object (JSON text) from the output line, when asked for."""
    if not structured or family.tool_input_path is None:
        return pl.lit(None, dtype=pl.String).alias(_TOOL)
    return line.str.json_path_match("$.modelOutput" + family.tool_input_path[1:]).alias(_TOOL)


def _with_tool_text(frame, family: ModelFamily):
    """A tool call's input stands in for the text of an answer made only of that call."""
    if family.is_embedding:
        return frame.drop(_TOOL)
    return frame.with_columns(pl.coalesce(C.RESPONSE_TEXT, _TOOL).alias(C.RESPONSE_TEXT)).drop(
        _TOOL
    )


def _strict_lines(
    lines: pl.LazyFrame, family: ModelFamily, structured: bool = False
) -> pl.LazyFrame:
    """The fast plan: one strict, typed decode of every line, lazily and in parallel.

    The echoed modelInput is cut out first (`_without_model_input`) or else skipped by the
    dtype; the raw modelOutput text is not kept here (see `_with_raw`). Families whose models
    answer in several shapes decode it from its text.
    """
    lines = lines.with_columns(_without_model_input(pl.col(LINE)).alias(_SHORT))
    line = pl.col(_SHORT)
    if type(family).decode_raw is ModelFamily.decode_raw:
        dtype = pl.Struct(
            {
                "recordId": pl.String,
                "modelOutput": family.output_dtype,
                "error": ERROR_DTYPE,
                HEADER_TOKENS: _HEADER_DTYPE,
            }
        )
        decoded = pl.col("__top").struct.field("modelOutput")
        top = lines.select(
            "__n", line.str.json_decode(dtype).alias("__top"), _tool_input(line, family, structured)
        )
    else:
        decoded = family.decode_raw(line.str.json_path_match("$.modelOutput"))
        top = lines.select(
            "__n",
            line.str.json_decode(_TOP_DTYPE).alias("__top"),
            line,
            _tool_input(line, family, structured),
        )
    error = pl.col("__top").struct.field("error")
    counts = pl.col("__top").struct.field(HEADER_TOKENS)
    return (
        top.select(
            "__n",
            pl.col("__top").struct.field("recordId"),
            error.struct.field("errorCode").alias("__code"),
            error.struct.field("errorMessage").alias("__msg"),
            counts.struct.field("input").alias(_HEADER_IN),
            counts.struct.field("output").alias(_HEADER_OUT),
            decoded.alias(_DECODED),
            _TOOL,
        )
        .with_columns(
            pl.col(_DECODED).is_not_null().alias(_HAS_OUTPUT),
            pl.lit(True).alias(_LINE_OK),
            pl.lit(None, dtype=pl.String).alias(LINE),
            *family.parse_exprs(pl.col(_DECODED)),
        )
        .pipe(_with_tool_text, family)
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


def _lenient_lines(
    lines: pl.DataFrame, family: ModelFamily, structured: bool = False
) -> pl.DataFrame:
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
        *(
            line.str.json_path_match(f"$.{HEADER_TOKENS}.{key}")
            .cast(pl.Int64, strict=False)
            .alias(name)
            for key, name in (("input", _HEADER_IN), ("output", _HEADER_OUT))
        ),
        line.str.json_path_match("$.modelOutput").alias(_RAW),
        record_id.is_not_null().alias(_LINE_OK),
        pl.when(record_id.is_null()).then(line).alias(LINE),
        _tool_input(line, family, structured),
    )
    top = top.with_columns(pl.col(_RAW).is_not_null().alias(_HAS_OUTPUT))
    answered = pl.col(_HAS_OUTPUT) & pl.col("__code").is_null()
    nulls = [pl.lit(None, dtype=dtype).alias(n) for n, dtype in family.result_schema.items()]
    rest = top.filter(~answered).with_columns(*nulls, pl.lit(None, pl.String).alias(_PROBLEM))
    good = top.filter(answered)
    if not good.height:
        return rest
    good = (
        _parse_raw(good, family)
        .pipe(_with_tool_text, family)
        .with_columns(pl.coalesce(pl.col(_PROBLEM), family.problem_expr()).alias(_PROBLEM))
    )
    rest = rest.drop(_TOOL)
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


def parse_outputs(
    outputs: list[Path | bytes], family: ModelFamily, output_schema: OutputSchema | None = None
) -> pl.LazyFrame:
    """One row per record id: the parsed result or the record's error (success wins duplicates).

    A line whose recordId cannot be read (one cut short: Bedrock writes the id last) is kept
    with a null record id, so that the merge can count it among the lines that reached no row.

    A record succeeds only when its modelOutput holds everything its family must return
    (`ModelFamily.problem_expr`); otherwise it becomes an UnparseableOutput row that keeps
    the raw modelOutput. No line, however malformed, fails the merge: the outputs are parsed
    here, by the fast strict plan or, when that cannot decode them, by the lenient one.
    """
    lines = _scan(outputs).with_row_index("__n")
    structured = output_schema is not None
    try:
        frame = _with_raw(_strict_lines(lines, family, structured).collect(), lines)
    except pl.exceptions.ComputeError:
        frame = _lenient_lines(lines.collect(), family, structured)
    answered = pl.col(_HAS_OUTPUT) & pl.col("__code").is_null()
    # A refusal or a filtered answer is the error that stopped it, even with text (a notice
    # in the answer's place, or what was written before), and is checked before the shape
    # (a refusal may have no text at all).
    stop = pl.col(C.STOP_REASON) if C.STOP_REASON in family.result_schema else pl.lit(None)
    filtered = answered & stop.is_in(list(family.filtered_stop_reasons)).fill_null(False)
    ok = answered & pl.col(_PROBLEM).is_null() & ~filtered
    unparseable = answered | ~pl.col(_LINE_OK)
    header = {C.INPUT_TOKENS: _HEADER_IN, C.OUTPUT_TOKENS: _HEADER_OUT}
    parsed = frame.lazy().select(
        pl.col("recordId").alias(C.RECORD_ID),
        *[
            # An answer's header counts stand in where its body counts no tokens; an error
            # line's stay out (they are the failed call's, if any).
            pl.coalesce(name, pl.when(answered).then(pl.col(header[name]))).alias(name)
            if name in header
            else pl.col(name)
            for name in family.result_schema
        ],
        pl.when(ok)
        .then(None)
        .when(filtered)
        .then(pl.lit(C.CONTENT_FILTERED))
        .when(unparseable)
        .then(pl.lit(C.UNPARSEABLE_OUTPUT))
        .otherwise(pl.coalesce(pl.col("__code"), pl.lit(C.INVALID_OUTPUT)))
        .alias(C.ERROR_CODE),
        pl.when(ok)
        .then(None)
        .when(filtered)
        .then(
            pl.concat_str(
                pl.lit("The model refused, or a content filter stopped the answer (stop reason '"),
                stop,
                pl.lit(
                    "'); response_text holds what was written before, if anything. Not "
                    "retried: the same request would be refused again."
                ),
            )
        )
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
        pl.when(ok | filtered)
        .then(None)
        .when(~pl.col(_LINE_OK))
        .then(pl.col(LINE))
        .when(unparseable)
        .then(pl.col(_RAW))
        .alias(C.RAW_OUTPUT),
        ok.alias(_OK),
    )
    if frame.get_column("recordId").n_unique() < frame.height:
        # A record id Bedrock wrote twice (AWS documents one line a record): its first success
        # wins, and the repeats are counted for the merge's warning. Sorting and grouping copy
        # every column, so a file without repeats (the usual case) skips both. Lines without a
        # record id are not one record's: each is kept, to be counted.
        ids = pl.col(C.RECORD_ID)
        parsed = (
            parsed.with_columns(
                pl.when(ids.is_null())
                .then(1)
                .otherwise(pl.len().over(ids))
                .cast(pl.UInt32)
                .alias(REPEATS)
            )
            .sort(_OK, descending=True, maintain_order=True)
            .filter(ids.is_null() | ids.is_first_distinct())
        )
    else:
        parsed = parsed.with_columns(pl.lit(1, pl.UInt32).alias(REPEATS))
    parsed = parsed.drop(_OK).with_columns(pl.lit(True).alias(MATCHED))
    if output_schema is None:
        return parsed
    # Validated fields become typed columns; answers that do not fit the schema fail here.
    return apply_schema(parsed.collect(), output_schema).lazy()
