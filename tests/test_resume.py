"""Crash and resume: a real subprocess SIGKILLed at each crash point, then the same run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from prefect.settings import PREFECT_API_URL

from tasks.pipeline.columns import ERROR_CODE, RECORD_ID
from tasks.run.failpoints import ENV, POINTS
from tasks.run.owner import EXPIRY_ENV

# Real subprocesses, SIGKILLs or a fault matrix: `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
ROWS = 300


def _run(
    source: Path, out: Path, run_name: str, kill_at: str | None
) -> subprocess.CompletedProcess:
    # A killed owner's claim is taken over once it stops being refreshed: 3 s here.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), EXPIRY_ENV: "3"}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    command = [
        sys.executable, "-m", "flows.cli", "run",
        "--source", str(source), "--prompt-id", "joke_about_topic", "--model-id", CLAUDE,
        "--output-uri", str(out), "--run-name", run_name,
        "--max-concurrent-jobs", "3", "--max-records-per-job", "100",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in POINTS if p != "on-demand"])
def test_rerun_after_sigkill_finishes_without_paying_twice(stack, tmp_path, point):
    # Jobs take ~0.5 s so that the poller sees them running.
    stack.configure(records_per_second=200)
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(ROWS)]}).write_csv(source)
    run_name = f"kill-{point}"

    crashed = _run(source, tmp_path / "out", run_name, kill_at=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]

    finished = _run(source, tmp_path / "out", run_name, kill_at=None)
    assert finished.returncode == 0, finished.stderr[-3000:]

    jobs = stack.ledger(name_contains=run_name)
    names = sorted(job["jobName"].split("-", 1)[1] for job in jobs)
    assert names == [f"{run_name}-shard-0000{i}-a1" for i in range(3)]
    out = pl.read_parquet(tmp_path / "out" / run_name / "output" / "*.parquet")
    assert out.height == ROWS
    assert out[RECORD_ID].n_unique() == ROWS
    assert out[ERROR_CODE].null_count() == ROWS
