"""Checks of the input before anything is written or spent; each error names the fix."""

from __future__ import annotations

import polars as pl

from prompt_templates import PromptTemplate, get_template
from tasks.bedrock.families import ModelFamily
from tasks.errors import (
    DuplicateIdError,
    InputValidationError,
    MissingColumnsError,
    RecordTooLargeError,
)
from tasks.pipeline import columns as C
from tasks.pipeline.lines import ROW, record_id_expr
from tasks.pipeline.sources import read_error

DEFAULT_TEXT_COLUMN = "input_text"
SHOW_IDS = 5
_BLANK = "__rows_empty_in_every_column"
RESERVED_COLUMNS = (
    C.RECORD_ID,
    C.RESPONSE_TEXT,
    C.STOP_REASON,
    C.INPUT_TOKENS,
    C.OUTPUT_TOKENS,
    C.EMBEDDING,
    *C.STATUS_COLUMNS,
)
# Types a prompt can be rendered from: a list or a struct has no single text form.
_NESTED = (pl.List, pl.Array, pl.Struct, pl.Object)
# Nor a duration: Polars cannot cast it to text (a traceback before). Binary stays: Parquet
# writers such as older Spark store text as plain BINARY, read back as bytes of UTF-8.
_NO_TEXT = (pl.Duration,)


def template_for(
    prompt_id: str | None, text_column: str | None, family: ModelFamily
) -> PromptTemplate:
    """The prompt template of a run: a named one, or the text column sent verbatim."""
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


def check_columns(
    schema: pl.Schema,
    needed: tuple[str, ...],
    id_column: str | None,
    prompt: str,
    answer_fields: list[str] | tuple[str, ...] = (),
) -> None:
    """The columns the prompt and id need exist, can be rendered, and clash with no output.

    ``answer_fields``: the typed columns the template's output schema adds to the output.
    """
    found = list(schema.names())
    missing = [c for c in needed if c not in schema]
    if missing:
        msg = (
            f"The source has no column {', '.join(repr(c) for c in missing)}, which {prompt} "
            f"needs. Columns found: {', '.join(repr(c) for c in found) or '(none)'}. Rename the "
            "column in the source, or pick a template / text_column that matches it."
        )
        separator = _other_separator(found, missing)
        if separator:
            msg += (
                f" The header looks separated by {separator!r}: CSV sources are read with "
                "commas; save the file with commas, or as Parquet."
            )
        raise MissingColumnsError(msg)
    nested = [f"{c!r} ({schema[c]})" for c in needed if isinstance(schema[c], _NESTED)]
    if nested:
        msg = (
            f"Column(s) {', '.join(nested)} used by {prompt} hold lists or structs, which have no "
            "single text form. Flatten them into a text column first (e.g. join a list), or "
            "name a field with its own column."
        )
        raise InputValidationError(msg)
    untyped = [f"{c!r} ({schema[c]})" for c in needed if isinstance(schema[c], _NO_TEXT)]
    if untyped:
        msg = (
            f"Column(s) {', '.join(untyped)} used by {prompt} have no text form to put in a "
            "prompt. Convert them to a text column first (write a duration as text)."
        )
        raise InputValidationError(msg)
    if id_column is not None and id_column not in schema:
        msg = f"id_column {id_column!r} is not in the source. Columns found: {', '.join(found)}."
        raise MissingColumnsError(msg)
    # A source column named like a schema field made every shard's merge fail, after its
    # job was paid (a duplicate output name), on every re-run too.
    fields = [c for c in found if c in answer_fields]
    if fields:
        msg = (
            f"The source has column(s) {', '.join(repr(c) for c in fields)}, which {prompt}'s "
            "output schema also writes (a field of the answer). Rename the column in the "
            "source, or drop it."
        )
        raise InputValidationError(msg)
    clashes = [c for c in found if c in RESERVED_COLUMNS or c.startswith("__")]
    if clashes:
        msg = (
            f"The source has column(s) {', '.join(clashes)}, which the output writes itself. "
            "Rename or drop them (a user id belongs in id_column)."
        )
        raise InputValidationError(msg)


def _other_separator(found: list[str], missing: list[str]) -> str | None:
    """The separator of a CSV header read as one column ('topic;n') that holds a missing column.

    Spreadsheets in many locales save CSV with semicolons; read with commas, the whole header is
    one column name that holds the column the prompt needs.
    """
    if len(found) != 1:
        return None
    for separator in (";", "\t", "|"):
        if any(c in found[0].split(separator) for c in missing):
            return separator
    return None


def missing_expr(needed: tuple[str, ...], schema: pl.Schema, *, every: bool = False) -> pl.Expr:
    """True for rows with a null or blank value in a column the prompt needs (`every`: in all)."""
    flags = []
    for column in needed:
        value = pl.col(column)
        flag = value.is_null()
        dtype = schema[column]
        if dtype == pl.String:
            flag = flag | (value.str.strip_chars() == "")
        elif isinstance(dtype, pl.Categorical | pl.Enum):  # pandas' "category": text too
            flag = flag | (value.cast(pl.String).str.strip_chars() == "")
        flags.append(flag)
    return pl.all_horizontal(flags) if every else pl.any_horizontal(flags)


