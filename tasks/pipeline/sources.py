"""Load a source (Hugging Face dataset, or CSV / Parquet / JSONL on disk or S3) as a LazyFrame.

Source syntax:

- ``hf://<dataset_id>[?split=<split>&config=<config>]``, e.g.
  ``hf://KaiserWhoLearns/SimpleCoT?split=train``; split defaults to ``train``. Loaded with
  ``datasets.load_dataset`` and handed to Polars through Arrow.
- ``s3://bucket/key.parquet``, ``s3://bucket/prefix/*.jsonl``: read with Polars' object store,
  reaching the same S3 (and endpoint) as boto3.
- A local file, a glob (``data/part-*.csv``) or a folder (every supported file directly in it).

Formats follow the extension: ``.csv``, ``.parquet`` / ``.pq``, ``.jsonl`` / ``.ndjson``; CSV
and JSONL may be compressed (``.csv.gz``, ``.jsonl.zst``), which Polars undoes as it reads.
A file that cannot be read is named with its first bad line (``bad_lines``).

Values reach the prompt and the output as the user wrote them: CSV columns are read as text
(``00007`` stays ``00007``) unless ``csv_types="infer"``; JSONL types come from every line, so a
key first seen late is kept; the files of a glob must have the same columns, and a column
typed differently across them is refused where their common type would change a value.
"""

from __future__ import annotations

import codecs
import glob as globlib
import gzip
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import parse_qs, urlsplit

import polars as pl

from tasks.errors import InputValidationError, SourceEncodingError, SourceError
from tasks.pipeline import bad_lines

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
# Compressed CSV and JSONL that Polars reads and undoes by itself.
COMPRESSIONS = (".gz", ".zst")
_SNIFF_BYTES = 1 << 20
_DUPLICATED = re.compile(r"(.+)_duplicated_\d+")


CsvTypes = Literal["text", "infer"]


def load_source(source: str, csv_types: CsvTypes = "text") -> pl.LazyFrame:
    """A LazyFrame over every row of `source` (see the module docstring for the syntax).

    Args:
        source: ``hf://`` dataset id with query, ``s3://`` URI, or local path / glob / folder.
        csv_types: "text" reads every CSV column as text; "infer" guesses numbers and dates.

    Returns:
        A LazyFrame; nothing is read beyond schemas until it is collected.
    """
    if not isinstance(source, str) or not source.strip():
        msg = "source is empty; give an hf://dataset_id?split=..., an s3:// URI or a local path."
        raise SourceError(msg)
    source = source.strip()
    if source.startswith("hf://"):
        return _load_hf(source)
    if csv_types not in ("text", "infer"):
        msg = f'csv_types={csv_types!r}; use "text" (keep values as written) or "infer".'
        raise SourceError(msg)
    if source.startswith("s3://"):
        return _load_s3(source, csv_types)
    if "://" in source:
        scheme = source.split("://", 1)[0]
        msg = (
            f"source {source!r} has the unsupported scheme {scheme!r}; use hf://, s3:// or a "
            "local path."
        )
        raise SourceError(msg)
    return _load_local(source, csv_types)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """(dataset_id, config, split) from ``hf://<dataset_id>[?split=..&config=..]``."""
    parts = urlsplit(source)
    dataset_id = (parts.netloc + parts.path).strip("/")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"split", "config", "name"})
    if not dataset_id or unknown or any(len(v) != 1 for v in query.values()):
        msg = (
            f"Malformed Hugging Face source {source!r}: write "
            "hf://<owner>/<dataset>?split=<split>&config=<config> (split defaults to train"
            + (f"; unknown keys: {', '.join(unknown)}" if unknown else "")
            + ")."
        )
        raise SourceError(msg)
    config = (query.get("config") or query.get("name") or [None])[0] or None
    split = (query.get("split") or ["train"])[0] or "train"
    return dataset_id, config, split


