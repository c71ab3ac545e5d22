"""Answer shapes the emulator writes, checked against the response fields AWS documents."""

from __future__ import annotations

import json

import polars as pl

from emulator.catalog import CATALOG
from emulator.responders import MODEL_INPUT, MODEL_OUTPUT, RECORD_ID, respond


def _answers(model_id: str, bodies: list[dict]) -> list[dict]:
    frame = pl.DataFrame(
        {
            RECORD_ID: [f"R{i}" for i in range(len(bodies))],
            MODEL_INPUT: [json.dumps(b) for b in bodies],
        }
    )
    out = respond(frame, CATALOG[model_id]).sort(RECORD_ID)
    return [json.loads(o) for o in out[MODEL_OUTPUT]]


def test_titan_v2_answer_always_carries_embeddings_by_type_float():
    # model-parameters-titan-embed-text.html, V2 Response: embedding, inputTextTokenCount and
    # embeddingsByType, which "will always appear" with "float" even without embeddingTypes.
    bodies = [{"inputText": "first text", "dimensions": 256}, {"inputText": "second, longer"}]
    first, second = _answers("amazon.titan-embed-text-v2:0", bodies)
    for answer, dims in ((first, 256), (second, 1024)):
        assert list(answer) == ["embedding", "inputTextTokenCount", "embeddingsByType"]
        assert list(answer["embeddingsByType"]) == ["float"]
        assert answer["embeddingsByType"]["float"] == answer["embedding"]
        assert len(answer["embedding"]) == dims
    assert first["embedding"][:256] != second["embedding"][:256]


def test_nova2_reasoning_block_is_redacted_and_the_answer_follows_it():
    # complete-request-schema-response.html: reasoningContent is "returned if reasoning was
    # enabled" and its text "will always be [REDACTED] in the response".
    body = {
        "schemaVersion": "messages-v1",
        "messages": [{"role": "user", "content": [{"text": "Name a prime above 10"}]}],
        "inferenceConfig": {"maxTokens": 200, "reasoningConfig": {"type": "enabled"}},
    }
    (answer,) = _answers("amazon.nova-2-lite-v1:0", [body])
    reasoning, text = answer["output"]["message"]["content"]
    assert reasoning == {"reasoningContent": {"reasoningText": {"text": "[REDACTED]"}}}
    assert "Reply to: Name a prime above 10" in text["text"]


def test_titan_v2_same_text_gets_the_same_vector_however_its_body_is_encoded():
    # A record retried on demand (botocore's json.dumps: spaces, \u escapes) must get the
    # vector its batch line (Polars' compact JSON) would have: same text, same embedding.
    body = {"inputText": "café 😀 中文", "dimensions": 256, "normalize": True}
    frame = pl.DataFrame(
        {
            RECORD_ID: ["R0", "R1"],
            MODEL_INPUT: [
                json.dumps(body),
                json.dumps(body, ensure_ascii=False, separators=(",", ":")),
            ],
        }
    )
    out = respond(frame, CATALOG["amazon.titan-embed-text-v2:0"]).sort(RECORD_ID)
    spaced, compact = (json.loads(o) for o in out[MODEL_OUTPUT])
    assert spaced["embedding"] == compact["embedding"]


LONG = 'Q17: how many "apples"?\nA crate holds 34 and another 56; café. Count them all, please.'
QUOTED = LONG[:40] + " ... " + LONG[-40:]


def test_a_reply_quotes_the_users_prompt_not_the_system_prompt():
    # Tests tell each answer's row by this quote: a system prompt shared by every row (Nova,
    # OpenAI-style messages, Llama's header) must not be what is quoted.
    system = "You answer questions carefully and briefly."
    nova = {
        "schemaVersion": "messages-v1",
        "system": [{"text": system}],
        "messages": [{"role": "user", "content": [{"text": LONG}]}],
    }
    (answer,) = _answers("amazon.nova-lite-v1:0", [nova])
    assert answer["output"]["message"]["content"][0]["text"].startswith(
        f"[emulated amazon.nova-lite] Reply to: {QUOTED} | "
    )
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": LONG}]}
    (answer,) = _answers("openai.gpt-oss-20b-1:0", [chat])
    assert f"Reply to: {QUOTED} | " in answer["choices"][0]["message"]["content"]
    llama = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{LONG}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    (answer,) = _answers("meta.llama3-1-8b-instruct-v1:0", [{"prompt": llama}])
    assert f"Reply to: {QUOTED} | " in answer["generation"]
    short = {"messages": [{"role": "user", "content": "Name a prime"}], "max_tokens": 50}
    (answer,) = _answers("openai.gpt-oss-20b-1:0", [short])
    assert "Reply to: Name a prime | " in answer["choices"][0]["message"]["content"]


def test_a_structured_answer_quotes_the_prompt_in_free_strings_only():
    # A quote in a string with rules of its own (maxLength, pattern, ...) could break them.
    schema = {
        "type": "object",
        "properties": {
            "reason": {"type": "string"},
            "code": {"type": "string", "maxLength": 30},
            "correct": {"type": "boolean"},
        },
        "required": ["reason", "code", "correct"],
    }
    body = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 300,
        "system": "You grade answers.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": LONG}]}],
        "tools": [{"name": "record", "description": "d", "input_schema": schema}],
        "tool_choice": {"type": "tool", "name": "record"},
    }
    (answer,) = _answers("anthropic.claude-3-haiku-20240307-v1:0", [body])
    (call,) = answer["content"]
    assert call["type"] == "tool_use"
    given = call["input"]
    assert given["reason"].endswith(f" re: {QUOTED}")
    assert given["code"].startswith("emulated code ") and " re: " not in given["code"]
    assert len(given["code"]) <= 30 and isinstance(given["correct"], bool)
