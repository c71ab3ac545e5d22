"""Benchmark `bedrock-batch preprocess` (the dry run) as a subprocess against the reference.

Settings (BENCH_ prefix, see common.CliBenchSettings): BENCH_ROWS, BENCH_DIR, BENCH_TEXT
(default "escaped"), BENCH_RECORDS_PER_SHARD, BENCH_REFERENCE (0 skips the reference),
BENCH_FLOOR (0 skips the floor: the same bytes read and written, benchmarks/floor.py). Every
run includes its interpreter's start-up and imports; figures go to cli_preprocess.csv.
"""

from __future__ import annotations

import shutil
import sys

from benchmarks.bench_preprocess import prepare, source_path
from benchmarks.common import CliBenchSettings, record_cli, run_child

NAME = "cli_preprocess"


def cli_run_dir(settings: CliBenchSettings):
    """Where our CLI writes the run (bench_cli_merge reads it)."""
    return settings.dir / f"cli-run-{settings.text}-{settings.rows}"


def ref_run_dir(settings: CliBenchSettings):
    """Where the reference writes its run."""
    return settings.dir / f"ref-run-{settings.text}-{settings.rows}"


def ours(settings: CliBenchSettings) -> dict:
    """Run our CLI's dry run into a fresh folder and measure it."""
    out = cli_run_dir(settings)
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "flows.cli", "preprocess", "--source", str(source_path(settings))]
    argv += ["--prompt-id", settings.prompt_id, "--model-id", settings.model_id]
    argv += ["--max-records-per-job", str(settings.records_per_shard), "--out", str(out)]
    return run_child(argv, settings.dir / "logs" / f"{NAME}-ours.log")


def reference(settings: CliBenchSettings) -> dict:
    """Run the row-by-row reference preprocess into a fresh folder and measure it."""
    out = ref_run_dir(settings)
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "benchmarks.reference", "preprocess", str(source_path(settings))]
    argv += [str(out), str(settings.records_per_shard)]
    return run_child(argv, settings.dir / "logs" / f"{NAME}-reference.log")


def floor(settings: CliBenchSettings) -> dict:
    """Read and write what our run did, and nothing else (after `ours`: its shard sizes)."""
    scratch = settings.dir / "floor-preprocess"
    shutil.rmtree(scratch, ignore_errors=True)
    argv = [sys.executable, "-m", "benchmarks.floor", "preprocess", str(source_path(settings))]
    argv += [str(cli_run_dir(settings)), str(scratch)]
    try:
        return run_child(argv, settings.dir / "logs" / f"{NAME}-floor.log")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    settings = CliBenchSettings()
    prepare(settings)
    ref = reference(settings) if settings.reference else None
    figures = ours(settings)
    record_cli(NAME, settings, figures, ref, floor(settings) if settings.floor else None)


if __name__ == "__main__":
    main()
