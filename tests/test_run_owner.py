"""One owner per run (local and S3 claims), and adopting a job by name only when it is ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tasks.aws import storage
from tasks.aws.submit import JobRequest, client_token_for, find_own_job, job_name_for, run_key
from tasks.errors import RunOwnedError
from tasks.run.layout import RunLayout, layout_for
from tasks.run.owner import EXPIRY_ENV, claim_run

ROLE = "arn:aws:iam::123456789012:role/BedrockBatchEmulatorRole"
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path, local_stack, monkeypatch) -> RunLayout:
    monkeypatch.setenv(EXPIRY_ENV, "1")
    if request.param == "local":
        return layout_for(str(tmp_path / "out"), f"owned-{request.param}")
    return layout_for(f"s3://{local_stack.bucket}/owner-tests/{tmp_path.name}", "owned-s3")


def test_claim_run_refuses_a_second_owner_naming_the_first(layout, monkeypatch):
    # Long enough that a heartbeat starved by a loaded machine still lands (one every 2 s).
    monkeypatch.setenv(EXPIRY_ENV, "8")
    first = claim_run(layout, flow_run_id="flow-run-1")
    try:
        with pytest.raises(RunOwnedError, match="already running: flow run flow-run-1 on host"):
            claim_run(layout, flow_run_id="flow-run-2").release()
    finally:
        first.release()
    assert not storage.exists(layout.owner_uri)


def test_claim_run_takes_over_a_claim_that_stopped_being_refreshed(layout):
    crashed = claim_run(layout, flow_run_id="crashed")
    crashed._stop.set()  # the heartbeat dies with its process; the claim stays behind
    crashed._thread.join()
    started = time.monotonic()

    second = claim_run(layout, flow_run_id="second")

    assert time.monotonic() - started < 10
    holder = json.loads(storage.read_bytes(layout.owner_uri))
    assert holder["flow_run_id"] == "second"
    second.release()


@pytest.mark.parametrize("garbage", [b"", b'{"claim_id": "ab', b"[1, 2]"])
def test_claim_run_takes_over_an_unreadable_claim_after_the_expiry(layout, garbage):
    # A claim emptied, cut or overwritten (a full disk, a sync tool) ended the run with a
    # JSONDecodeError traceback; watched like a crashed owner's, it is taken over.
    storage.write_bytes(layout.owner_uri, garbage)

    claim = claim_run(layout, flow_run_id="after-damage")

    holder = json.loads(storage.read_bytes(layout.owner_uri))
    assert holder["flow_run_id"] == "after-damage"
    claim.release()


def test_claim_run_released_claim_is_free_at_once(layout):
    claim_run(layout, flow_run_id="one").release()

    again = claim_run(layout, flow_run_id="two")

    again.release()


# A process that claims the run and then does nothing: killed, it leaves its claim behind.
CLAIM_AND_WAIT = """
import sys, time
from tasks.run.layout import RunLayout
from tasks.run.owner import claim_run
claim_run(RunLayout(*sys.argv[1:4]), flow_run_id="killed")
print("claimed", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_a_claim_whose_process_was_killed_on_this_machine_is_taken_over_at_once(
    layout, monkeypatch, reaped
):
    monkeypatch.setenv(EXPIRY_ENV, "60")
    owner = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_WAIT, layout.run_name, layout.run_dir, layout.job_prefix],
        stdout=subprocess.PIPE,
        text=True,
        # Its heartbeat every half second, so the refusal below comes quickly.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), EXPIRY_ENV: "2"},
    )
    try:
        assert owner.stdout.readline() == "claimed\n"
        # Alive, its claim stands: a second claim is refused once the heartbeat moves it.
        monkeypatch.setenv(EXPIRY_ENV, "8")
        with pytest.raises(RunOwnedError, match="already running: flow run killed"):
            claim_run(layout, flow_run_id="too-early").release()
        monkeypatch.setenv(EXPIRY_ENV, "60")
    finally:
        owner.kill()
    if reaped:
        owner.wait()
    started = time.monotonic()

    second = claim_run(layout, flow_run_id="second")

    took = time.monotonic() - started
    holder = json.loads(storage.read_bytes(layout.owner_uri))
    second.release()
    owner.wait()
    assert holder["flow_run_id"] == "second"
    assert took < 5  # not the 60-s expiry: the owner's process is provably gone


def test_a_claim_from_another_machine_is_watched_for_the_whole_expiry(layout, monkeypatch):
    # Same pid as a process that is gone here, but another boot: nothing proves it dead.
    crashed = claim_run(layout, flow_run_id="elsewhere")
    crashed._stop.set()
    crashed._thread.join()
    holder = json.loads(storage.read_bytes(layout.owner_uri))
    holder["pid"] = 2**22 + 1  # above pid_max's ceiling: no process here has it
    holder["process"]["boot_id"] = "another-machine"
    storage.write_bytes(layout.owner_uri, json.dumps(holder).encode())
    monkeypatch.setenv(EXPIRY_ENV, "2")
    started = time.monotonic()

    claim_run(layout, flow_run_id="second").release()

    assert time.monotonic() - started >= 2