def hf_local_path(source: str) -> Path | None:
    """The local folder an ``hf://`` source names, if it names one (else a Hub dataset id).

    ``hf:///abs/path``, ``hf://./rel``, ``hf://~/x`` and any existing folder are local: a
    dataset saved with ``save_to_disk``, or a folder of Parquet / Arrow files.
    """
    rest = source[len("hf://") :].split("?", 1)[0]
    if not rest:
        return None
    path = Path(rest).expanduser()
    if rest.startswith(("/", "./", "../", "~")) or path.is_dir():
        return path
    return None


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hub answers; else why not (a closed network fails in ~0 s, not in 26)."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _load_hf_local(path: Path, config: str | None, split: str, source: str):
    import datasets

    if not path.is_dir():
        msg = f"source {source!r}: {path} is not a folder (save_to_disk output or data files)."
        raise SourceError(msg)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                msg = f"{source!r} has splits {', '.join(dataset)}; add ?split=<one of them>."
                raise SourceError(msg)
            dataset = dataset[split]
        return dataset
    for builder, suffix in (("parquet", ".parquet"), ("arrow", ".arrow")):
        files = sorted(str(f) for f in path.rglob(f"*{suffix}"))
        if files:
            try:
                return datasets.load_dataset(builder, data_files={split: files}, split=split)
            except Exception as exc:  # datasets' own errors (files of different schemas...)
                reason = str(exc.__cause__ or exc).strip().splitlines()[0][:500]
                msg = (
                    f"source {source!r}: the {suffix} files under {path} could not be read as "
                    f"one dataset ({type(exc).__name__}: {reason}). Give files of one schema, "
                    "or pass them as a Parquet glob to be told which file differs."
                )
                raise SourceError(msg) from exc
    msg = (
        f"source {source!r}: {path} holds neither a dataset saved with save_to_disk nor "
        ".parquet / .arrow files."
    )
    raise SourceError(msg)


def load_hf_dataset(source: str):
    """The ``datasets.Dataset`` an ``hf://`` source names: a local folder, or the Hub's.

    An unreachable Hub fails at once with the offline switch to use, not after retries.
    """
    import datasets
    from huggingface_hub import constants

    dataset_id, config, split = parse_hf_source(source)
    local = hf_local_path(source)
    if local is not None:
        return _load_hf_local(local, config, split, source)
    if not constants.HF_HUB_OFFLINE:
        reason = _hub_reachable()
        if reason is not None:
            msg = (
                f"Could not reach the Hugging Face Hub for {dataset_id!r} ({reason}). If the "
                "dataset is in the local cache, set HF_HUB_OFFLINE=1 to use it offline; or "
                "save it with save_to_disk and pass hf:///<that folder>; or give the Parquet "
                "files as source."
            )
            raise SourceError(msg)
    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:
        msg = (
            f"Could not load Hugging Face dataset {dataset_id!r} (config={config!r}, "
            f"split={split!r}): {exc}. Check the id, config and split on the Hub, and HF_TOKEN "
            "for gated datasets."
        )
        raise SourceError(msg) from exc
    if isinstance(dataset, datasets.DatasetDict):
        msg = f"{source!r} names no single split; add ?split=<one of {', '.join(dataset)}>."
        raise SourceError(msg)
    return dataset


def _load_hf(source: str) -> pl.LazyFrame:
    return _arrow_frame(load_hf_dataset(source))


def _arrow_frame(dataset) -> pl.LazyFrame:
    # The Arrow table behind the dataset (memory-mapped from the cache): no row loop, no copy.
    table = dataset.flatten_indices().data.table if dataset._indices else dataset.data.table
    frame = pl.from_arrow(table, rechunk=False)
    if isinstance(frame, pl.Series):
        frame = frame.to_frame()
    return frame.lazy()


def file_format(name: str) -> str | None:
    """The format a file name's extension says (``x.csv.gz`` is CSV), or None."""
    suffixes = [s.lower() for s in Path(name.split("?", 1)[0]).suffixes]
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSIONS and suffixes[-2] in FORMATS:
        fmt = FORMATS[suffixes[-2]]
        return None if fmt == "parquet" else fmt
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _format_of(path: str, source: str) -> str:
    fmt = file_format(path)
    if fmt is None:
        suffix = "".join(Path(path.split("?", 1)[0]).suffixes[-2:]).lower()
        msg = (
            f"source {source!r}: unknown file extension {suffix or '(none)'!r}; supported "
            f"extensions: {', '.join(FORMATS)}, and .csv / .jsonl / .ndjson compressed with "
            f"{' or '.join(COMPRESSIONS)}."
        )
        raise SourceError(msg)
    return fmt


