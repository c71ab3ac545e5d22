"""The floor of preprocess and merge: the same bytes read and written, and nothing else.

Run as `python -m benchmarks.floor preprocess SOURCE RUN_DIR SCRATCH` or
`python -m benchmarks.floor merge RUN_DIR OUTPUTS_DIR SCRATCH`. Per shard, side by side as our
merge runs them, the floor does only what no implementation of this design can skip:

- preprocess: read the shard's slice of the source, write it as a rows Parquet with our codec,
  and write as many bytes as our JSONL shard (zeros: no rendering, no escaping);
- merge: read the job's output lines (Polars' line reader, as ours), read the shard's rows,
  and write them back as the part with our codec (no decode, no join, no result columns).

It is a lower bound, so `ours / floor` says how much of our time is our own work, and
`reference / floor` is the highest ratio to the reference any such implementation could reach
on that run: on this VM's page cache the bytes alone are a large share of both.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.allocator import tune_jemalloc
from tasks.run.layout import INPUT_DIR, JSONL, OUT_SUFFIX, ROWS_DIR


def _workers() -> int:
    return min(4, os.cpu_count() or 1)  # as BEDROCK_BATCH_MERGE_WORKERS' default


# One buffer of zeros, written as often as a file needs: a fresh `bytes(size)` a shard had the
# kernel fault in and clear 48 MB of pages first, which our own writer (its memory reused
# from shard to shard) does not pay; the floor took 8.0-8.9 s of system time against ours 3.3-4.8.
_ZEROS = memoryview(bytes(1 << 20))


def _write_zeros(path: Path, size: int) -> None:
    """Write `size` bytes to `path`, a MiB at a time from the one buffer."""
    with open(path, "wb") as handle:
        for start in range(0, size, len(_ZEROS)):
            handle.write(_ZEROS[: min(len(_ZEROS), size - start)])


def preprocess(source: str, run_dir: Path, scratch: Path) -> int:
    """Per shard of `run_dir`: read its source rows, write them as Parquet and its JSONL's size."""
    import polars as pl

    from tasks.files import write_parquet_atomic

    shards = sorted((run_dir / INPUT_DIR).glob(f"*{JSONL}"))
    total = pl.scan_parquet(source).select(pl.len()).collect().item()
    per, extra = divmod(total, len(shards))
    scratch.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> int:
        offset = index * per + min(index, extra)
        rows = pl.scan_parquet(source).slice(offset, per + (index < extra)).collect()
        write_parquet_atomic(rows.with_row_index("record_id"), scratch / f"{index}.parquet")
        _write_zeros(scratch / shards[index].name, shards[index].stat().st_size)
        return rows.height

    with ThreadPoolExecutor(_workers()) as pool:
        return sum(pool.map(one, range(len(shards))))


def merge(run_dir: Path, outputs_dir: Path, scratch: Path) -> int:
    """Per shard of `run_dir`: read its job's output lines and its rows, write the rows back."""
    import polars as pl

    from tasks.files import scan_lines, write_parquet_atomic

    outputs = {
        p.name.removesuffix(JSONL + OUT_SUFFIX): p for p in outputs_dir.rglob("*" + OUT_SUFFIX)
    }
    scratch.mkdir(parents=True, exist_ok=True)

    def one(rows_file: Path) -> int:
        # Every byte read and split into lines (a line of white space is not counted).
        lines = scan_lines(outputs[rows_file.stem]).select(pl.len()).collect().item()
        write_parquet_atomic(pl.read_parquet(rows_file), scratch / rows_file.name)
        return lines

    with ThreadPoolExecutor(_workers()) as pool:
        return sum(pool.map(one, sorted((run_dir / ROWS_DIR).glob("*.parquet"))))


def main(argv: list[str]) -> None:
    tune_jemalloc()  # as the CLI: before Polars loads
    if argv[0] == "preprocess":
        print(preprocess(argv[1], Path(argv[2]), Path(argv[3])))
    elif argv[0] == "merge":
        print(merge(Path(argv[1]), Path(argv[2]), Path(argv[3])))
    else:
        msg = f"unknown step {argv[0]!r}; use preprocess or merge"
        raise SystemExit(msg)


if __name__ == "__main__":
    main(sys.argv[1:])
