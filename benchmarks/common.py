"""Shared benchmark plumbing: BENCH_ settings, a fresh-process measurement, the results CSV."""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


class BenchSettings(BaseSettings):
    """Benchmark scenario settings, from BENCH_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="BENCH_")

    rows: int = Field(2_200_000, description="Rows of the generated SimpleCoT-shaped set.")
    dir: Path = Field(Path("/tmp/bench"), description="Scratch folder for data and runs.")
    records_per_shard: int = Field(50_000, description="max_records_per_job for preprocess.")
    model_id: str = Field("anthropic.claude-3-haiku-20240307-v1:0", description="Model id.")
    prompt_id: str = Field("question_answering", description="Prompt template id.")
    text: str = Field("clean", description='Generated text: "clean" words or "escaped".')


class CliBenchSettings(BenchSettings):
    """The CLI scenarios: escape-heavy text by default, and the reference run beside ours."""

    text: str = Field("escaped", description='Generated text: "clean" words or "escaped".')
    reference: bool = Field(True, description="Also time the row-by-row reference.")
    floor: bool = Field(True, description="Also time the bytes alone (benchmarks/floor.py).")


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


# A child started by vfork leaves its parent's address space at exec, and Linux counts that
# space's peak in the child's maxrss: a benchmark that had built 2 GB of data reported it as
# the measured CLI's peak (2,598 MB against 591-766 MB). Forked children start their own count
# (the documented switch, "Disabling use of vfork()" in the subprocess docs, Python 3.11+).
subprocess._USE_VFORK = False


def made_apart(fn, *args):
    """``fn(*args)`` in a spawned interpreter, for making test data: returns what it returns.

    The benchmark process stays small, so the gigabytes of data made once do not sit in
    memory (or in a fork's page tables) beside the measured child.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


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


def _sample_rss(pid: int, samples: list[tuple[float, float]], done: threading.Event) -> None:
    """Append (wall time, resident MB) of ``pid`` from /proc every 0.25 s until ``done``."""
    status = Path(f"/proc/{pid}/status")
    while not done.wait(0.25):
        try:
            text = status.read_text()
        except OSError:
            return
        found = [line.split()[1] for line in text.splitlines() if line.startswith("VmRSS:")]
        if found:  # none once the child has exited
            samples.append((time.time(), int(found[0]) / 1024))


def run_child(
    argv: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    rss_samples: list[tuple[float, float]] | None = None,
) -> dict:
    """Run `argv` as a child and report its seconds, CPU seconds, peak RSS in MB and exit code.

    The figures are the child's own (os.wait4), start-up included; its output goes to `log`.
    `env` is added to this process's environment. With `check=False` a failed child is
    reported (`exit_code`) instead of raised; past `timeout` seconds it is killed. Given
    `rss_samples`, the child's resident MB is appended to it every quarter second with the wall
    time (`time.time()`), to tell which phase the peak is in.
    """
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    # Flush the dirty pages earlier steps left, so their writeback is not billed to this one.
    os.sync()
    with log.open("w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        killer = threading.Timer(timeout, child.kill) if timeout else None
        if killer:
            killer.start()
        done = threading.Event()
        if rss_samples is not None:
            threading.Thread(
                target=_sample_rss, args=(child.pid, rss_samples, done), daemon=True
            ).start()
        _, status, usage = os.wait4(child.pid, 0)
        done.set()
        seconds = time.perf_counter() - start
        if killer:
            killer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    if check and child.returncode != 0:
        msg = f"{' '.join(argv)} exited {child.returncode}:\n{log.read_text()[-3000:]}"
        raise RuntimeError(msg)
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        # Kernel time apart: on this VM it swings with the page cache (writing 2 GB with dd took
        # 6.2 s of kernel time into untouched memory, 0.5 s right after), whoever runs.
        "sys_seconds": round(usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "exit_code": child.returncode,
    }


def append_row(name: str, row: dict) -> Path:
    """Append `row` to benchmarks/results/<name>.csv (an older header is rewritten first)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    old: list[dict] = []
    if path.exists():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != list(row):
                old = list(reader)  # an older layout: rewrite it with the new columns
    if old or not path.exists():
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row), restval="")
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in row} for r in old)
    with path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(row)).writerow(row)
    return path


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
    return append_row(name, figures)


def record_cli(
    name: str, settings: BenchSettings, ours: dict, ref: dict | None, floor: dict | None = None
) -> Path:
    """Print our CLI run beside the reference's and the floor's, and append it to <name>.csv.

    `of_floor` is our time over the floor's (how much of it is our own work) and
    `ref_over_floor` the highest ratio to the reference this run's machine allowed.
    """
    rows = settings.rows
    load = os.getloadavg()
    row = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "text": settings.text,
        "seconds": ours["seconds"],
        "cpu_seconds": ours["cpu_seconds"],
        "sys_seconds": ours.get("sys_seconds", ""),
        "rows_per_s": round(rows / ours["seconds"]),
        "peak_rss_mb": ours["peak_rss_mb"],
        "ref_seconds": ref["seconds"] if ref else "",
        "ref_cpu_seconds": ref["cpu_seconds"] if ref else "",
        "ref_sys_seconds": ref.get("sys_seconds", "") if ref else "",
        "ref_peak_rss_mb": ref["peak_rss_mb"] if ref else "",
        "ratio": round(ref["seconds"] / ours["seconds"], 2) if ref else "",
        "ratio_cpu": round(ref["cpu_seconds"] / ours["cpu_seconds"], 2) if ref else "",
        "floor_seconds": floor["seconds"] if floor else "",
        "floor_cpu_seconds": floor["cpu_seconds"] if floor else "",
        "of_floor": round(ours["seconds"] / floor["seconds"], 2) if floor else "",
        "ref_over_floor": round(ref["seconds"] / floor["seconds"], 2) if ref and floor else "",
        "cpus": os.cpu_count(),
        "load_1m": round(load[0], 2),
        "load_5m": round(load[1], 2),
        "python": platform.python_version(),
    }
    line = (
        f"{name}: {rows:,} {settings.text} rows through the CLI in {row['seconds']:.2f} s = "
        f"{row['rows_per_s']:,} rows/s, {row['cpu_seconds']:.2f} CPU s, "
        f"peak RSS {row['peak_rss_mb']:,.0f} MB"
    )
    if ref:
        line += (
            f" | reference {ref['seconds']:.2f} s = {round(rows / ref['seconds']):,} rows/s, "
            f"{ref['cpu_seconds']:.2f} CPU s, peak RSS {ref['peak_rss_mb']:,.0f} MB"
            f" | {row['ratio']}x wall, {row['ratio_cpu']}x CPU"
        )
    if floor:
        line += (
            f" | floor (the bytes alone) {floor['seconds']:.2f} s, "
            f"{floor['cpu_seconds']:.2f} CPU s: ours {row['of_floor']}x of it"
        )
        if ref:
            line += f", the reference {row['ref_over_floor']}x"
    print(f"{line} | load {row['load_1m']} {row['load_5m']}")
    return append_row(name, row)