def _scan(
    fmt: str, paths: str | list[str], storage_options: dict | None, csv_types: CsvTypes
) -> pl.LazyFrame:
    if fmt == "parquet":
        return pl.scan_parquet(paths, storage_options=storage_options)
    if fmt == "csv":
        # Empty fields stay empty strings so validation can tell them from missing values.
        return pl.scan_csv(
            paths,
            storage_options=storage_options,
            empty_string_is_null=False,
            infer_schema=csv_types == "infer",
            infer_schema_length=10_000,
        )
    # Types from every line: a key that first appears late is a column, not dropped.
    return pl.scan_ndjson(paths, storage_options=storage_options, infer_schema_length=None)


def _scan_files(
    fmt: str,
    files: list[str],
    source: str,
    csv_types: CsvTypes,
    storage_options: dict | None = None,
) -> pl.LazyFrame:
    """One scan per file, refused with the files and columns named when their columns differ."""
    if len(files) == 1:
        return _scan(fmt, files, storage_options, csv_types)
    scans = [_scan(fmt, f, storage_options, csv_types) for f in files]
    schemas: list[pl.Schema] = []
    for file, scan in zip(files, scans, strict=True):
        try:
            schemas.append(scan.collect_schema())
        except pl.exceptions.PolarsError as exc:
            if _is_empty(file):  # Polars: "Cannot infer NDJSON types on empty reader"
                msg = (
                    f"The file {file!r} of source {source!r} is empty: remove it, or give a "
                    "glob that leaves it out."
                )
                raise SourceError(msg) from None
            raise read_error(exc, source) from None
    columns = [schema.names() for schema in schemas]
    first = set(columns[0])
    for file, names in zip(files[1:], columns[1:], strict=True):
        if set(names) != first:
            extra = sorted(set(names) - first)
            lacking = sorted(first - set(names))
            msg = (
                f"The files of source {source!r} do not have the same columns: {file!r} "
                + (f"has {', '.join(extra)} " if extra else "")
                + ("and " if extra and lacking else "")
                + (f"lacks {', '.join(lacking)} " if lacking else "")
                + f"compared with {files[0]!r} ({', '.join(columns[0])}). Give one set of "
                "files with the same columns per run."
            )
            raise SourceError(msg)
    # Columns matched by name; a column typed differently across files takes a common type,
    # as long as that type holds every file's values as they are.
    combined = pl.concat(scans, how="diagonal_relaxed")
    _check_common_types(files, scans, schemas, combined, source)
    return combined


_INT_BITS = {
    pl.Int8: 8,
    pl.Int16: 16,
    pl.Int32: 32,
    pl.Int64: 64,
    pl.Int128: 128,
    pl.UInt8: 8,
    pl.UInt16: 16,
    pl.UInt32: 32,
    pl.UInt64: 64,
}
# Integers a float holds exactly: up to 2^mantissa bits.
_FLOAT_MANTISSA = {pl.Float16: 11, pl.Float32: 24, pl.Float64: 53}
# Decimal digits of the largest integer of each type.
_INT_DIGITS = {8: 3, 16: 5, 32: 10, 64: 20, 128: 39}


def _holds(src: pl.DataType, dst: pl.DataType) -> bool:
    """Whether every value of type `src` is the same value once cast to `dst`.

    Polars' common type of two files' columns may not be: an Int64 and a Float64 column make
    a Float64 (9007199254740993 becomes 9007199254740992), datetime[ns] and datetime[ms] make
    a datetime[ms] (the digits past the millisecond dropped), a Boolean and an Int64 an Int64.
    Text holds any scalar as it prints.
    """
    if src == dst or src == pl.Null:
        return True
    if dst == pl.String:
        return not src.is_nested()
    if src.is_integer() and dst.is_integer():
        bits, room = _INT_BITS[src.base_type()], _INT_BITS[dst.base_type()]
        if src.is_unsigned_integer() and dst.is_signed_integer():
            return room > bits
        return src.is_signed_integer() == dst.is_signed_integer() and room >= bits
    if src.is_integer() and dst.is_float():
        return _INT_BITS[src.base_type()] <= _FLOAT_MANTISSA.get(dst.base_type(), 0)
    if src.is_float() and dst.is_float():
        return _FLOAT_MANTISSA.get(src.base_type(), 0) <= _FLOAT_MANTISSA.get(dst.base_type(), 0)
    if isinstance(dst, pl.Decimal) and (src.is_integer() or isinstance(src, pl.Decimal)):
        whole, scale = (
            (src.precision - src.scale, src.scale)
            if isinstance(src, pl.Decimal)
            else (_INT_DIGITS[_INT_BITS[src.base_type()]], 0)
        )
        return dst.scale >= scale and dst.precision - dst.scale >= whole
    if src == pl.Date and isinstance(dst, pl.Datetime):
        # Nanoseconds reach back to 1677 only; a time zone moves midnight.
        return dst.time_unit != "ns" and dst.time_zone is None
    if isinstance(src, pl.List | pl.Array) and isinstance(dst, pl.List | pl.Array):
        return _holds(src.inner, dst.inner)
    if isinstance(src, pl.Struct) and isinstance(dst, pl.Struct):
        fields = {f.name: f.dtype for f in dst.fields}
        return all(f.name in fields and _holds(f.dtype, fields[f.name]) for f in src.fields)
    return False


