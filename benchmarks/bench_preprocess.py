"""Benchmark preprocess: SimpleCoT-shaped rows to Claude JSONL shards on local disk."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks.common import BenchSettings, in_fresh_process, made_apart, measure, record

NAME = "preprocess"


def source_path(settings: BenchSettings):
    """The generated input for this row count (made once, outside the measurement)."""
    suffix = "" if settings.text == "clean" else f"-{settings.text}"
    return settings.dir / f"simplecot{suffix}-{settings.rows}.parquet"


def run_dir(settings: BenchSettings):
    """Where preprocess writes the run (bench_merge reads it)."""
    return settings.dir / f"run-{settings.rows}"


def prepare(settings: BenchSettings) -> None:
    """Generate the input Parquet if it is not there yet."""
    path = source_path(settings)
    if not path.exists():
        settings.dir.mkdir(parents=True, exist_ok=True)
        made_apart(_write_simplecot, settings.rows, settings.text, path)


def _write_simplecot(rows: int, text: str, path: Path) -> None:
    from benchmarks.generate import simplecot

    simplecot(rows, text=text).write_parquet(path)


def _preprocess(settings: BenchSettings) -> dict:
    from tasks.pipeline.preprocess import preprocess

    plan = preprocess(
        str(source_path(settings)),
        model_id=settings.model_id,
        prompt_id=settings.prompt_id,
        out_dir=run_dir(settings),
        max_records_per_job=settings.records_per_shard,
    )
    return {"rows": plan.total_records, "shards": len(plan.shards)}


def main() -> None:
    settings = BenchSettings()
    if "--measure" in sys.argv:
        import tasks.pipeline.preprocess  # noqa: F401  (imports are not part of the measured step)

        print(json.dumps(measure(_preprocess, settings)))
        return
    prepare(settings)
    shutil.rmtree(run_dir(settings), ignore_errors=True)
    record(NAME, settings, in_fresh_process("benchmarks.bench_preprocess"))


if __name__ == "__main__":
    main()
