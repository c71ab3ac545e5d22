"""bedrock-runtime InvokeModel and Converse against the same responders as batch jobs."""

from __future__ import annotations

import json

import pytest
from botocore.config import Config
from emu_helpers import anthropic_body

INVOKE_CASES = [
    ("anthropic.claude-3-5-sonnet-20240620-v1:0", anthropic_body(1), "content"),
    (
        "us.amazon.nova-pro-v1:0",
        {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        "output",
    ),
    ("amazon.titan-embed-text-v2:0", {"inputText": "hello", "dimensions": 512}, "embedding"),
    (
        "cohere.embed-multilingual-v3",
        {"texts": ["hola"], "input_type": "search_query"},
        "embeddings",
    ),
    ("meta.llama3-1-70b-instruct-v1:0", {"prompt": "hi", "max_gen_len": 20}, "generation"),
    ("mistral.mistral-large-2402-v1:0", {"prompt": "hi", "max_tokens": 20}, "outputs"),
]


def _invoke(stack, model_id, body, **kwargs):
    client = stack.client("bedrock-runtime", **kwargs)
    response = client.invoke_model(modelId=model_id, body=json.dumps(body))
    return json.loads(response["body"].read())


@pytest.mark.parametrize(("model_id", "body", "key"), INVOKE_CASES)
def test_invoke_model_answers_each_family(stack, model_id, body, key):
    first = _invoke(stack, model_id, body)
    assert key in first
    assert _invoke(stack, model_id, body) == first  # deterministic per input


def test_invoke_model_titan_embedding_has_dimension_and_unit_norm(stack):
    out = _invoke(stack, "amazon.titan-embed-text-v2:0", {"inputText": "x", "dimensions": 256})
    assert len(out["embedding"]) == 256
    assert abs(sum(v * v for v in out["embedding"]) - 1.0) < 1e-3
    assert out["inputTextTokenCount"] > 0


def test_invoke_model_anthropic_usage_and_emulated_text(stack):
    out = _invoke(stack, "anthropic.claude-3-haiku-20240307-v1:0", anthropic_body(3, max_tokens=5))
    assert out["content"][0]["text"].startswith("[emulated anthropic.claude-3-haiku]")
    assert out["usage"]["output_tokens"] == 5 and out["stop_reason"] == "max_tokens"
    assert out["usage"]["input_tokens"] > 0


def test_invoke_model_body_not_fitting_the_family(stack):
    client = stack.client("bedrock-runtime")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.invoke_model(
            modelId="anthropic.claude-3-haiku-20240307-v1:0", body=json.dumps({"prompt": "x"})
        )
    assert "required key [anthropic_version] not found" in err.value.response["Error"]["Message"]


def test_invoke_model_unknown_model(stack):
    client = stack.client("bedrock-runtime")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.invoke_model(modelId="acme.gpt-9", body=b"{}")
    assert "'acme.gpt-9' is invalid" in err.value.response["Error"]["Message"]


def test_invoke_model_throttled_by_fault(stack):
    stack.set_faults(throttle_invoke_rate=1.0)
    client = stack.client("bedrock-runtime", config=Config(retries={"max_attempts": 1}))
    with pytest.raises(client.exceptions.ThrottlingException):
        client.invoke_model(modelId="meta.llama3-1-8b-instruct-v1:0", body=b'{"prompt": "x"}')


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "amazon.nova-micro-v1:0",
        "meta.llama3-1-8b-instruct-v1:0",
        "mistral.mistral-small-2402-v1:0",
    ],
)
def test_converse_answers_text_models(stack, model_id):
    client = stack.client("bedrock-runtime")
    out = client.converse(
        modelId=model_id,
        messages=[{"role": "user", "content": [{"text": "Tell me a joke"}]}],
        system=[{"text": "Be brief"}],
        inferenceConfig={"maxTokens": 40},
    )
    text = out["output"]["message"]["content"][0]["text"]
    assert text.startswith("[emulated") and "Tell me a joke" in text
    assert out["usage"]["totalTokens"] == out["usage"]["inputTokens"] + out["usage"]["outputTokens"]
    assert out["stopReason"] in ("end_turn", "max_tokens") and out["metrics"]["latencyMs"] > 0


def test_converse_embedding_model_is_refused(stack):
    client = stack.client("bedrock-runtime")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.converse(
            modelId="amazon.titan-embed-text-v2:0",
            messages=[{"role": "user", "content": [{"text": "x"}]}],
        )
    assert "doesn't support the model" in err.value.response["Error"]["Message"]


def _headers(stack, model_id, body) -> tuple[dict, dict]:
    client = stack.client("bedrock-runtime")
    response = client.invoke_model(modelId=model_id, body=json.dumps(body))
    return json.loads(response["body"].read()), response["ResponseMetadata"]["HTTPHeaders"]


def test_invoke_model_cohere_embed_sends_its_input_tokens_in_a_header(stack):
    from emulator.catalog import lookup
    from emulator.responders import count_tokens

    body = {"texts": ["hola mundo, otra vez"], "input_type": "search_query"}
    out, headers = _headers(stack, "cohere.embed-multilingual-v3", body)
    charged, _ = count_tokens(
        json.dumps(body), lookup("cohere.embed-multilingual-v3"), "InvokeModel"
    )
    assert "meta" not in out and "usage" not in out  # the body counts nothing
    assert headers["x-amzn-bedrock-input-token-count"] == str(charged)
    assert "x-amzn-bedrock-output-token-count" not in headers


def test_invoke_model_text_model_headers_match_its_body_usage(stack):
    out, headers = _headers(stack, "anthropic.claude-3-haiku-20240307-v1:0", anthropic_body(2))
    assert headers["x-amzn-bedrock-input-token-count"] == str(out["usage"]["input_tokens"])
    assert headers["x-amzn-bedrock-output-token-count"] == str(out["usage"]["output_tokens"])