def _check_common_types(
    files: list[str],
    scans: list[pl.LazyFrame],
    schemas: list[pl.Schema],
    combined: pl.LazyFrame,
    source: str,
) -> None:
    """Refuse a glob whose files type a column so differently that reading them as one changes
    values (or that no type holds them all), naming the column, the files and their types.

    A cast that may lose values by its types alone (Int64 into Float64) is tried on the file's
    values, read again for that column only: integers that fit pass, as they would in one file.
    """
    differing = [name for name in schemas[0] if len({str(schema[name]) for schema in schemas}) > 1]
    if not differing:
        return

    def types_of(name: str) -> str:
        by_type: dict[str, str] = {}
        for file, schema in zip(files, schemas, strict=True):
            by_type.setdefault(str(schema[name]), file)
        return ", ".join(f"{dtype} in {file!r}" for dtype, file in by_type.items())

    fix = (
        "Write the files with one type for that column (or cast it to the type you want) and "
        "run again."
    )
    try:
        common = combined.collect_schema()
    except pl.exceptions.PolarsError:
        listed = "; ".join(f"column {n!r}: {types_of(n)}" for n in differing)
        msg = (
            f"The files of source {source!r} type columns in ways no one type holds "
            f"({listed}). {fix}"
        )
        raise SourceError(msg) from None
    for name in differing:
        dst = common[name]
        for file, scan, schema in zip(files, scans, schemas, strict=True):
            src = schema[name]
            if _holds(src, dst):
                continue
            if src == pl.Boolean:
                changed = None  # true as 1 is another value whatever the rows hold
            elif (changed := _first_changed(scan, name, src, dst, source)) is None:
                continue
            example = f" ({changed} in {file!r} would not stay as it is)" if changed else ""
            msg = (
                f"The files of source {source!r} type column {name!r} differently "
                f"({types_of(name)}): read together it would become {dst}, which does not "
                f"hold every {src} value as written{example}. {fix}"
            )
            raise SourceError(msg)


def _first_changed(
    scan: pl.LazyFrame, name: str, src: pl.DataType, dst: pl.DataType, source: str
) -> str | None:
    """The first value of column `name` that a cast to `dst` and back changes, or None."""
    value = pl.col(name)
    kept = value.cast(dst, strict=False).cast(src, strict=False).eq_missing(value)
    try:
        found = scan.select(value.filter(~kept).head(1)).collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise read_error(exc, source) from None
    return repr(found.item(0, 0)) if found.height else None


def _is_empty(file: str) -> bool:
    """Whether a file holds nothing but white space (read on the error path only)."""
    from tasks.aws import storage

    try:
        stream = storage.open_stream(file)
    except OSError:
        return False
    try:
        return not stream.read(1 << 16).strip()
    finally:
        stream.close()


def _load_s3(source: str, csv_types: CsvTypes) -> pl.LazyFrame:
    from tasks.aws.clients import polars_storage_options

    parts = urlsplit(source)
    if not parts.netloc or not parts.path.strip("/"):
        msg = f"Malformed S3 source {source!r}: write s3://<bucket>/<key or glob>."
        raise SourceError(msg)
    fmt = _format_of(parts.path, source)
    if not globlib.has_magic(parts.path):
        return _scan(fmt, source, polars_storage_options(), csv_types)
    # A glob's files are listed and scanned one by one, as on disk: one scan of the glob took
    # the first file's columns and dropped a column only a later JSONL file had.
    from tasks.aws import storage

    files = [obj.uri for obj in storage.glob_s3(source)]
    if not files:
        msg = f"No object matches the S3 source {source!r}; check the bucket, prefix and glob."
        raise SourceError(msg)
    return _scan_files(fmt, files, source, csv_types, polars_storage_options())


