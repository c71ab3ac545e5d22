"""Benchmark merge: synthetic Claude outputs (1% errors) joined onto every shard's rows."""

from __future__ import annotations

import json
import shutil
import sys

from benchmarks.bench_preprocess import prepare, run_dir
from benchmarks.common import BenchSettings, in_fresh_process, made_apart, measure, record

NAME = "merge"


def outputs_dir(settings: BenchSettings):
    """Where the synthetic Bedrock outputs for this row count live."""
    return settings.dir / f"outputs-{settings.rows}"


def _merge(settings: BenchSettings) -> dict:
    from tasks.pipeline.merge import merge_offline

    parts = merge_offline(run_dir(settings), outputs_dir(settings))
    return {"rows": settings.rows, "shards": len(parts)}


def main() -> None:
    settings = BenchSettings()
    if "--measure" in sys.argv:
        import tasks.pipeline.merge  # noqa: F401  (imports are not part of the measured step)

        print(json.dumps(measure(_merge, settings)))
        return
    from benchmarks.generate import anthropic_outputs
    from tasks.pipeline.plan import PLAN_FILE

    if not (run_dir(settings) / PLAN_FILE).exists():
        prepare(settings)
        in_fresh_process("benchmarks.bench_preprocess")
    if not outputs_dir(settings).exists():
        made_apart(anthropic_outputs, run_dir(settings), outputs_dir(settings))
    shutil.rmtree(run_dir(settings) / "output", ignore_errors=True)
    record(NAME, settings, in_fresh_process("benchmarks.bench_merge"))


if __name__ == "__main__":
    main()
