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
        (scratch / shards[index].name).write_bytes(bytes(shards[index].stat().st_size))
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