def collect(lf: pl.LazyFrame, source: str) -> pl.DataFrame:
    """Collect (streaming), turning Polars' read errors into the project's source errors."""
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.ComputeError as exc:
        raise read_error(exc, source) from None


def first_ids(frame: pl.DataFrame, mask: pl.Expr) -> list[str]:
    """Record ids of the first rows where ``mask`` holds, to show in a message."""
    return (
        frame.filter(mask).head(SHOW_IDS).select(record_id_expr(pl.col(ROW))).to_series().to_list()
    )


def missing_message(
    lf: pl.LazyFrame, needed: tuple[str, ...], schema: pl.Schema, n: int, csv: bool = False
) -> str:
    """Which columns are empty in how many rows, with the first record ids of each.

    ``csv``: the source is CSV, where a row empty in every column is most likely a blank line.
    """
    details = (
        lf.with_row_index(ROW)
        .with_columns(record_id_expr(pl.col(ROW)).alias(C.RECORD_ID))
        .select(
            [
                pl.col(C.RECORD_ID)
                .filter(missing_expr((c,), schema))
                .head(SHOW_IDS)
                .implode()
                .alias(c)
                for c in needed
            ]
            + [missing_expr((c,), schema).sum().alias(f"n_{c}") for c in needed]
            + [missing_expr(tuple(schema.names()), schema, every=True).sum().alias(_BLANK)]
        )
        .collect(engine="streaming")
    )
    parts = []
    for column in needed:
        count = details[f"n_{column}"][0]
        if count:
            ids = ", ".join(details[column][0].to_list())
            parts.append(f"column {column!r}: {count} null or empty (first record ids: {ids})")
    blank = details[_BLANK][0]
    if blank and csv:
        # Polars reads a blank line of a CSV as a row of empty values, where pandas skips it.
        parts.append(
            f"{blank} of these rows are empty in every column (a blank line of a CSV file reads "
            "as such a row: delete blank lines)"
        )
    return (
        f"{n} rows have no value for the prompt: " + "; ".join(parts) + ". Fill them in, or "
        'pass on_missing="skip" to leave them out of the jobs (they still appear in the output '
        "with an error)."
    )


def check_ids(lf: pl.LazyFrame, id_column: str, source: str) -> None:
    """The user's ids are unique and present; compared as text, so 00 and 000 differ."""
    ids = pl.col(id_column).cast(pl.String)
    stats = collect(
        lf.select(
            ids.is_null().sum().alias("nulls"),
            ids.filter(ids.is_duplicated())
            .unique(maintain_order=True)
            .head(SHOW_IDS)
            .implode()
            .alias("dups"),
            ids.is_duplicated().sum().alias("n_dup"),
        ),
        source,
    )
    dups = stats["dups"][0].to_list()
    if dups:
        msg = (
            f"id_column {id_column!r} repeats ids ({stats['n_dup'][0]} rows share an id), e.g. "
            f"{', '.join(repr(d) for d in dups)}. Each row needs its own id so outputs can be "
            "matched; "
            "de-duplicate the source or drop id_column."
        )
        raise DuplicateIdError(msg)
    if stats["nulls"][0]:
        msg = f"id_column {id_column!r} has {stats['nulls'][0]} null ids; fill them in."
        raise DuplicateIdError(msg)


def _over_limit(stats: pl.DataFrame, over: pl.Expr, column: str) -> tuple[list[str], int] | None:
    """The first record ids over a limit and the largest value, or None when none is over."""
    if not stats.select(over.any()).item():
        return None
    return first_ids(stats, over), stats.filter(over)[column].max()


def check_input_chars(stats: pl.DataFrame, ok: pl.Expr, chars: str, family: ModelFamily) -> None:
    """No prompt is over the family's documented input limit."""
    if family.max_input_chars is None:
        return
    found = _over_limit(stats, ok & (pl.col(chars) > family.max_input_chars), chars)
    if found:
        ids, worst = found
        msg = (
            f"Record(s) {', '.join(ids)} have prompts over the {family.name} input limit of "
            f"{family.max_input_chars:,} characters (longest {worst:,}). Shorten or split "
            "those texts before sending them."
        )
        raise RecordTooLargeError(msg)


def check_line_bytes(stats: pl.DataFrame, ok: pl.Expr, size: str, max_bytes: int) -> None:
    """No JSONL line is over the input file limit on its own."""
    found = _over_limit(stats, ok & (pl.col(size) > max_bytes), size)
    if found:
        ids, worst = found
        msg = (
            f"Record(s) {', '.join(ids)} are over the input file limit of {max_bytes:,} "
            f"bytes (largest {worst:,} bytes as a JSONL line). Shorten them, or raise "
            "BEDROCK_BATCH_QUOTA_MAX_FILE_BYTES if your quota allows."
        )
        raise RecordTooLargeError(msg)
