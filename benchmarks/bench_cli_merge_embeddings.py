"""Benchmark `bedrock-batch merge` on Titan Text Embeddings v2 outputs, the heaviest merge.

An embedding job's output is ~26 kB a record at 1,024 dimensions (a 50k-record job writes
~1.25 GB: the vector twice, `embedding` and `embeddingsByType.float`), so this is where a
merge's memory is decided. Settings
(BENCH_ prefix): BENCH_ROWS (default 100,000: two shards of 50k), BENCH_DIMENSIONS, BENCH_DIR,
BENCH_RECORDS_PER_SHARD. The run and its outputs are made first if missing (not timed); the
merge runs through the CLI, start-up included. Figures go to cli_merge_embeddings.csv.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from datetime import datetime, timezone

from pydantic import Field

from benchmarks.bench_preprocess import prepare, source_path
from benchmarks.common import BenchSettings, append_row, made_apart, run_child

NAME = "cli_merge_embeddings"
TITAN_V2 = "amazon.titan-embed-text-v2:0"


class EmbeddingBenchSettings(BenchSettings):
    """The embedding scenario: Titan v2 at its largest output size."""

    rows: int = Field(100_000, description="Rows to embed (the generated SimpleCoT `source`).")
    dimensions: int = Field(1024, description="Titan v2 output size: 256, 512 or 1024.")
    model_id: str = Field(TITAN_V2, description="Model id.")


def run_dir(settings: EmbeddingBenchSettings):
    return settings.dir / f"cli-run-titan{settings.dimensions}-{settings.rows}"


def outputs_dir(settings: EmbeddingBenchSettings):
    return settings.dir / f"cli-outputs-titan{settings.dimensions}-{settings.rows}"


def _prepare(settings: EmbeddingBenchSettings) -> None:
    from benchmarks.generate import titan_outputs
    from tasks.pipeline.plan import PLAN_FILE

    prepare(settings)
    run = run_dir(settings)
    if not (run / PLAN_FILE).exists():
        shutil.rmtree(outputs_dir(settings), ignore_errors=True)
        argv = [sys.executable, "-m", "flows.cli", "preprocess", "--source"]
        argv += [str(source_path(settings)), "--text-column", "source"]
        argv += ["--model-id", settings.model_id, "--dimensions", str(settings.dimensions)]
        argv += ["--max-records-per-job", str(settings.records_per_shard), "--out", str(run)]
        run_child(argv, settings.dir / "logs" / f"{NAME}-preprocess.log")
    if not outputs_dir(settings).exists():
        made_apart(titan_outputs, run, outputs_dir(settings), settings.dimensions)


def main() -> None:
    settings = EmbeddingBenchSettings()
    _prepare(settings)
    run = run_dir(settings)
    shutil.rmtree(run / "output", ignore_errors=True)
    argv = [sys.executable, "-m", "flows.cli", "merge", "--run-dir", str(run)]
    argv += ["--outputs", str(outputs_dir(settings))]
    figures = run_child(argv, settings.dir / "logs" / f"{NAME}.log")
    outputs_mb = sum(p.stat().st_size for p in outputs_dir(settings).rglob("*.out")) / 2**20
    shards = len(list((run / "output").glob("part-*.parquet")))
    from tasks.settings import get_settings

    row = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": settings.rows,
        "dimensions": settings.dimensions,
        "shards": shards,
        "outputs_mb": round(outputs_mb),
        "merge_workers": get_settings().merge.workers,
        "seconds": figures["seconds"],
        "cpu_seconds": figures["cpu_seconds"],
        "peak_rss_mb": figures["peak_rss_mb"],
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(
        f"{NAME}: {settings.rows:,} Titan v2 embeddings of {settings.dimensions} floats "
        f"({row['outputs_mb']:,} MB of output, {shards} shards, {row['merge_workers']} merge "
        f"workers) through the CLI in {row['seconds']:.2f} s, {row['cpu_seconds']} CPU s, "
        f"peak RSS {row['peak_rss_mb']:,.0f} MB | load {row['load_1m']}"
    )
    append_row(NAME, row)


if __name__ == "__main__":
    main()
