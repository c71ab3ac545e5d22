"""Per-record checks a model applies to its body, as Bedrock answers them (a 400 each)."""

from __future__ import annotations

import json

import pytest
from emu_helpers import (
    anthropic_body,
    create_job,
    output_records,
    put_jsonl,
    read_output,
    records,
    unique,
    wait_for,
)

SONNET_45 = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def _invoke_error(stack, model_id: str, body: dict) -> str | None:
    """InvokeModel's ValidationException message for ``body``, or None when it is answered."""
    client = stack.client("bedrock-runtime")
    try:
        client.invoke_model(modelId=model_id, body=json.dumps(body))
    except client.exceptions.ValidationException as exc:
        return exc.response["Error"]["Message"]
    return None


@pytest.mark.parametrize(
    ("model_id", "body", "limit"),
    [
        ("anthropic.claude-3-haiku-20240307-v1:0", anthropic_body(1), 4096),
        ("meta.llama3-1-70b-instruct-v1:0", {"prompt": "hi"}, 2048),
    ],
)
def test_max_tokens_over_the_models_cap_is_refused(stack, model_id, body, limit):
    key = "max_gen_len" if "llama" in model_id else "max_tokens"
    assert _invoke_error(stack, model_id, {**body, key: limit}) is None
    message = _invoke_error(stack, model_id, {**body, key: limit + 1})
    assert message == (
        f"The maximum tokens you requested exceeds the model limit of {limit}. Try again with a "
        f"maximum tokens value that is lower than {limit}."
    )
    message = _invoke_error(stack, model_id, {**body, key: 0})
    assert message is not None and f"#/{key}: 0 is not greater or equal to 1" in message


def test_temperature_with_top_p_is_refused_by_the_models_that_say_so(stack):
    both = {**anthropic_body(1), "temperature": 0.5, "top_p": 0.9}
    message = _invoke_error(stack, SONNET_45, both)
    assert message is not None and "cannot both be specified for this model" in message
    assert _invoke_error(stack, SONNET_45, {**anthropic_body(1), "temperature": 0.5}) is None
    assert _invoke_error(stack, "anthropic.claude-3-haiku-20240307-v1:0", both) is None


def test_converse_records_that_batch_refuses_fail_alone(stack):
    name = unique("conversebad")

    def body(i: int) -> dict:
        return {
            "messages": [{"role": "user", "content": [{"text": f"q{i}"}]}],
            "inferenceConfig": {"maxTokens": 50},
        }

    rows = records(100, body)
    bad = {
        "r00001": {**body(1), "toolConfig": {"tools": []}},
        "r00002": {"messages": [{"role": "user", "content": "a plain string"}]},
        "r00003": {**body(3), "inferenceConfig": {"maxTokens": 64_001}},
        "r00004": {**body(4), "inferenceConfig": {"temperature": 0.2, "topP": 0.9}},
    }
    for row in rows:
        row["modelInput"] = bad.get(row["recordId"], row["modelInput"])
    uri = put_jsonl(stack, f"in/{name}.jsonl", rows)
    arn = create_job(stack, name, uri, model_id=SONNET_45, modelInvocationType="Converse")
    job = wait_for(stack, arn)
    assert (job["status"], job["errorRecordCount"], job["successRecordCount"]) == (
        "Completed",
        4,
        96,
    )
    lines = output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])
    errors = {r["recordId"]: r["error"] for r in lines if "error" in r}
    assert set(errors) == set(bad) and {e["errorCode"] for e in errors.values()} == {400}
    assert "toolConfig" in errors["r00001"]["errorMessage"]
    assert "#/messages/0/content" in errors["r00002"]["errorMessage"]
    assert "model limit of 64000" in errors["r00003"]["errorMessage"]
    assert "cannot both be specified" in errors["r00004"]["errorMessage"]
