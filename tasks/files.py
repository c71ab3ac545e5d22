"""Local file helpers every package shares: the atomic write and the JSONL line reader."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

LINE = "line"


@contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """A temporary path beside ``dest`` that replaces it only if the block succeeds.

    A reader never sees a half-written file, and a crash leaves the old file (or none).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: Path | str, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically and durably (fsync before the rename)."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def scan_lines(source: Path | str | bytes) -> pl.LazyFrame:
    """The non-empty lines of a JSONL file (or its bytes) as one string column, undecoded.

    JSON escapes every control character, so the 0x01 "separator" never splits a line.
    """
    data = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    return pl.scan_csv(
        data,
        has_header=False,
        separator="\x01",
        quote_char=None,
        schema={LINE: pl.String},
    ).filter(pl.col(LINE).str.strip_chars_end().str.len_bytes() > 0)
