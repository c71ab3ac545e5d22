"""Overlapping runs as users make them: a second flow run of a live run cancelled, and
`bedrock-batch stop` from another process while the run's own process still runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl
import pytest
from helpers import (
    assert_answers_match_rows,
    eventually,
    job_spans,
    peak_in_flight,
    run_gate_of,
)
from prefect.settings import PREFECT_API_URL

from tasks.run import gate
from tasks.run.owner import EXPIRY_ENV

pytestmark = pytest.mark.slow

GATE_ENV = {
    "BEDROCK_BATCH_GATE_RENEW_SECONDS": "1",
    "BEDROCK_BATCH_GATE_WAIT_SECONDS": "0.5",
    "BEDROCK_BATCH_POLL_LEASE_SECONDS": "60",
    "BEDROCK_BATCH_POLL_INTERVAL_SECONDS": "0.5",
    EXPIRY_ENV: "10",
}


def _params(tmp_path: Path, run_name: str, rows: int, model: str) -> dict:
    source = tmp_path / f"{run_name}.csv"
    # question_answering starts the prompt with the row's text: the emulator quotes it back.
    pl.DataFrame({"source": [f"Q{i:04d} {run_name}" for i in range(rows)]}).write_csv(source)
    return {
        "source": str(source),
        "prompt_id": "question_answering",
        "model_id": model,
        "output_uri": str(tmp_path / "out"),
        "run_name": run_name,
    }


def _start(tmp_path: Path, params: dict, cap: int) -> subprocess.Popen:
    env = {**os.environ, **GATE_ENV, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [
        sys.executable, "-m", "flows.cli", "run",
        "--source", params["source"], "--prompt-id", params["prompt_id"],
        "--model-id", params["model_id"], "--output-uri", params["output_uri"],
        "--run-name", params["run_name"], "--max-concurrent-jobs", str(cap),
        "--max-records-per-job", "100",
    ]  # fmt: skip
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, tmp_path: Path) -> None:
    try:
        code = process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "timeout"
    assert code == 0, (tmp_path / "run.log").read_text(errors="replace")[-4000:]


def _in_progress(stack, run_name: str) -> int:
    return sum(j["status"] == "InProgress" for j in stack.ledger(name_contains=run_name))


def _output(tmp_path: Path, run_name: str) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "out" / run_name / "output" / "*.parquet")


def test_cancelling_a_second_flow_run_of_a_live_run_leaves_the_owners_jobs_running(stack, tmp_path):
    """A second click of "Run" cancelled: its hook must not stop the first one's jobs."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Cancelled

    from flows.batch_inference import _stop_jobs, batch_inference

    model = "anthropic.claude-3-7-sonnet-20250219-v1:0"
    stack.configure(records_per_second=5)  # 20 s a job: the cancel lands while they run
    params = _params(tmp_path, "clicked-again", 200, model)
    run = _start(tmp_path, params, 2)
    eventually(lambda: _in_progress(stack, "clicked-again") == 2, timeout=120, what="two jobs")
    duplicate = FlowRun(flow_id=uuid.uuid4(), name="clicked-again", parameters={"params": params})

    _stop_jobs(batch_inference, duplicate, Cancelled())

    stack.configure(records_per_second=None)
    _finish(run, tmp_path)
    jobs = stack.ledger(name_contains="clicked-again")
    assert [j["status"] for j in jobs] == ["Completed", "Completed"]
    assert_answers_match_rows(_output(tmp_path, "clicked-again"), 200)


