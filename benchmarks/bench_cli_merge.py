"""Benchmark `bedrock-batch merge` (offline) as a subprocess against the reference.

Settings as bench_cli_preprocess (BENCH_ prefix, the floor included). Both runs are made
first if missing (not timed); synthetic Claude outputs (1% errors, shuffled) are generated
once from our run and merged onto both. Figures go to cli_merge.csv.
"""

from __future__ import annotations

import shutil
import sys

from benchmarks.bench_cli_preprocess import cli_run_dir, ours, prepare, ref_run_dir, reference
from benchmarks.common import CliBenchSettings, made_apart, record_cli, run_child

NAME = "cli_merge"


def outputs_dir(settings: CliBenchSettings):
    """Where the synthetic Bedrock outputs for this text and row count live."""
    return settings.dir / f"cli-outputs-{settings.text}-{settings.rows}"


def _prepare(settings: CliBenchSettings) -> None:
    from benchmarks.generate import anthropic_outputs
    from tasks.pipeline.plan import PLAN_FILE

    prepare(settings)
    if not (cli_run_dir(settings) / PLAN_FILE).exists():
        ours(settings)
    if settings.reference and not (ref_run_dir(settings) / "rows").exists():
        reference(settings)
    if not outputs_dir(settings).exists():
        made_apart(anthropic_outputs, cli_run_dir(settings), outputs_dir(settings))


def merge_ours(settings: CliBenchSettings) -> dict:
    """Run our CLI's offline merge and measure it."""
    run = cli_run_dir(settings)
    shutil.rmtree(run / "output", ignore_errors=True)
    argv = [sys.executable, "-m", "flows.cli", "merge", "--run-dir", str(run)]
    argv += ["--outputs", str(outputs_dir(settings))]
    return run_child(argv, settings.dir / "logs" / f"{NAME}-ours.log")


def merge_reference(settings: CliBenchSettings) -> dict:
    """Run the row-by-row reference merge and measure it."""
    run = ref_run_dir(settings)
    shutil.rmtree(run / "output", ignore_errors=True)
    argv = [sys.executable, "-m", "benchmarks.reference", "merge", str(run)]
    argv += [str(outputs_dir(settings))]
    return run_child(argv, settings.dir / "logs" / f"{NAME}-reference.log")


def merge_floor(settings: CliBenchSettings) -> dict:
    """Read the outputs and rows and write the rows back as parts, and nothing else."""
    scratch = settings.dir / "floor-merge"
    shutil.rmtree(scratch, ignore_errors=True)
    argv = [sys.executable, "-m", "benchmarks.floor", "merge", str(cli_run_dir(settings))]
    argv += [str(outputs_dir(settings)), str(scratch)]
    try:
        return run_child(argv, settings.dir / "logs" / f"{NAME}-floor.log")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    settings = CliBenchSettings()
    _prepare(settings)
    ref = merge_reference(settings) if settings.reference else None
    figures = merge_ours(settings)
    record_cli(NAME, settings, figures, ref, merge_floor(settings) if settings.floor else None)


if __name__ == "__main__":
    main()
