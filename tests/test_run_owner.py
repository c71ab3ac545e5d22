"""One owner per run (local and S3 claims), and adopting a job by name only when it is ours."""

from __future__ import annotations

import json
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


def test_claim_run_released_claim_is_free_at_once(layout):
    claim_run(layout, flow_run_id="one").release()

    again = claim_run(layout, flow_run_id="two")

    again.release()


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
