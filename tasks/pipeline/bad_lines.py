"""The first line of a CSV or JSONL file that cannot be read, named for the error message.

Polars reports a bad CSV or JSONL line by a byte offset or a character of some line, and
suggests options of its own (``truncate_ragged_lines``, ``ignore_errors``, ...) that a user of
this project cannot set. On that error path only, the file is read again with Python's ``csv``
and ``json``, which count lines, so the message can name the line and the fix. Nothing here runs
when a source reads cleanly.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from typing import BinaryIO

# Polars' own advice, cut from its messages: the options it names are not ours to set.
_POLARS_ADVICE = re.compile(
    r"\s*(Consider setting|You might want to try:|This error occurred with the following context)"
    r".*",
    re.DOTALL,
)
_ORIGINAL = re.compile(r"Original error: ```(.*?)```", re.DOTALL)
_OFFSET = re.compile(r"\s*The current offset in the file is \d+ bytes\.?")
# A value that does not fit the type `csv_types="infer"` guessed from the first rows.
_TYPED_VALUE = re.compile(r"could not parse `.*` as dtype `(?!str`)")
_FIELD_LIMIT = 1 << 30
# A \uD800-\uDFFF escape: half of a UTF-16 pair, a character only beside its other half.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def polars_reason(exc: Exception) -> str:
    """Polars' message without its advice: its first words, else its `Original error`."""
    text = str(exc).strip()
    lead = _OFFSET.sub("", _POLARS_ADVICE.sub("", text)).strip()
    if lead and not lead.startswith("Original error"):
        return lead
    original = _ORIGINAL.search(text)
    return original.group(1).strip() if original else text


def inferred_type_hint(reason: str) -> str:
    """What to do when a CSV value does not fit its guessed type ("" for other reasons)."""
    if not _TYPED_VALUE.search(reason):
        return ""
    return (
        '. With csv_types="infer" a column\'s type is guessed from its first 10,000 rows and a '
        'later value that does not fit stops the read: keep the default csv_types="text" '
        "(values as written), or fix that value"
    )


def _buffered(stream: BinaryIO) -> BinaryIO:
    """A stream from S3 read into a buffer; a local file is buffered already."""
    return stream if hasattr(stream, "peek") else io.BufferedReader(stream, 1 << 20)


def _csv_text(stream: BinaryIO) -> io.TextIOWrapper:
    """The CSV's text for Python's csv reader, its field limit raised to a value's size."""
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    return io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")


def first_bad_line(stream: BinaryIO, fmt: str) -> str | None:
    """What is wrong with the first unreadable line of a `fmt` stream, or None if none is."""
    buffered = _buffered(stream)
    with buffered:
        if fmt == "csv":
            return _first_bad_csv_line(buffered)
        if fmt == "jsonl":
            return _first_bad_json_line(buffered)
    return None


def _first_bad_csv_line(stream: BinaryIO) -> str | None:
    # Records, not lines: a quoted value may span lines, so a record's first line is tracked.
    with _csv_text(stream) as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return "the file is empty, without even a header line"
        except csv.Error as exc:
            return f"line 1 (the header) is not valid CSV ({exc}); fix it and run again"
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return None
            except csv.Error as exc:
                return (
                    f"the record that starts on line {start} is not valid CSV ({exc}): close "
                    'the quote opened there, or double a quote inside a quoted value ("")'
                )
            if len(record) > len(header):
                return (
                    f"line {start} has {len(record)} fields where the header has "
                    f"{len(header)}: quote the values there that hold a comma"
                )
            start = reader.line_num + 1


