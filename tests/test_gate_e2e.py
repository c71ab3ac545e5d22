"""The gate end to end: real `bedrock-batch run` subprocesses, a Prefect server restarted
mid-run, two runs on one model, a SIGKILLed run, and cancel / stop of a run's jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from helpers import eventually, job_spans, peak_in_flight, run_gate_of
from prefect.settings import PREFECT_API_URL

from tasks.pipeline.columns import RECORD_ID
from tasks.run import gate
from tasks.run.owner import EXPIRY_ENV

pytestmark = pytest.mark.slow

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
# Gate pace for subprocess runs: renew every second, ask a full gate every half second.
GATE_ENV = {
    "BEDROCK_BATCH_GATE_RENEW_SECONDS": "1",
    "BEDROCK_BATCH_GATE_WAIT_SECONDS": "0.5",
    "BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS": "5",
    "BEDROCK_BATCH_GATE_RETRY_MAX_SECONDS": "2",
    "BEDROCK_BATCH_POLL_LEASE_SECONDS": "60",
    "BEDROCK_BATCH_POLL_INTERVAL_SECONDS": "0.5",
    # A rerun after a SIGKILL takes over the dead run's claim after this, not the default 60 s.
    EXPIRY_ENV: "3",
}


def _source(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / f"topics-{rows}.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(rows)]}).write_csv(path)
    return path


def _start_run(
    tmp_path: Path,
    run_name: str,
    rows: int,
    cap: int,
    api_url: str,
    model: str = CLAUDE,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    env = {**os.environ, **GATE_ENV, **(extra_env or {}), "PREFECT_API_URL": api_url}
    command = [
        sys.executable, "-m", "flows.cli", "run",
        "--source", str(_source(tmp_path, rows)), "--prompt-id", "joke_about_topic",
        "--model-id", model, "--output-uri", str(tmp_path / "out"), "--run-name", run_name,
        "--max-concurrent-jobs", str(cap), "--max-records-per-job", "100",
    ]  # fmt: skip
    log = open(tmp_path / f"{run_name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, tmp_path: Path, run_name: str, timeout: float) -> None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "timeout"
    log = (tmp_path / f"{run_name}.log").read_text(errors="replace")
    assert code == 0, log[-4000:]


def _log(tmp_path: Path, run_name: str) -> str:
    return (tmp_path / f"{run_name}.log").read_text(errors="replace")


def _in_progress(stack, run_name: str) -> list[dict]:
    return [j for j in stack.ledger(name_contains=run_name) if j["status"] == "InProgress"]


def _spans(stack, run_name: str) -> list[tuple[datetime, datetime]]:
    """Each job's (submit, end) of the run, from Bedrock's own times."""
    return job_spans(stack, [entry["jobArn"] for entry in stack.ledger(name_contains=run_name)])


def _output_rows(tmp_path: Path, run_name: str) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "out" / run_name / "output" / "*.parquet")


def test_run_survives_a_prefect_server_restart_and_the_next_run_does_not_hang(
    stack, tmp_path, own_prefect_server
):
    # Six 100-record jobs at 5 records/s: 20 s each, three at a time, so some are running
    # and some waiting for the gate when the server comes back without its leases.
    stack.configure(records_per_second=5)
    run = _start_run(tmp_path, "restart-1", 600, 3, own_prefect_server.url)
    eventually(
        lambda: len(_in_progress(stack, "restart-1")) == 3, timeout=120, what="three jobs running"
    )
    assert own_prefect_server.active_slots(gate.gate_name(CLAUDE)) == 3

    own_prefect_server.stop()
    back_at = own_prefect_server.start()
    recovered = eventually(
        lambda: "recounted to" in _log(tmp_path, "restart-1") and time.monotonic(),
        timeout=60,
        what="the gate to be recounted after the restart",
    )
    print(f"gate recounted {recovered - back_at:.1f} s after the server came back")
    _finish(run, tmp_path, "restart-1", 300)

    stack.configure(records_per_second=None)
    second = _start_run(tmp_path, "restart-2", 200, 3, own_prefect_server.url)
    _finish(second, tmp_path, "restart-2", 120)

    assert _output_rows(tmp_path, "restart-1")[RECORD_ID].n_unique() == 600
    assert len(stack.ledger(name_contains="restart-1-")) == 6  # nothing paid twice
    assert peak_in_flight(_spans(stack, "restart-1")) <= 3
    assert own_prefect_server.active_slots(gate.gate_name(CLAUDE)) == 0


def test_two_runs_on_one_model_stay_within_the_account_gate_and_their_own_caps(stack, tmp_path):
    # The account quota (the model gate) is 3; each run may have 2 in flight: 4 wanted at once.
    model = "anthropic.claude-3-opus-20240229-v1:0"
    # Jobs hardly move until both runs have theirs in flight: the runs overlap whatever their
    # start-up takes (at 4 s a job, a loaded CI machine once started the second run too late to
    # meet the first: peak 2). Then 4 s a 100-record job to the end.
    stack.configure(records_per_second=0.5)
    api, env = PREFECT_API_URL.value(), {"BEDROCK_BATCH_QUOTA_MAX_JOBS_PER_MODEL": "3"}
    runs = [_start_run(tmp_path, f"pair-{i}", 600, 2, api, model, env) for i in (1, 2)]
    eventually(
        lambda: (
            len(_in_progress(stack, "pair-")) >= 3
            and all(_in_progress(stack, f"pair-{i}-") for i in (1, 2))
        ),
        timeout=120,
        what="both runs' jobs in flight at once",
    )
    stack.configure(records_per_second=25)
    for i, run in enumerate(runs, start=1):
        _finish(run, tmp_path, f"pair-{i}", 300)

    spans = {i: _spans(stack, f"pair-{i}-") for i in (1, 2)}
    peak, each = peak_in_flight(spans[1] + spans[2]), [peak_in_flight(spans[i]) for i in (1, 2)]
    print(f"peak overlap of two runs: {peak} (gate 3), each run {each[0]}/{each[1]}")
    assert len(spans[1]) == len(spans[2]) == 6
    assert peak <= 3
    assert each[0] <= 2 and each[1] <= 2
    assert peak == 3  # the runs did overlap: both gates were really exercised
    assert gate.active_slots(gate.gate_name(model)) == 0


def test_slots_of_a_killed_run_free_within_the_lease(stack, tmp_path, own_prefect_server):
    # A real server: the repossessor service that frees expired leases runs there.
    server = own_prefect_server
    model = "anthropic.claude-3-sonnet-20240229-v1:0"
    stack.configure(records_per_second=2)  # jobs outlive the lease: only expiry frees slots
    run = _start_run(tmp_path, "killed", 200, 2, server.url, model)
    eventually(
        lambda: len(_in_progress(stack, "killed")) == 2, timeout=120, what="two jobs running"
    )
    assert server.active_slots(gate.gate_name(model)) == 2

    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = time.monotonic()
    eventually(
        lambda: server.active_slots(gate.gate_name(model)) == 0, timeout=120, what="slots to free"
    )
    freed = time.monotonic() - killed_at
    print(f"slots of the killed run free {freed:.1f} s after SIGKILL (lease 60 s)")
    # The 60-s lease, the repossessor's pass (every 2 s on this server) and slack for a busy
    # machine; with Prefect's 15-s pass it took 75-92 s under load.
    assert freed <= 90
    assert server.active_slots(run_gate_of(str(tmp_path / "out"), "killed")) == 0


def test_cancel_hook_stops_the_jobs_of_a_killed_flow_process(stack, tmp_path):
    """What a runner does on `prefect flow-run cancel`: kill the flow's process, run the hook.

    (Served through a deployment, the flow fails parameter validation when the runner loads
    it: `Batch_InferenceModel` is not fully defined. That is outside the gate; see the report.)
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Cancelled

    from flows.batch_inference import _stop_jobs, batch_inference

    model = "anthropic.claude-3-5-haiku-20241022-v1:0"
    stack.configure(records_per_second=2)
    run = _start_run(tmp_path, "cancelled", 200, 2, PREFECT_API_URL.value(), model)
    eventually(
        lambda: len(_in_progress(stack, "cancelled")) == 2, timeout=120, what="two jobs running"
    )
    run.send_signal(signal.SIGKILL)
    run.wait()
    params = {
        "source": str(_source(tmp_path, 200)),
        "prompt_id": "joke_about_topic",
        "model_id": model,
        "output_uri": str(tmp_path / "out"),
        "run_name": "cancelled",
    }
    # The hook gets the killed process's own flow run, the one its claim names.
    owner = json.loads((tmp_path / "out" / "cancelled" / "owner.json").read_text())
    flow_run = FlowRun(
        id=owner["flow_run_id"],
        flow_id=uuid.uuid4(),
        name="cancelled",
        parameters={"params": params},
    )

    _stop_jobs(batch_inference, flow_run, Cancelled())

    def stopped() -> bool:
        jobs = stack.ledger(name_contains="cancelled")
        return len(jobs) == 2 and all(j["statusHistory"][-1] == "Stopped" for j in jobs)

    eventually(stopped, timeout=60, what="the jobs to be Stopped")
    state = json.loads((tmp_path / "out" / "cancelled" / "state.json").read_text())
    attempts = [a for shard in state["shards"].values() for a in shard["attempts"]]
    assert [a["stopped_by"] for a in attempts] == ["cancelled", "cancelled"]
    assert all(a["lease_id"] is None for a in attempts)
    assert gate.active_slots(run_gate_of(str(tmp_path / "out"), "cancelled")) == 0