def test_stop_from_another_process_keeps_the_live_runs_gate(stack, tmp_path, capsys):
    """`bedrock-batch stop` while the run's process runs it: the gate holds to the end."""
    from flows.cli import main

    model = "anthropic.claude-sonnet-4-20250514-v1:0"
    stack.configure(records_per_second=5)
    params = _params(tmp_path, "stopped-live", 600, model)
    run = _start(tmp_path, params, 2)
    eventually(lambda: _in_progress(stack, "stopped-live") == 2, timeout=120, what="two jobs")

    code = main(["stop", "--run-name", "stopped-live", "--output-uri", params["output_uri"]])

    assert code == 0
    assert "2 jobs of stopped-live stopped" in capsys.readouterr().out
    stack.configure(records_per_second=50)
    _finish(run, tmp_path)
    jobs = stack.ledger(name_contains="stopped-live")
    assert len(jobs) == 6  # one job a shard: nothing sent twice
    assert sorted(j["status"] for j in jobs) == ["Completed"] * 4 + ["Stopped"] * 2
    peak = peak_in_flight(job_spans(stack, [j["jobArn"] for j in jobs]))
    assert peak <= 2, f"{peak} jobs in flight at once; the run's cap is 2"
    frame = _output(tmp_path, "stopped-live")
    assert frame.height == 600 and frame["record_id"].n_unique() == 600
    assert gate.active_slots(run_gate_of(params["output_uri"], "stopped-live")) == 0


def test_one_run_name_in_two_output_folders_keeps_each_runs_own_cap(stack, tmp_path):
    """Two teammates run "team-eval" at once, each in their own folder: two runs, two caps."""
    model = "anthropic.claude-opus-4-20250514-v1:0"
    stack.configure(records_per_second=10)  # 10 s a job: the second run starts amid the first
    for folder in ("alice", "bob"):
        (tmp_path / folder).mkdir()
    alice = _params(tmp_path / "alice", "team-eval", 400, model)
    bob = _params(tmp_path / "bob", "team-eval", 100, model)
    first = _start(tmp_path / "alice", alice, 1)
    eventually(lambda: _in_progress(stack, "team-eval") == 1, timeout=120, what="alice's job")
    second = _start(tmp_path / "bob", bob, 3)
    _finish(second, tmp_path / "bob")
    stack.configure(records_per_second=50)
    _finish(first, tmp_path / "alice")

    jobs = stack.ledger(name_contains="team-eval")
    by_run: dict[str, list[str]] = {}
    for job in jobs:
        by_run.setdefault(job["jobName"].split("-", 1)[0], []).append(job["jobArn"])
    assert sorted(len(arns) for arns in by_run.values()) == [1, 4]  # one job a shard
    alices = next(arns for arns in by_run.values() if len(arns) == 4)
    peak = peak_in_flight(job_spans(stack, alices))
    assert peak == 1, f"{peak} of alice's jobs in flight at once; her cap is 1"
    assert_answers_match_rows(_output(tmp_path / "alice", "team-eval"), 400)
    assert_answers_match_rows(_output(tmp_path / "bob", "team-eval"), 100)


def test_cancelling_a_dated_run_after_midnight_stops_its_own_jobs(stack, tmp_path, monkeypatch):
    """The nightly `topics-nightly-{date}` cancelled the next day (UTC): its jobs, not today's."""
    import json
    import signal
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Cancelled

    from flows.batch_inference import _stop_jobs, batch_inference
    from tasks.run import layout as layout_module

    model = "anthropic.claude-opus-4-1-20250805-v1:0"
    stack.configure(records_per_second=2)
    params = _params(tmp_path, "nightly-{date}", 200, model)
    run = _start(tmp_path, params, 2)
    eventually(lambda: _in_progress(stack, "-nightly-") == 2, timeout=120, what="two jobs")
    run.send_signal(signal.SIGKILL)  # what the runner does to a cancelled run's process
    run.wait()
    (folder,) = (tmp_path / "out").iterdir()
    owner = json.loads((folder / "owner.json").read_text())
    flow_run = FlowRun(
        id=owner["flow_run_id"],
        flow_id=uuid.uuid4(),
        name=folder.name,
        parameters={"params": params},
    )
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)

    class Tomorrow(datetime):
        @classmethod
        def now(cls, tz=None):
            return tomorrow

    monkeypatch.setattr(layout_module, "datetime", Tomorrow)

    _stop_jobs(batch_inference, flow_run, Cancelled())

    stack.configure(records_per_second=None)

    def stopped() -> bool:
        jobs = stack.ledger(name_contains=f"-{folder.name}-")
        return len(jobs) == 2 and all(j["statusHistory"][-1] == "Stopped" for j in jobs)

    eventually(stopped, timeout=60, what=f"the jobs of {folder.name} to be Stopped")