def _kind(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a value"


class _NotJson(Exception):
    """A constant Python's json reads and JSON has not (NaN, Infinity)."""


def _not_json(constant: str) -> None:
    raise _NotJson(constant)


def _first_bad_json_line(stream: BinaryIO) -> str | None:
    # A key must keep one shape (object, array or plain value) on every line for one column.
    shapes: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(stream, 1):
        if number == 1 and line.startswith(codecs.BOM_UTF8):  # Python's json skips it, Polars not
            return (
                "line 1 starts with a byte order mark (BOM), which the JSONL reader refuses: "
                "save the file as UTF-8 without BOM"
            )
        if not line.strip():
            continue
        try:
            # NaN and Infinity are Python's extension (json.dumps writes them), not JSON.
            value = json.loads(line, parse_constant=_not_json)
        except _NotJson as exc:
            return (
                f"line {number} has {exc.args[0]}, which is not JSON: write null for a missing "
                "number (json.dumps(..., allow_nan=False) catches it when writing)"
            )
        except ValueError as exc:
            reason = getattr(exc, "msg", str(exc)).removesuffix(" at")
            where = f" at column {exc.colno}" if hasattr(exc, "colno") else ""
            return f"line {number} is not JSON ({reason}{where}): write one object per line"
        if not isinstance(value, dict):
            return f"line {number} is {_kind(value) or 'null'}: write one object per line"
        for key, item in value.items():
            kind = _kind(item)
            if kind is None:
                continue
            seen = shapes.setdefault(key, (kind, number))
            if seen[0] != kind:
                return (
                    f"line {number} has {kind} under {key!r} where line {seen[1]} has "
                    f"{seen[0]}: give a key one shape on every line"
                )
    return None


def first_lone_surrogate(stream: BinaryIO) -> str | None:
    """Where the first JSONL value holding half a UTF-16 surrogate pair is, or None.

    JSON may escape one half of a pair alone (`"\\ud83d"`: text cut inside an emoji by a
    UTF-16 tool, or Python's json.dumps of such text); UTF-8 text cannot hold it, and Polars
    reads it as U+0000. Run only when a JSONL source's text holds U+0000, to tell such a value
    from a genuine `\\u0000`.
    """
    buffered = _buffered(stream)
    with buffered:
        for number, line in enumerate(buffered, 1):
            if not _SURROGATE_ESCAPE.search(line):
                continue
            try:
                found = _lone_surrogate(json.loads(line), "")
            except ValueError:
                continue  # not JSON: the reader refuses it with its own message
            if found:
                key, char = found
                return (
                    f"line {number} has half a UTF-16 surrogate pair (\\u{ord(char):04x}) in "
                    f"{key!r}"
                )
    return None


def _lone_surrogate(value: object, key: str) -> tuple[str, str] | None:
    """The key and character of the first lone surrogate in a decoded JSON value (the decoder
    joins a pair into one character, so any surrogate left is alone)."""
    if isinstance(value, str):
        char = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
        return (key, char) if char else None
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return None
    for name, item in items:
        found = _lone_surrogate(item, f"{key}.{name}" if key else str(name))
        if found:
            return found
    return None


# 2^53 has 16 digits: an integer of fewer digits is exact in a Float64.
_LONG_DIGITS = re.compile(rb"\d{16}")
_INTEGER_TEXT = re.compile(r"[+-]?\d{16,}")


def _inexact(value: int) -> bool:
    """Whether a Float64 cannot hold `value` exactly."""
    try:
        return int(float(value)) != value
    except OverflowError:
        return True


def first_inexact_integer(stream: BinaryIO, fmt: str, columns: list[str]) -> str | None:
    """Where the first integer of `columns` that a Float64 cannot hold is, or None.

    A JSONL key (or a CSV column read with ``csv_types="infer"``) holding decimals beside
    integers is read as Float64, which holds integers exactly only up to 2^53: an id such as
    9007199254740993 became 9007199254740992.0 in the prompt and the output. Run only when such
    a column holds a value of that size, to tell a rounded integer from a large float.
    """
    buffered = _buffered(stream)
    with buffered:
        if fmt == "jsonl":
            return _inexact_json(buffered, columns)
        if fmt == "csv":
            return _inexact_csv(buffered, columns)
    return None


def _inexact_json(stream: BinaryIO, columns: list[str]) -> str | None:
    for number, line in enumerate(stream, 1):
        if not _LONG_DIGITS.search(line):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not JSON: the reader refuses it with its own message
        if not isinstance(record, dict):
            continue
        for column in columns:
            value = record.get(column)
            if type(value) is int and _inexact(value):
                return _inexact_message(number, column, value)
    return None


def _inexact_csv(stream: BinaryIO, columns: list[str]) -> str | None:
    with _csv_text(stream) as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        at = [(i, name) for i, name in enumerate(header) if name in columns]
        start = reader.line_num + 1
        for record in reader:
            for i, column in at:
                text = record[i].strip() if i < len(record) else ""
                if _INTEGER_TEXT.fullmatch(text) and _inexact(int(text)):
                    return _inexact_message(start, column, int(text))
            start = reader.line_num + 1
    return None


def _inexact_message(line: int, column: str, value: int) -> str:
    try:
        read = repr(float(value))
    except OverflowError:
        read = "inf"
    return f"line {line} has the integer {value} in {column!r}, which would be read as {read}"