def _load_local(source: str, csv_types: CsvTypes) -> pl.LazyFrame:
    fmt, files = local_files(source)
    if fmt == "csv":
        for file in files:
            check_utf8(file)
    return _scan_files(fmt, files, source, csv_types)


def local_files(source: str) -> tuple[str, list[str]]:
    """The format and files of a local source (a file, folder or glob), refused if none or mixed."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and file_format(p.name))
    elif globlib.has_magic(source):
        files = sorted(f for f in globlib.glob(os.path.expanduser(source)) if Path(f).is_file())
    elif path.is_file():
        files = [str(path)]
    else:
        files = []
    if not files:
        msg = (
            f"source {source!r} matches no file; give an existing file, folder or glob of "
            f"{', '.join(FORMATS)} files."
        )
        raise SourceError(msg)
    formats = {_format_of(f, source) for f in files}
    if len(formats) > 1:
        msg = f"source {source!r} mixes formats ({', '.join(sorted(formats))}); use one per run."
        raise SourceError(msg)
    return formats.pop(), files


def read_error(exc: Exception, source: str) -> SourceError:
    """The project's error for a source Polars could not read: the file, line and fix.

    Polars names neither the line nor a fix the user can apply, so a CSV or JSONL source is read
    again line by line (this error path only; from S3 too) to find the first line at fault.
    """
    from tasks.aws import storage

    text = bad_lines.polars_reason(exc)
    if "utf-8" in text.lower() or "utf8" in text.lower():
        try:
            fmt = source_format(source)
        except (SourceError, OSError):
            fmt = None
        return SourceEncodingError(encoding_message(source, fmt=fmt or "csv"))
    for file, fmt, where in _rereadable(source):
        try:
            found = bad_lines.first_bad_line(_decompressed(storage.open_stream(file), file), fmt)
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            return SourceError(_gzip_message(file, exc))
        if found:
            return SourceError(f"Could not read source {source!r}: {where}{found}.")
    hint = bad_lines.inferred_type_hint(text)
    return SourceError(f"Could not read source {source!r}: {text.rstrip('.')}{hint}.")


def check_lone_surrogates(source: str) -> None:
    """Refuse a JSONL source holding half a UTF-16 surrogate pair, which reads as U+0000.

    Called once a value of a JSONL source is seen to hold U+0000, to tell a lone surrogate
    escape (which would reach the prompt and the output changed) from a genuine `\\u0000`.
    """
    from tasks.aws import storage

    for file, fmt, where in _rereadable(source):
        if fmt != "jsonl":
            continue
        found = bad_lines.first_lone_surrogate(_decompressed(storage.open_stream(file), file))
        if found:
            msg = (
                f"Source {source!r}: {where}{found}, which is not a character: UTF-8 text cannot "
                "hold it, and it would reach the prompt and the output as U+0000 instead of as "
                "written. Mend that value (text cut inside an emoji?) and run again."
            )
            raise InputValidationError(msg)


def check_integers_kept(source: str, columns: list[str]) -> None:
    """Refuse an integer that a float column of a JSONL or typed CSV source would round.

    Called once a value of such a column is seen at 2^53 or beyond (`first_inexact_integer`).
    """
    from tasks.aws import storage

    for file, fmt, where in _rereadable(source):
        stream = _decompressed(storage.open_stream(file), file)
        found = bad_lines.first_inexact_integer(stream, fmt, columns)
        if found:
            typed = ' or read the CSV with csv_types="text"' if fmt == "csv" else ""
            msg = (
                f"Source {source!r}: {where}{found}: the column also holds decimals, so it is "
                "read as floats, which hold integers exactly only up to 2^53, and the value "
                "would reach the prompt and the output changed. Write that column's values as "
                f"strings{typed}, and run again."
            )
            raise InputValidationError(msg)


def _rereadable(source: str) -> Iterator[tuple[str, str, str]]:
    """(file, format, "in <file>, " when the source names more than it) of each CSV or JSONL
    file Python can read again for an error's line (a .zst file it cannot: no zstd in 3.11)."""
    for file, fmt in _files_of(source):
        if not file.lower().endswith(".zst"):
            yield file, fmt, "" if file == source else f"in {file!r}, "


