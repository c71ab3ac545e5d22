"""A run that knows what it is: changed inputs, two owners, on-demand after a crash, job names.

Real subprocesses of `bedrock-batch run` on the local stack, SIGKILLed at failpoints. Each
scenario either refuses before anything is spent (the emulator's ledger stays empty) or finishes
with every row once, every answer quoting its own row's prompt, one job per shard attempt, and
no on-demand record invoked twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from helpers import assert_answers_match_rows
from prefect.settings import PREFECT_API_URL

from tasks.aws.clients import polars_storage_options
from tasks.pipeline.columns import RECORD_ID, SERVED_BY
from tasks.run.failpoints import ENV
from tasks.run.owner import EXPIRY_ENV

pytestmark = pytest.mark.slow

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
ROWS = 300
FIGURES: list[dict] = []

# Runs the CLI with bedrock-runtime calls traced: one line per record id, before each call.
_TRACED = """
import sys
import tasks.aws.on_demand as od
from flows.cli import main

trace, real = sys.argv[1], od._serve_line

def traced(model_id, invocation_type, limit, line):
    import json
    with open(trace, "a") as handle:
        handle.write(json.loads(line)["recordId"] + "\\n")
    return real(model_id, invocation_type, limit, line)

od._serve_line = traced
sys.exit(main(sys.argv[2:]))
"""


def _write_source(path: Path, version: str, rows: int = ROWS) -> Path:
    # question_answering starts the prompt with the row's text: the emulator quotes it back.
    pl.DataFrame({"source": [f"Q{i:04d} {version}" for i in range(rows)]}).write_csv(path)
    return path


def _command(source, out, run_name, model, extra, trace):
    head = [sys.executable, "-m", "flows.cli"]
    if trace:
        head = [sys.executable, "-c", _TRACED, str(trace)]
    command = [
        *head, "run",
        "--source", str(source), "--prompt-id", "question_answering", "--model-id", model,
        "--output-uri", str(out),
        "--max-concurrent-jobs", "3", "--max-records-per-job", "100",
        *extra,
    ]  # fmt: skip
    if run_name:
        command += ["--run-name", run_name]
    return command


def _env(kill_at: str | None) -> dict[str, str]:
    # A killed owner's claim is taken over once unrefreshed for 3 s.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), EXPIRY_ENV: "3"}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    return env


def _run(source, out, run_name=None, *, model=CLAUDE, kill_at=None, extra=(), trace=None, cwd=None):
    command = _command(source, out, run_name, model, list(extra), trace)
    env = _env(kill_at)
    if cwd is not None:  # the CLI run from another folder still imports the project
        env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=cwd)


def _output(out: str | Path, run_name: str) -> pl.DataFrame:
    uri = f"{out}/{run_name}/output/*.parquet"
    options = polars_storage_options() if str(out).startswith("s3://") else None
    return pl.read_parquet(uri, storage_options=options)


def _one_job_per_shard_attempt(jobs: list[dict]) -> None:
    suffixes = [job["jobName"].split("-", 1)[1] for job in jobs]
    assert max(Counter(suffixes).values()) == 1, suffixes


def _figure(scenario: str, started: float, **figures) -> None:
    seconds = round(time.monotonic() - started, 1)
    FIGURES.append({"scenario": scenario, "seconds": seconds, **figures})
    print(json.dumps(FIGURES[-1]))


def test_edited_source_after_kill_before_plan_is_refused_then_restarted(stack, tmp_path):
    started = time.monotonic()
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = f"s3://{stack.bucket}/identity-runs"

    crashed = _run(source, out, "edit-s3", kill_at="inputs-uploaded")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    _write_source(source, "v2")

    refused = _run(source, out, "edit-s3")

    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "created from different inputs" in refused.stderr
    assert "source content of" in refused.stderr and "restart" in refused.stderr
    assert stack.ledger(name_contains="edit-s3") == []

    restarted = _run(source, out, "edit-s3", extra=["--restart"])

    assert restarted.returncode == 0, restarted.stderr[-3000:]
    frame = _output(out, "edit-s3")
    assert_answers_match_rows(frame, ROWS)
    assert frame["source"].str.ends_with("v2").all()
    jobs = stack.ledger(name_contains="edit-s3")
    assert len(jobs) == 3
    _one_job_per_shard_attempt(jobs)
    _figure("edited source, s3 output, killed before plan", started, rows_in=ROWS,
            rows_out=frame.height, jobs=len(jobs), reinvoked=0)  # fmt: skip


def test_other_model_after_crash_is_refused_before_any_job(stack, tmp_path):
    started = time.monotonic()
    stack.configure(records_per_second=200)
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = tmp_path / "out"

    crashed = _run(source, out, "model-swap", kill_at="polling")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    before = [job["jobArn"] for job in stack.ledger(name_contains="model-swap")]

    refused = _run(source, out, "model-swap", model=SONNET)

    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f'model_id: was "{CLAUDE}", now "{SONNET}"' in refused.stderr
    assert [job["jobArn"] for job in stack.ledger(name_contains="model-swap")] == before

    finished = _run(source, out, "model-swap")

    assert finished.returncode == 0, finished.stderr[-3000:]
    frame = _output(out, "model-swap")
    assert_answers_match_rows(frame, ROWS)
    jobs = stack.ledger(name_contains="model-swap")
    assert {job["modelId"] for job in jobs} == {CLAUDE}
    assert len(jobs) == 3
    _one_job_per_shard_attempt(jobs)
    _figure("other model after crash", started, rows_in=ROWS, rows_out=frame.height,
            jobs=len(jobs), reinvoked=0)  # fmt: skip


def test_edited_source_of_finished_run_is_refused_and_default_name_is_a_new_run(stack, tmp_path):
    started = time.monotonic()
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = tmp_path / "out"
    assert _run(source, out, "nightly").returncode == 0
    first = _run(source, out)  # default name: follows the inputs
    assert first.returncode == 0, first.stderr[-3000:]
    _write_source(source, "v2")

    refused = _run(source, out, "nightly")

    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "source content of" in refused.stderr and "questions.csv" in refused.stderr
    jobs_before = len(stack.ledger(name_contains="question-answering-"))

    second = _run(source, out)

    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted(p.name for p in out.iterdir() if p.name.startswith("question-answering-"))
    assert len(runs) == 2
    frames = {name: _output(out, name) for name in runs}
    versions = {name: set(f["source"].str.slice(6)) for name, f in frames.items()}
    assert sorted(map(tuple, versions.values())) == [("v1",), ("v2",)]
    for frame in frames.values():
        assert_answers_match_rows(frame, ROWS)
    jobs = stack.ledger(name_contains="question-answering-")
    assert len(jobs) == jobs_before + 3
    rows_out = sum(f.height for f in frames.values())
    _figure("edited source of finished run; default names", started, rows_in=2 * ROWS,
            rows_out=rows_out, jobs=len(jobs), reinvoked=0)  # fmt: skip


def test_second_process_on_a_live_run_is_refused_naming_the_owner(stack, tmp_path):
    started = time.monotonic()
    # The first process's jobs stick half way until the second has been refused: however long
    # the second takes to start, the first is still alive and running then.
    stack.set_faults(stuck_job_names_containing="twice", stuck_after_fraction=0.5)
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = tmp_path / "out"
    command = _command(source, out, "twice", CLAUDE, [], None)
    first = subprocess.Popen(
        command, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not stack.ledger(name_contains="twice") and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.2)
        owner = json.loads((out / "twice" / "owner.json").read_text())

        second = _run(source, out, "twice")

        assert second.returncode == 2, second.stderr[-2000:]
        assert "already running" in second.stderr
        assert owner["flow_run_id"] in second.stderr and owner["host"] in second.stderr
        stack.set_faults(stuck_job_names_containing=None)
        _, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    frame = _output(out, "twice")
    assert_answers_match_rows(frame, ROWS)
    jobs = stack.ledger(name_contains="twice")
    assert len(jobs) == 3
    _one_job_per_shard_attempt(jobs)
    assert not (out / "twice" / "owner.json").exists()  # released at the end
    _figure("two processes at once", started, rows_in=ROWS, rows_out=frame.height,
            jobs=len(jobs), reinvoked=0)  # fmt: skip


def test_on_demand_killed_midway_resumes_without_invoking_any_record_twice(stack, tmp_path):
    started = time.monotonic()
    # Only shard 1's first job loses records (retryable errors): fewer than a job's minimum,
    # so they are served on demand, ten a batch.
    stack.set_faults(
        record_error_rate=0.25, record_error_job_names_containing="shard-00001-a1", seed=11
    )
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = tmp_path / "out"
    trace = tmp_path / "runtime-calls.txt"
    extra = ["--on-demand-rps", "10"]
    stack.reset_api_calls()  # the emulator's own count of runtime calls, beside the trace

    crashed = _run(source, out, "od-kill", kill_at="on-demand", extra=extra, trace=trace)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    before_resume = trace.read_text().split()
    finished = _run(source, out, "od-kill", extra=extra, trace=trace)

    assert finished.returncode == 0, finished.stderr[-3000:]
    calls = Counter(trace.read_text().split())
    frame = _output(out, "od-kill")
    assert_answers_match_rows(frame, ROWS)
    on_demand = set(frame.filter(pl.col(SERVED_BY) == "on_demand")[RECORD_ID])
    assert len(before_resume) == 10 and len(on_demand) > 10
    assert set(calls) == on_demand
    assert max(calls.values()) == 1
    # Bedrock's side agrees: one answered runtime call per on-demand record, across the kill.
    runtime = stack.api_calls()["operations"]
    answered = sum(
        op["calls"] - op["throttled"] - op["errors"]
        for name, op in runtime.items()
        if name in ("InvokeModel", "Converse")
    )
    assert answered == len(on_demand)
    jobs = stack.ledger(name_contains="od-kill")
    assert len(jobs) == 3
    _one_job_per_shard_attempt(jobs)
    _figure("on-demand killed midway", started, rows_in=ROWS, rows_out=frame.height,
            jobs=len(jobs), on_demand=len(on_demand), invoked_before_kill=len(before_resume),
            reinvoked=sum(n - 1 for n in calls.values()))  # fmt: skip


def test_run_names_differing_in_dot_and_underscore_get_their_own_jobs(stack, tmp_path):
    started = time.monotonic()
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = tmp_path / "out"

    for name in ("nightly.v1", "nightly_v1"):
        done = _run(source, out, name)
        assert done.returncode == 0, done.stderr[-3000:]

    # '_' is not allowed in a job name and becomes '-'; the leading digest keeps them apart.
    jobs = stack.ledger(name_contains="-nightly.v1-") + stack.ledger(name_contains="-nightly-v1-")
    assert len(jobs) == 6
    assert len({job["jobName"] for job in jobs}) == 6
    assert len({job["clientRequestToken"] for job in jobs}) == 6
    for name in ("nightly.v1", "nightly_v1"):
        assert_answers_match_rows(_output(out, name), ROWS)
    _figure("nightly.v1 and nightly_v1", started, rows_in=2 * ROWS, rows_out=2 * ROWS,
            jobs=len(jobs), reinvoked=0)  # fmt: skip


def test_the_same_local_file_named_another_way_is_the_same_run(tmp_path, monkeypatch):
    # `data/x.csv` then its absolute path (the run resumed from a script, another folder):
    # refused as "created from different inputs" before. An edited file still is.
    from tasks.errors import RunIdentityError
    from tasks.run.identity import RunIdentity, check_identity, source_fingerprint
    from tasks.run.layout import RunLayout

    monkeypatch.chdir(tmp_path)
    source = _write_source(tmp_path / "questions.csv", "v1")
    layout = RunLayout("named", str(tmp_path / "out" / "named"), str(tmp_path / "jobs"))
    recorded = RunIdentity({"source": source_fingerprint("questions.csv"), "model_id": CLAUDE})
    for spelling in (str(source), "./questions.csv", str(tmp_path / "." / "questions.csv")):
        current = RunIdentity({"source": source_fingerprint(spelling), "model_id": CLAUDE})
        assert current.digest != recorded.digest  # the path is recorded as typed
        check_identity(layout, recorded, current)

    _write_source(source, "v2")
    edited = RunIdentity({"source": source_fingerprint(str(source)), "model_id": CLAUDE})
    with pytest.raises(RunIdentityError, match="source"):
        check_identity(layout, recorded, edited)
    other = RunIdentity({"source": source_fingerprint("questions.csv"), "model_id": SONNET})
    with pytest.raises(RunIdentityError, match="model_id"):
        check_identity(layout, recorded, other)


def test_the_same_local_file_named_another_way_has_the_same_default_run(stack, tmp_path):
    # Without a run name, `questions.csv` from its folder and then its absolute path (a
    # deployment, a script run elsewhere) named two runs, and the second paid again.
    started = time.monotonic()
    source = _write_source(tmp_path / "questions.csv", "v1")
    out = tmp_path / "out"
    first = _run("questions.csv", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = stack.ledger(name_contains="question-answering-")

    again = _run(source, out)

    assert again.returncode == 0, again.stderr[-3000:]
    runs = [p.name for p in out.iterdir() if p.name.startswith("question-answering-")]
    assert len(runs) == 1, runs
    assert stack.ledger(name_contains="question-answering-") == jobs
    assert_answers_match_rows(_output(out, runs[0]), ROWS)
    _figure("one local file, two spellings, default name", started, rows_in=ROWS,
            rows_out=ROWS, jobs=len(jobs), reinvoked=0)  # fmt: skip


def test_a_run_begun_under_the_path_spelled_name_keeps_its_folder(tmp_path, monkeypatch):
    # A default name once followed the path as typed; a run begun then and resumed after
    # must find its folder, not start again beside it.
    from tasks.run import lifecycle
    from tasks.run.identity import fingerprint_digest, fingerprint_of
    from tasks.run.layout import resolve_layout
    from tasks.run.params import BatchParams

    monkeypatch.chdir(tmp_path)
    _write_source(tmp_path / "questions.csv", "v1")
    params = BatchParams(
        source="questions.csv",
        prompt_id="question_answering",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
    )
    fingerprint = fingerprint_of(params)
    now = lifecycle._default_layout(params, fingerprint)
    assert now.run_name == lifecycle.default_run_name(params, fingerprint)
    before = lifecycle._named(params, fingerprint_digest(fingerprint))
    assert before != now.run_name
    plan = Path(resolve_layout(params.output_uri, before).plan_uri)
    plan.parent.mkdir(parents=True)
    plan.write_text("{}")

    assert lifecycle._default_layout(params, fingerprint).run_name == before
    absolute = params.model_copy(update={"source": str(tmp_path / "questions.csv")})
    assert lifecycle.default_run_name(absolute, fingerprint_of(absolute)) == now.run_name