def test_find_own_job_adopts_only_a_job_whose_token_and_locations_match(stack):
    bucket = stack.bucket
    s3 = stack.client("s3")
    s3.put_object(Bucket=bucket, Key="adopt/input/shard-00000.jsonl", Body=b"{}\n" * 100)
    name = job_name_for("adopt", "shard-00000", 1, run_key("adopt", "s3://x", "run-a"))
    ours = JobRequest(
        job_name=name,
        client_token=client_token_for("run-a", "shard-00000", 1),
        model_id=CLAUDE,
        role_arn=ROLE,
        input_uri=f"s3://{bucket}/adopt/input/shard-00000.jsonl",
        output_uri=f"s3://{bucket}/adopt/bedrock-output/shard-00000/",
    )
    # Another run's job under the same name: its own token.
    foreign = JobRequest(**{**vars(ours), "client_token": client_token_for("run-b", "x", 1)})
    stack.client("bedrock").create_model_invocation_job(**foreign.to_api())

    assert find_own_job(ours) is None

    arn = stack.client("bedrock").create_model_invocation_job(**ours.to_api())["jobArn"]
    assert find_own_job(ours) == arn


def test_a_bad_owner_expiry_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    # float() of it ended a run with a ValueError traceback, where the README promises every
    # setting one line naming the variable, its value and what is wrong.
    from tasks.errors import RunSettingsError

    monkeypatch.setenv(EXPIRY_ENV, "1m")
    with pytest.raises(RunSettingsError) as exc:
        claim_run(layout_for(str(tmp_path / "out"), "bad-expiry"), flow_run_id="f")
    assert str(exc.value).startswith(f"Invalid setting {EXPIRY_ENV}='1m': ")
    assert not (tmp_path / "out" / "bad-expiry" / "owner.json").exists()


def test_a_heartbeat_whose_response_was_lost_keeps_the_claim(local_stack, tmp_path, monkeypatch):
    """A refresh S3 applied but whose answer never came is retried by botocore; the retry's
    If-Match names the old ETag and gets 412. The claim is still this process's own.

    A run refreshes its claim every 15 s for days (~40,000 conditional PUTs a week), so one
    lost response, a read timeout or a 500 after the write, is to be expected; it ended the
    run with "lost its claim ... to another process" while no other process existed.
    """
    from botocore.endpoint import Endpoint
    from botocore.exceptions import ReadTimeoutError

    monkeypatch.setenv(EXPIRY_ENV, "1")
    layout = layout_for(f"s3://{local_stack.bucket}/owner-tests/{tmp_path.name}", "lost-reply")
    send = Endpoint._send
    faulted, refreshed = threading.Event(), threading.Event()

    def lose_one_reply(self, request):
        response = send(self, request)
        conditional = request.method == "PUT" and "If-Match" in request.headers
        if conditional and faulted.is_set() and response.status_code == 200:
            refreshed.set()
        if conditional and not faulted.is_set() and response.status_code == 200:
            faulted.set()  # S3 wrote it; the answer is lost on the way back
            raise ReadTimeoutError(endpoint_url=request.url)
        return response

    claim = claim_run(layout, flow_run_id="only-owner")
    try:
        monkeypatch.setattr(Endpoint, "_send", lose_one_reply)
        assert faulted.wait(10)

        assert refreshed.wait(10), "the heartbeat stopped after the lost reply"
        claim.check()
    finally:
        monkeypatch.setattr(Endpoint, "_send", send)
        claim.release()
    assert not storage.exists(layout.owner_uri)


def test_a_claim_whose_creation_reply_was_lost_is_taken_at_once(local_stack, tmp_path, monkeypatch):
    """The first write's answer lost, botocore's retry of If-None-Match gets 412: the claim
    found is this process's own, not a live owner to watch for the whole expiry."""
    from botocore.endpoint import Endpoint
    from botocore.exceptions import ReadTimeoutError

    monkeypatch.setenv(EXPIRY_ENV, "30")
    layout = layout_for(f"s3://{local_stack.bucket}/owner-tests/{tmp_path.name}", "lost-create")
    send = Endpoint._send
    faulted = threading.Event()

    def lose_one_reply(self, request):
        response = send(self, request)
        created = request.method == "PUT" and "If-None-Match" in request.headers
        if created and not faulted.is_set() and response.status_code == 200:
            faulted.set()
            raise ReadTimeoutError(endpoint_url=request.url)
        return response

    monkeypatch.setattr(Endpoint, "_send", lose_one_reply)
    started = time.monotonic()
    claim = claim_run(layout, flow_run_id="only-owner")
    waited = time.monotonic() - started
    monkeypatch.setattr(Endpoint, "_send", send)
    claim.release()

    assert faulted.is_set()
    assert waited < 10


def test_a_flow_run_refused_for_a_live_owner_announces_no_run_failure(stack, tmp_path, monkeypatch):
    """A second click of "Run" is refused; the run it names is alive, not failed."""
    import polars as pl

    from flows import batch_inference as flow_module
    from tasks.run.params import BatchParams

    monkeypatch.setenv(EXPIRY_ENV, "2")  # the owner's claim is refreshed every 0.5 s
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": ["a", "b"]}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name="clicked-again",
    )
    announced: list[tuple] = []
    monkeypatch.setattr(flow_module.events, "emit_run_failed", lambda *a: announced.append(a))
    owner = claim_run(layout_for(params.output_uri, "clicked-again"), flow_run_id="the-first")
    try:
        with pytest.raises(RunOwnedError, match="already running: flow run the-first"):
            flow_module.batch_inference(params)
    finally:
        owner.release()
    assert announced == []