def _files_of(source: str) -> list[tuple[str, str]]:
    """The (file, format) pairs of a CSV or JSONL source, to read again for an error."""
    from botocore.exceptions import BotoCoreError, ClientError

    from tasks.aws import storage

    try:
        fmt = source_format(source)
        if fmt not in ("csv", "jsonl"):
            return []
        if source.startswith("s3://"):
            files = [o.uri for o in storage.glob_s3(source)]
        else:
            files = local_files(source)[1]
    except (SourceError, OSError, BotoCoreError, ClientError):
        return []
    return [(f, fmt) for f in files]


def check_header(names: list[str], source: str) -> None:
    """Refuse a CSV header that names a column twice (Polars renames the second `x_duplicated_0`).

    The output keeps the column names as written, which two columns of one name cannot.
    """
    doubled = sorted(
        {m.group(1) for n in names if (m := _DUPLICATED.fullmatch(n)) and m.group(1) in names}
    )
    if doubled and source_format(source) == "csv":
        listed = ", ".join(repr(n) for n in doubled)
        msg = (
            f"The header of source {source!r} names column(s) {listed} more than once. Give each "
            "column its own name: the output keeps the names as written."
        )
        raise SourceError(msg)


def source_format(source: str) -> str | None:
    """The format of a file source, as its extension says (None for a Hugging Face dataset)."""
    if source.startswith("hf://"):
        return None
    if source.startswith("s3://"):
        return _format_of(urlsplit(source).path, source)
    return local_files(source)[0]


def check_utf8(file: str | Path, limit: int | None = _SNIFF_BYTES) -> None:
    """Raise SourceEncodingError if the start of `file` (or all of it) is not UTF-8.

    A .zst file is left to Polars, whose read fails with a UTF-8 message that `read_error` turns
    into the same error: the standard library has no zstd before Python 3.14.
    """
    if str(file).lower().endswith(".zst"):
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _decompressed(open(file, "rb"), str(file)) as handle:
        while limit is None or offset < limit:
            try:
                chunk = handle.read(1 << 16)
            except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
                raise SourceError(_gzip_message(str(file), exc)) from None
            if not chunk:
                break
            try:
                decoder.decode(chunk, final=False)
            except UnicodeDecodeError as exc:
                # Spreadsheets' "Unicode text" is UTF-16 with its byte order mark first.
                utf16 = offset == 0 and chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
                where = None if utf16 else offset + exc.start
                raise SourceEncodingError(encoding_message(str(file), where, utf16)) from None
            offset += len(chunk)


def _decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    """The stream of a file's text: gzip undone (.zst files are left to Polars alone)."""
    if name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    return stream


def _gzip_message(file: str, exc: Exception) -> str:
    return (
        f"Source file {file!r} ends in .gz but is not gzip, or is cut short ({exc}). Rename it "
        "without .gz if it is plain text, or compress it again."
    )


def encoding_message(
    file: str, offset: int | None = None, utf16: bool = False, fmt: str = "csv"
) -> str:
    """The message for a CSV or JSONL file (or Parquet text) that is not UTF-8, with the fix."""
    if fmt == "parquet":
        return (
            f"Parquet source {file!r} holds text that is not UTF-8 (a binary column where the "
            "prompt needs text?). Decode or cast that column to UTF-8 text, and write the file "
            "again."
        )
    where = f" (first bad byte at offset {offset})" if offset is not None else ""
    encoding = "utf-16" if utf16 else "latin1"
    if utf16:
        where = " (it is UTF-16, as spreadsheets save 'Unicode text')"
    recode = f"iconv -f {encoding} -t utf-8 {file}"
    if file.lower().endswith(".gz"):
        where = f" (first bad byte at offset {offset} of its text)" if offset is not None else where
        recode = f"gunzip -c {file} | iconv -f {encoding} -t utf-8"
    ext = "jsonl" if fmt == "jsonl" else "csv"
    return (
        f"{ext.upper()} file {file!r} is not UTF-8{where}. Re-encode it, e.g. `{recode} > "
        f"fixed.{ext}`, or save it as Parquet."
    )
