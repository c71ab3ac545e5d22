"""The emulator's Bedrock API call counter (GET /_emulator/calls, LocalStack.api_calls)."""

from __future__ import annotations

import json
import time

import pytest
from botocore.config import Config
from emu_helpers import HAIKU, anthropic_body, create_job, put_jsonl, records

from emulator import LocalStack

# total_max_attempts counts the first try too (max_attempts would allow one retry).
NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"})
MESSAGES = [{"role": "user", "content": [{"text": "What is two times two?"}]}]


@pytest.fixture(scope="module")
def own_stack():
    """A stack of this module's own, so no other test's calls are in the counts."""
    with LocalStack() as stack:
        yield stack


def _known_sequence(stack) -> None:
    """1 create, 3 gets (1 not found, 1 throttled), 2 lists, 1 stop, 2 invokes, 1 converse,
    1 count-tokens."""
    bedrock = stack.client("bedrock", config=NO_RETRY)
    runtime = stack.client("bedrock-runtime", config=NO_RETRY)
    uri = put_jsonl(stack, "in/counter.jsonl", records(100))
    arn = create_job(stack, "counter", uri, client=bedrock)
    bedrock.get_model_invocation_job(jobIdentifier=arn)
    with pytest.raises(bedrock.exceptions.ResourceNotFoundException):
        bedrock.get_model_invocation_job(jobIdentifier="000000000000")
    bedrock.list_model_invocation_jobs()
    bedrock.list_model_invocation_jobs(nameContains="counter")
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    for i in range(2):
        runtime.invoke_model(modelId=HAIKU, body=json.dumps(anthropic_body(i)))
    runtime.converse(modelId=HAIKU, messages=MESSAGES)
    runtime.count_tokens(modelId=HAIKU, input={"converse": {"messages": MESSAGES}})
    stack.set_faults(throttle_get_rate=1.0)
    try:
        with pytest.raises(bedrock.exceptions.ThrottlingException):
            bedrock.get_model_invocation_job(jobIdentifier=arn)
    finally:
        stack.reset_faults()


def test_api_calls_count_each_operation_with_throttled_and_failed_apart(own_stack):
    own_stack.reset_api_calls()
    before = time.time()
    _known_sequence(own_stack)
    after = time.time()

    counts = own_stack.api_calls()

    summary = {
        name: (op["calls"], op["throttled"], op["errors"])
        for name, op in counts["operations"].items()
    }
    assert summary == {
        "CreateModelInvocationJob": (1, 0, 0),
        "GetModelInvocationJob": (3, 1, 1),
        "ListModelInvocationJobs": (2, 0, 0),
        "StopModelInvocationJob": (1, 0, 0),
        "InvokeModel": (2, 0, 0),
        "Converse": (1, 0, 0),
        "CountTokens": (1, 0, 0),
    }
    for op in counts["operations"].values():
        seconds = [int(s) for s in op["per_second"]]
        assert sum(op["per_second"].values()) == op["calls"]
        assert int(before) <= min(seconds) and max(seconds) <= int(after)
    assert counts["since"] <= before <= after <= counts["now"]


def test_reset_api_calls_starts_from_zero(own_stack):
    own_stack.client("bedrock").list_model_invocation_jobs()
    assert own_stack.api_calls()["operations"]["ListModelInvocationJobs"]["calls"] >= 1

    own_stack.reset_api_calls()

    assert own_stack.api_calls()["operations"] == {}
