"""Shared benchmark plumbing: BENCH_ settings, a fresh-process measurement, the results CSV."""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

RESULTS = Path(__file__).parent / "results"


class BenchSettings(BaseSettings):
    """Benchmark scenario settings, from BENCH_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="BENCH_")

    rows: int = Field(2_200_000, description="Rows of the generated SimpleCoT-shaped set.")
    dir: Path = Field(Path("/tmp/bench"), description="Scratch folder for data and runs.")
    records_per_shard: int = Field(50_000, description="max_records_per_job for preprocess.")
    model_id: str = Field("anthropic.claude-3-haiku-20240307-v1:0", description="Model id.")
    prompt_id: str = Field("question_answering", description="Prompt template id.")


def measure(fn, *args) -> dict:
    """Run `fn(*args)` here and report seconds, CPU seconds and this process's peak RSS in MB.

    CPU seconds (user + system, all threads) move far less than wall time when other work
    shares the cores, so they are the figure to compare changes by on a busy machine.
    """
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        **result,
    }


def in_fresh_process(module: str) -> dict:
    """Run `python -m <module> --measure` so peak RSS belongs to the measured step alone."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--measure"],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(name: str, settings: BenchSettings, figures: dict) -> Path:
    """Print the figures and append them as a row of benchmarks/results/<name>.csv."""
    rows = figures["rows"]
    figures = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "seconds": figures["seconds"],
        "cpu_seconds": figures.get("cpu_seconds"),
        "rows_per_s": round(rows / figures["seconds"]),
        "peak_rss_mb": figures["peak_rss_mb"],
        "shards": figures.get("shards"),
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(
        f"{name}: {rows:,} rows in {figures['seconds']:.2f} s = {figures['rows_per_s']:,} rows/s, "
        f"{figures['cpu_seconds']} CPU s, peak RSS {figures['peak_rss_mb']:,.0f} MB, "
        f"{figures['shards']} shards, load {figures['load_1m']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    old: list[dict] = []
    if path.exists():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != list(figures):
                old = list(reader)  # an older layout: rewrite it with the new columns
    if old or not path.exists():
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(figures), restval="")
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in figures} for row in old)
    with path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(figures)).writerow(figures)
    return path
