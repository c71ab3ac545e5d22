"""Crash and resume: a real subprocess SIGKILLed at each crash point, then the same run again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import assert_answers_match_rows, eventually
from prefect.settings import PREFECT_API_URL

from tasks.pipeline.columns import ERROR_CODE, RECORD_ID
from tasks.run.failpoints import ENV, POINTS
from tasks.run.owner import EXPIRY_ENV

# Real subprocesses, SIGKILLs or a fault matrix: `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
# The Ctrl-C tests leave their jobs' gate slots to expire (the jobs run on): a model of their
# own keeps the tests after them in the worker from waiting on a shared model gate.
INTERRUPTED_MODEL = "anthropic.claude-3-7-sonnet-20250219-v1:0"
ROWS = 300


def _run(
    source: Path, out: Path, run_name: str, kill_at: str | None, *extra: str
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
        "--max-concurrent-jobs", "3", "--max-records-per-job", "100", *extra,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_restart_stops_the_old_runs_jobs_still_in_flight(stack, tmp_path):
    # The old run's jobs went on to the end and were paid in full beside the new run's; once
    # its state was moved aside, `bedrock-batch stop` could not find them either.
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(ROWS)]}).write_csv(source)
    stack.set_faults(stuck_job_names_containing="restarted", stuck_after_fraction=0.5)
    try:
        crashed = _run(source, tmp_path / "out", "restarted", "polling")
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
        old_key = stack.ledger(name_contains="restarted")[0]["jobName"].split("-", 1)[0]
        stack.set_faults(stuck_job_names_containing=old_key)  # the old run's jobs stay stuck
        finished = _run(source, tmp_path / "out", "restarted", None, "--restart")
    finally:
        stack.set_faults(stuck_job_names_containing=None)
    assert finished.returncode == 0, finished.stderr[-3000:]

    jobs = stack.ledger(name_contains="restarted")
    old = {job["jobName"]: job["status"] for job in jobs if job["jobName"].startswith(old_key)}
    new = {job["jobName"]: job["status"] for job in jobs if not job["jobName"].startswith(old_key)}
    assert old and set(old.values()) == {"Stopped"}, old
    assert len(new) == 3 and set(new.values()) == {"Completed"}, new
    assert "stopped" in finished.stderr and "old run" in finished.stderr
    out = pl.read_parquet(tmp_path / "out" / "restarted" / "output" / "*.parquet")
    assert out.height == ROWS and out[RECORD_ID].n_unique() == ROWS
    assert out[ERROR_CODE].null_count() == ROWS


@pytest.mark.slow
@pytest.mark.parametrize("point", ["preprocess", "inputs-uploaded"])
def test_rerun_after_sigkill_keeps_the_skipped_rows(stack, tmp_path, point):
    # The plan was sealed before the skipped rows' part was written: a crash in between (the
    # whole input upload) left them out of the output on every re-run.
    source = tmp_path / "topics.csv"
    topics = [None if i % 50 == 7 else f"topic {i}" for i in range(ROWS)]
    pl.DataFrame({"topic": topics, "n": list(range(ROWS))}).write_csv(source)
    run_name = f"skip-{point}"

    skip = ("--on-missing", "skip", "--max-records-per-job", "150")  # 294 sent: 2 x 147
    crashed = _run(source, tmp_path / "out", run_name, point, *skip)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    finished = _run(source, tmp_path / "out", run_name, None, *skip)
    assert finished.returncode == 0, finished.stderr[-3000:]

    out = pl.read_parquet(tmp_path / "out" / run_name / "output" / "*.parquet")
    assert sorted(out["n"].cast(pl.Int64).to_list()) == list(range(ROWS))
    skipped = out.filter(pl.col(ERROR_CODE).is_not_null())
    assert sorted(skipped["n"].cast(pl.Int64).to_list()) == [i for i in range(ROWS) if i % 50 == 7]
    assert set(skipped[ERROR_CODE]) == {"MissingInput"}


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


def _questions(tmp_path: Path) -> Path:
    """question_answering rows whose prompts start with their own text (the emulator quotes it)."""
    source = tmp_path / "questions.csv"
    pl.DataFrame({"source": [f"Q{i:04d} what is {i} + 1?" for i in range(ROWS)]}).write_csv(source)
    return source


def _ctrl_c_command(source: Path, out: Path, run_name: str, per_job: int) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "run",
        "--source", str(source), "--prompt-id", "question_answering", "--model-id",
        INTERRUPTED_MODEL, "--output-uri", str(out), "--run-name", run_name,
        "--max-concurrent-jobs", "2", "--max-records-per-job", str(per_job),
    ]  # fmt: skip


def _interrupt_while_two_jobs_run(
    stack, command: list[str], env: dict[str, str], run_name: str, log: Path
) -> tuple[int, float, list[dict]]:
    """Run ``command`` in a session of its own (a terminal's foreground group, which Ctrl-C
    signals whole), SIGINT it once two of its jobs are InProgress (held there by a fault), and
    return its exit code, the seconds it took to go (killed after 60 s) and its jobs as the
    run left them: read before the fault is lifted, after which they go on and may complete."""
    stack.set_faults(stuck_job_names_containing=run_name, stuck_after_fraction=0.5)
    # A run that does not go prints every thread's stack on SIGABRT, into its stderr.
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    try:
        with log.open("w") as stderr:
            run = subprocess.Popen(command, env=env, stderr=stderr, start_new_session=True)

            def two_running() -> bool:
                # A run that ended before its jobs ran fails the test now, with its stderr,
                # instead of after the whole wait with no word of why.
                if run.poll() is not None:
                    msg = f"the run exited {run.returncode} before two jobs ran:\n"
                    raise AssertionError(msg + log.read_text()[-3000:])
                return [j["status"] for j in stack.ledger(run_name)].count("InProgress") == 2

            eventually(two_running, timeout=120, what="two of the run's jobs InProgress")
            os.killpg(run.pid, signal.SIGINT)
            interrupted_at = time.monotonic()
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _abort_with_stacks(run)
            gone_after = time.monotonic() - interrupted_at
            return run.returncode, gone_after, stack.ledger(run_name)
    finally:
        stack.set_faults(stuck_job_names_containing=None)


def _abort_with_stacks(run: subprocess.Popen) -> None:
    """End a run that hung after its interrupt, its stacks in its stderr first; and its
    temporary Prefect server, which lives in a session of its own and would outlive it."""
    children = [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if _parent_pid(stat) == run.pid
    ]
    os.kill(run.pid, signal.SIGABRT)
    try:
        run.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _parent_pid(stat: Path) -> int | None:
    try:
        # pid (comm) state ppid ...; comm may hold spaces, so read after its last ')'.
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_ctrl_c_while_jobs_run_leaves_them_running_and_the_same_command_resumes(stack, tmp_path):
    # Polars' SIGINT handler (SA_RESTART) kept Ctrl-C from reaching the waiting run: it went on
    # until every job ended, then hung on its dead temporary Prefect server. And the crash
    # hook stopped the jobs the CLI's message said would keep running. Two jobs run, the
    # third shard waits for a slot of the gate of 2.
    out = tmp_path / "out"
    command = _ctrl_c_command(_questions(tmp_path), out, "ctrl-c", per_job=100)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), EXPIRY_ENV: "3"}
    env.pop(ENV, None)

    code, left_after, jobs = _interrupt_while_two_jobs_run(
        stack, command, env, "ctrl-c", tmp_path / "stderr.txt"
    )

    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 130, stderr[-8000:]
    assert left_after < 30, left_after  # it waited for its jobs to end before: minutes
    # The CLI's last word; Prefect's events worker may still log its flush after it.
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors[-1].startswith("error: interrupted; jobs already submitted"), stderr[-3000:]
    # Not stopped by a crash hook; the third shard, waiting for a gate slot, made no job.
    assert [j["status"] for j in jobs] == ["InProgress"] * 2

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)

    assert finished.returncode == 0, finished.stderr[-3000:]
    after = stack.ledger("ctrl-c")
    assert [j["jobArn"] for j in after[:2]] == [j["jobArn"] for j in jobs] and len(after) == 3
    assert_answers_match_rows(pl.read_parquet(out / "ctrl-c" / "output" / "*.parquet"), ROWS)


def test_ctrl_c_with_the_temporary_prefect_server_ends_the_run_in_seconds(stack, tmp_path):
    # Without PREFECT_API_URL the CLI runs on Prefect's temporary server, a child in the
    # terminal's process group: Ctrl-C killed it too, and the interrupted run retried the
    # dead server for minutes and never exited (killed after 120 s).
    command = _ctrl_c_command(_questions(tmp_path), tmp_path / "out", "sigint-temp", per_job=150)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), EXPIRY_ENV: "3"}
    # The temporary server starts on an empty home: imports and every database migration,
    # ~5 s on an idle machine and over Prefect's 20 s default while the suite's first, slowest
    # tests run side by side (the CLI then exited with "Timed out while attempting to connect
    # to ephemeral Prefect API server"). A wait on that start-up only; a run that exits fails
    # the test at once (two_running).
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
    for name in ("PREFECT_API_URL", ENV):
        env.pop(name, None)

    code, left_after, jobs = _interrupt_while_two_jobs_run(
        stack, command, env, "sigint-temp", tmp_path / "stderr.txt"
    )

    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 130, stderr[-8000:]
    assert left_after < 30, left_after
    assert "Connection refused" not in stderr
    # The error line is the last a user reads: Prefect's "Stopping temporary server" line,
    # which it logs on exit, came after it.
    assert "Stopping temporary server" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted; "), stderr[-2000:]
    assert [j["status"] for j in jobs] == ["InProgress"] * 2


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_killed_run_takes_its_temporary_prefect_server_with_it(tmp_path):
    # A CLI run SIGKILLed (or killed by the OOM killer) left Prefect's temporary server, in a
    # session of its own, running for good: eleven of them, 220 MB each, after one afternoon.
    script = (
        "import time\n"
        "from flows.cli import _temporary_server_apart\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "_temporary_server_apart()\n"
        "print(SubprocessASGIServer().server_process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"  # see the Ctrl-C test
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    server_pid = None
    try:
        server_pid = int(run.stdout.readline())
        assert _running(server_pid)
        run.kill()
        run.wait(timeout=10)
        gone = eventually(lambda: not _running(server_pid), timeout=30, fail=False)
        assert gone, f"the temporary server {server_pid} outlived its killed run"
    finally:
        run.kill()
        if server_pid and _running(server_pid):
            os.kill(server_pid, signal.SIGKILL)
