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