def test_stop_command_stops_jobs_and_a_rerun_merges_them_without_paying_again(
    stack, tmp_path, capsys
):
    from flows.cli import main

    model = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    stack.configure(records_per_second=5)
    run = _start_run(tmp_path, "stopped", 200, 2, PREFECT_API_URL.value(), model)
    eventually(
        lambda: len(_in_progress(stack, "stopped")) == 2, timeout=120, what="two jobs running"
    )
    run.send_signal(signal.SIGKILL)  # the run's process is gone; its jobs bill on
    run.wait()

    code = main(["stop", "--run-name", "stopped", "--output-uri", str(tmp_path / "out")])

    assert code == 0
    assert "2 jobs of stopped stopped" in capsys.readouterr().out
    state = json.loads((tmp_path / "out" / "stopped" / "state.json").read_text())
    attempts = [a for shard in state["shards"].values() for a in shard["attempts"]]
    assert [a["stopped_by"] for a in attempts] == ["stop", "stop"]
    eventually(
        lambda: all(j["status"] == "Stopped" for j in stack.ledger(name_contains="stopped")),
        timeout=60,
        what="the jobs to be Stopped",
    )
    assert gate.active_slots(run_gate_of(str(tmp_path / "out"), "stopped")) == 0

    rerun = _start_run(tmp_path, "stopped", 200, 2, PREFECT_API_URL.value(), model)
    _finish(rerun, tmp_path, "stopped", 120)
    out = _output_rows(tmp_path, "stopped")
    assert out.height == 200  # every row, those the stop cut off with its error
    assert len(stack.ledger(name_contains="stopped")) == 2  # nothing sent again
