"""Model families: request bodies, outputs parsed through the merge path, id lookup, options."""

from __future__ import annotations

import json

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.bedrock import families as mf
from tasks.errors import InvalidOptionsError, UnknownModelError
from tasks.pipeline import columns as C

PROMPT = 'Say "hi"\n{x}'


def body_of(model_id, system="Be brief.", overrides=None, invocation_type="InvokeModel"):
    family = mf.family_for(model_id, invocation_type)
    options = family.options({"max_tokens": 100, "temperature": 0.5}, overrides)
    frame = pl.DataFrame({"p": [PROMPT]})
    encoded = frame.select(family.body_expr(pl.col("p"), system, options).struct.json_encode())
    return json.loads(encoded.item())


def parse(model_id, outputs, invocation_type="InvokeModel"):
    family = mf.family_for(model_id, invocation_type)
    frame = pl.DataFrame({"line": [json.dumps(o) for o in outputs]})
    decoded = frame.select(pl.col("line").str.json_decode(family.output_dtype).alias("o"))
    return decoded.select(family.parse_exprs(pl.col("o")))


def test_anthropic_body_is_messages_api():
    assert body_of("anthropic.claude-3-haiku-20240307-v1:0") == {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 100,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.5,
    }


def test_anthropic_body_without_system_leaves_system_out():
    assert "system" not in body_of("anthropic.claude-3-haiku-20240307-v1:0", system=None)


def test_nova_body_uses_invoke_schema_with_inference_config():
    assert body_of("us.amazon.nova-lite-v1:0", overrides={"stop_sequences": ["END"]}) == {
        "schemaVersion": "messages-v1",
        "system": [{"text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"text": PROMPT}]}],
        "inferenceConfig": {"maxTokens": 100, "temperature": 0.5, "stopSequences": ["END"]},
    }


def test_nova_options_accept_max_new_tokens_spelling():
    body = body_of("amazon.nova-pro-v1:0", overrides={"max_new_tokens": 7})
    assert body["inferenceConfig"]["maxTokens"] == 7


def test_converse_body_for_any_text_model():
    assert body_of("anthropic.claude-3-haiku-20240307-v1:0", invocation_type="Converse") == {
        "messages": [{"role": "user", "content": [{"text": PROMPT}]}],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 100, "temperature": 0.5},
    }


def test_llama_body_uses_llama3_chat_format():
    assert body_of("meta.llama3-8b-instruct-v1:0") == {
        "prompt": (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{PROMPT}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "max_gen_len": 100,
        "temperature": 0.5,
    }


def test_mistral_body_wraps_prompt_in_inst_tags():
    assert body_of("mistral.mistral-7b-instruct-v0:2", overrides={"stop": ["</s>"]}) == {
        "prompt": f"<s>[INST] Be brief.\n\n{PROMPT} [/INST]",
        "max_tokens": 100,
        "temperature": 0.5,
        "stop": ["</s>"],
    }


def test_titan_body_ignores_generation_params_and_system():
    assert body_of("amazon.titan-embed-text-v2:0") == {
        "inputText": PROMPT,
        "dimensions": 1024,
        "normalize": True,
    }


def test_cohere_body_sends_one_text_as_search_document():
    assert body_of("cohere.embed-english-v3", overrides={"input_type": "search_query"}) == {
        "texts": [PROMPT],
        "input_type": "search_query",
    }


def test_anthropic_output_parses_text_stop_reason_and_usage():
    out = {
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 3},
    }
    expected = pl.DataFrame(
        {C.RESPONSE_TEXT: ["Hello there"], C.STOP_REASON: ["end_turn"]}
    ).with_columns(
        pl.lit(12, dtype=pl.Int64).alias(C.INPUT_TOKENS),
        pl.lit(3, dtype=pl.Int64).alias(C.OUTPUT_TOKENS),
    )
    assert_frame_equal(parse("anthropic.claude-3-haiku-20240307-v1:0", [out]), expected)


@pytest.mark.parametrize(
    ("model_id", "invocation_type"),
    [("amazon.nova-lite-v1:0", "InvokeModel"), ("meta.llama3-8b-instruct-v1:0", "Converse")],
)
def test_nova_and_converse_outputs_parse_message_content(model_id, invocation_type):
    out = {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hi"}]}},
        "stopReason": "max_tokens",
        "usage": {"inputTokens": 5, "outputTokens": 1, "totalTokens": 6},
    }
    row = parse(model_id, [out], invocation_type).row(0, named=True)
    assert row == {
        C.RESPONSE_TEXT: "Hi",
        C.STOP_REASON: "max_tokens",
        C.INPUT_TOKENS: 5,
        C.OUTPUT_TOKENS: 1,
    }


def test_llama_output_parses_generation_and_counts():
    out = {
        "generation": "Yo",
        "prompt_token_count": 9,
        "generation_token_count": 2,
        "stop_reason": "stop",
    }
    row = parse("meta.llama3-70b-instruct-v1:0", [out]).row(0, named=True)
    assert row == {
        C.RESPONSE_TEXT: "Yo",
        C.STOP_REASON: "stop",
        C.INPUT_TOKENS: 9,
        C.OUTPUT_TOKENS: 2,
    }


def test_mistral_output_has_no_token_counts():
    out = {"outputs": [{"text": "Bonjour", "stop_reason": "stop"}]}
    row = parse("mistral.mistral-large-2402-v1:0", [out]).row(0, named=True)
    assert row == {
        C.RESPONSE_TEXT: "Bonjour",
        C.STOP_REASON: "stop",
        C.INPUT_TOKENS: None,
        C.OUTPUT_TOKENS: None,
    }


def test_titan_output_is_float32_embedding_with_token_count():
    frame = parse(
        "amazon.titan-embed-text-v2:0", [{"embedding": [0.5, -1.0], "inputTextTokenCount": 4}]
    )
    expected = pl.DataFrame(
        {C.EMBEDDING: [[0.5, -1.0]], C.INPUT_TOKENS: [4]},
        schema={C.EMBEDDING: pl.List(pl.Float32), C.INPUT_TOKENS: pl.Int64},
    )
    assert_frame_equal(frame, expected)


def test_cohere_output_takes_first_embedding_and_null_tokens():
    out = {
        "embeddings": [[0.25, 0.75]],
        "id": "x",
        "response_type": "embeddings_floats",
        "texts": ["a"],
    }
    expected = pl.DataFrame(
        {C.EMBEDDING: [[0.25, 0.75]], C.INPUT_TOKENS: [None]},
        schema={C.EMBEDDING: pl.List(pl.Float32), C.INPUT_TOKENS: pl.Int64},
    )
    assert_frame_equal(parse("cohere.embed-multilingual-v3", [out]), expected)


@pytest.mark.parametrize("prefix", ["", "us.", "eu.", "apac.", "global."])
def test_family_for_strips_inference_profile_prefix(prefix):
    assert mf.family_for(prefix + "anthropic.claude-sonnet-4-20250514-v1:0").name == "anthropic"


def test_family_for_accepts_inference_profile_arn():
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.amazon.nova-micro-v1:0"
    assert mf.family_for(arn).name == "amazon-nova"


def test_family_for_unknown_model_lists_registered_families():
    with pytest.raises(UnknownModelError) as exc:
        mf.family_for("acme.brainy-v1")
    message = str(exc.value)
    assert "'acme.brainy-v1'" in message
    for needle in ("anthropic.*", "amazon.titan-embed-text-v2*", "cohere.embed-*", "meta.llama*"):
        assert needle in message


def test_family_for_converse_with_embedding_model_is_refused():
    with pytest.raises(InvalidOptionsError, match="embedding model"):
        mf.family_for("amazon.titan-embed-text-v2:0", "Converse")


def test_family_for_unknown_invocation_type_names_the_choices():
    with pytest.raises(InvalidOptionsError, match="InvokeModel, Converse"):
        mf.family_for("anthropic.claude-3-haiku-20240307-v1:0", "Batch")


def test_options_unknown_override_lists_accepted_names():
    family = mf.family_for("anthropic.claude-3-haiku-20240307-v1:0")
    with pytest.raises(InvalidOptionsError) as exc:
        family.options({}, {"max_tokenz": 5})
    assert "max_tokenz" in str(exc.value)
    assert "max_tokens" in str(exc.value)


def test_options_invalid_value_names_the_field():
    family = mf.family_for("amazon.titan-embed-text-v2:0")
    with pytest.raises(InvalidOptionsError, match="dimensions"):
        family.options({}, {"dimensions": 100})


class FakeFamily(mf.ModelFamily):
    name = "fake"
    prefixes = ("acme.",)
    output_dtype = pl.Struct({"text": pl.String})

    def body_expr(self, prompt, system, options):
        return pl.struct(prompt.alias("q"))

    def parse_exprs(self, output):
        return [output.struct.field("text").alias(C.RESPONSE_TEXT)]


@pytest.fixture
def fake_family():
    family = mf.register(FakeFamily())
    try:
        yield family
    finally:
        mf.unregister(family.name)


def test_register_makes_a_new_family_findable(fake_family):
    assert mf.family_for("us.acme.brainy-v1") is fake_family
    assert fake_family in mf.families()


def test_register_twice_is_refused(fake_family):
    with pytest.raises(ValueError, match="already registered"):
        mf.register(FakeFamily())


# -- Documented response shapes through the merge path (shapes copied, values invented) -------

CLAUDE_45 = "anthropic.claude-sonnet-4-5-20250929-v1:0"
ROWS = ["R0", "R1", "R2"]


def _line(record_id, output):
    return json.dumps({"modelInput": {"echo": 1}, "modelOutput": output, "recordId": record_id})


def merged(tmp_path, model_id, outputs, invocation_type="InvokeModel", extra_lines=()):
    """merge_shard over one output per row (R0, R1, ...) plus any raw extra lines."""
    from tasks.pipeline.merge import merge_shard

    ids = [f"R{i}" for i in range(len(outputs) + len(extra_lines))]
    rows = tmp_path / "rows.parquet"
    pl.DataFrame({C.RECORD_ID: ids}).write_parquet(rows)
    lines = [_line(r, o) for r, o in zip(ids, outputs, strict=False)] + list(extra_lines)
    dest = tmp_path / "part.parquet"
    stats = merge_shard(rows, [("\n".join(lines) + "\n").encode()], model_id, invocation_type, dest)
    return stats, pl.read_parquet(dest)


TEXT_SHAPES = [
    pytest.param(
        CLAUDE_45,
        "InvokeModel",
        {
            "id": "msg_bdrk_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Hello"},
            ],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 3},
        },
        ("Hello", "end_turn", 12, 3),
        id="anthropic-with-thinking",
    ),
    pytest.param(
        "us.amazon.nova-2-lite-v1:0",
        "InvokeModel",
        {
            "output": {
                "message": {
                    "role": "assistant",
                    "content": [
                        {"reasoningContent": {"reasoningText": {"text": "step 1"}}},
                        {"text": "Answer"},
                    ],
                }
            },
            "stopReason": "end_turn",
            "usage": {"inputTokens": 7, "outputTokens": 4, "totalTokens": 11},
        },
        ("Answer", "end_turn", 7, 4),
        id="nova2-reasoning",
    ),
    pytest.param(
        "amazon.nova-lite-v1:0",
        "InvokeModel",
        {
            "output": {"message": {"role": "assistant", "content": [{"text": "Hi"}]}},
            "stopReason": "max_tokens",
            "usage": {"inputTokens": 5, "outputTokens": 1, "totalTokens": 6},
        },
        ("Hi", "max_tokens", 5, 1),
        id="nova1",
    ),
    pytest.param(
        "qwen.qwen3-32b-v1:0",
        "Converse",
        {
            "output": {"message": {"role": "assistant", "content": [{"text": "Conv"}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 8, "outputTokens": 2, "totalTokens": 10},
            "metrics": {"latencyMs": 300},
        },
        ("Conv", "end_turn", 8, 2),
        id="converse-any-text-model",
    ),
    pytest.param(
        "us.meta.llama4-scout-17b-instruct-v1:0",
        "InvokeModel",
        {
            "generation": "Yo",
            "prompt_token_count": 9,
            "generation_token_count": 2,
            "stop_reason": "stop",
        },
        ("Yo", "stop", 9, 2),
        id="llama4",
    ),
    pytest.param(
        "mistral.mistral-small-2402-v1:0",
        "InvokeModel",
        {"outputs": [{"text": "Bonjour", "stop_reason": "stop"}]},
        ("Bonjour", "stop", None, None),
        id="mistral-text",
    ),
    pytest.param(
        "mistral.mistral-large-2407-v1:0",
        "InvokeModel",
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Salut"},
                    "stop_reason": "stop",
                }
            ]
        },
        ("Salut", "stop", None, None),
        id="mistral-chat",
    ),
    pytest.param(
        "openai.gpt-oss-20b-1:0",
        "InvokeModel",
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "openai.gpt-oss-20b-1:0",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "<reasoning>think first</reasoning>Final",
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26},
        },
        ("Final", "stop", 20, 6),
        id="gpt-oss",
    ),
    pytest.param(
        "deepseek.v3-v1:0",
        "InvokeModel",
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "DS"},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13},
        },
        ("DS", "length", 4, 9),
        id="deepseek",
    ),
]


@pytest.mark.parametrize(("model_id", "invocation_type", "output", "expected"), TEXT_SHAPES)
def test_merge_parses_each_documented_text_shape(
    tmp_path, model_id, invocation_type, output, expected
):
    stats, frame = merged(tmp_path, model_id, [output], invocation_type)
    row = frame.row(0, named=True)
    assert (
        row[C.RESPONSE_TEXT],
        row[C.STOP_REASON],
        row[C.INPUT_TOKENS],
        row[C.OUTPUT_TOKENS],
    ) == expected
    assert row[C.ERROR_CODE] is None and row[C.RAW_OUTPUT] is None
    assert stats.succeeded == 1


EMBED_SHAPES = [
    pytest.param(
        "amazon.titan-embed-text-v2:0",
        {"embedding": [0.25] * 256, "inputTextTokenCount": 4},
        4,
        id="titan-v2",
    ),
    pytest.param(
        "cohere.embed-english-v3",
        {
            "id": "e1",
            "embeddings": [[0.25] * 1024],
            "response_type": "embeddings_floats",
            "texts": ["a"],
        },
        None,
        id="cohere-v3-floats",
    ),
    pytest.param(
        "cohere.embed-v4:0",
        {
            "id": "e2",
            "embeddings": {"float": [[0.25] * 1536]},
            "response_type": "embeddings_by_type",
            "texts": ["a"],
        },
        None,
        id="cohere-v4-by-type",
    ),
]


@pytest.mark.parametrize(("model_id", "output", "tokens"), EMBED_SHAPES)
def test_merge_parses_each_documented_embedding_shape(tmp_path, model_id, output, tokens):
    vector = output.get("embedding") or (
        output["embeddings"]["float"][0]
        if isinstance(output["embeddings"], dict)
        else output["embeddings"][0]
    )
    stats, frame = merged(tmp_path, model_id, [output])
    row = frame.row(0, named=True)
    assert frame.schema[C.EMBEDDING] == pl.List(pl.Float32)
    assert row[C.EMBEDDING] == vector
    assert row[C.INPUT_TOKENS] == tokens
    assert row[C.ERROR_CODE] is None
    assert stats.succeeded == 1


def test_merge_cohere_shapes_mixed_in_one_shard(tmp_path):
    floats = {"embeddings": [[0.5] * 1024], "response_type": "embeddings_floats"}
    typed = {"embeddings": {"float": [[0.75] * 1024]}, "response_type": "embeddings_by_type"}
    _, frame = merged(tmp_path, "cohere.embed-multilingual-v3", [floats, typed])
    assert frame[C.EMBEDDING].list.first().to_list() == [0.5, 0.75]
    assert frame[C.ERROR_CODE].to_list() == [None, None]


GOOD_CLAUDE = {
    "content": [{"type": "text", "text": "fine"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


@pytest.mark.parametrize(
    ("model_id", "bad_output", "reason"),
    [
        pytest.param(
            "mistral.mistral-large-2407-v1:0",
            {"outputs": [{"text": "old shape", "stop_reason": "stop"}]},
            "no response_text",
            id="mistral-chat-given-text-shape",
        ),
        pytest.param(
            "anthropic.claude-3-haiku-20240307-v1:0",
            {"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"},
            "no input_tokens",
            id="anthropic-without-usage",
        ),
        pytest.param(
            "anthropic.claude-3-haiku-20240307-v1:0",
            {"completion": "legacy text completions shape"},
            "no response_text",
            id="anthropic-unknown-shape",
        ),
        pytest.param(
            "anthropic.claude-3-haiku-20240307-v1:0",
            "{not json",
            "not JSON of the anthropic family's shape",
            id="modelOutput-not-json",
        ),
        pytest.param(
            "anthropic.claude-3-haiku-20240307-v1:0",
            {"content": {"type": "text"}, "usage": []},
            "not JSON of the anthropic family's shape",
            id="wrong-types",
        ),
        pytest.param(
            "amazon.titan-embed-text-v2:0",
            {"embedding": [0.1, 0.2], "inputTextTokenCount": 2},
            "wrong length",
            id="titan-wrong-dimension",
        ),
        pytest.param(
            "cohere.embed-v4:0",
            {"embeddings": {"int8": [[1] * 256]}, "response_type": "embeddings_by_type"},
            "no embedding",
            id="cohere-without-float",
        ),
    ],
)
def test_merge_unparseable_output_is_an_error_row_and_the_rest_merge(
    tmp_path, model_id, bad_output, reason
):
    good = {
        "amazon.titan-embed-text-v2:0": {"embedding": [0.5] * 512, "inputTextTokenCount": 3},
        "cohere.embed-v4:0": {"embeddings": {"float": [[0.5] * 256]}},
        "mistral.mistral-large-2407-v1:0": {
            "choices": [{"message": {"content": "ok"}, "stop_reason": "stop"}]
        },
    }.get(model_id, GOOD_CLAUDE)
    stats, frame = merged(tmp_path, model_id, [good, bad_output, good])
    assert frame[C.ERROR_CODE].to_list() == [None, C.UNPARSEABLE_OUTPUT, None]
    bad = frame.row(1, named=True)
    assert reason in bad[C.ERROR_MESSAGE]
    raw = bad[C.RAW_OUTPUT]
    assert raw == bad_output if isinstance(bad_output, str) else json.loads(raw) == bad_output
    assert frame[C.RAW_OUTPUT].null_count() == 2
    assert (stats.succeeded, stats.failed) == (2, 1)


def test_merge_invalid_json_line_keeps_the_line_and_the_other_rows(tmp_path):
    broken = '{"modelInput": {}, "modelOutput": {"content": [{"type": "te, "recordId": "R1"}'
    _, frame = merged(
        tmp_path, "anthropic.claude-3-haiku-20240307-v1:0", [GOOD_CLAUDE], extra_lines=[broken]
    )
    assert frame[C.ERROR_CODE].to_list() == [None, C.UNPARSEABLE_OUTPUT]
    assert frame[C.RAW_OUTPUT].to_list() == [None, broken]
    assert frame[C.RESPONSE_TEXT].to_list() == ["fine", None]


def test_unparseable_output_is_not_retried():
    from tasks.pipeline.attempts import RETRYABLE_RECORD_ERRORS

    assert C.UNPARSEABLE_OUTPUT not in RETRYABLE_RECORD_ERRORS


# -- Request bodies of the new families -------------------------------------------------------


def test_anthropic_newer_model_refuses_temperature_with_top_p():
    family = mf.family_for("global." + CLAUDE_45)
    with pytest.raises(InvalidOptionsError) as exc:
        family.options({"temperature": 0.5}, {"top_p": 0.9})
    message = str(exc.value)
    assert "temperature" in message and "top_p" in message and CLAUDE_45 in message


def test_anthropic_newer_model_accepts_temperature_alone():
    assert body_of(CLAUDE_45)["temperature"] == 0.5


def test_anthropic_older_model_accepts_temperature_with_top_p():
    body = body_of("anthropic.claude-3-haiku-20240307-v1:0", overrides={"top_p": 0.9})
    assert (body["temperature"], body["top_p"]) == (0.5, 0.9)


@pytest.mark.parametrize(
    ("model_id", "invocation_type", "alias"),
    [
        ("anthropic.claude-3-haiku-20240307-v1:0", "InvokeModel", "max_tokens"),
        ("us.anthropic.claude-3-5-haiku-20241022-v1:0", "Converse", "max_tokens"),
        ("meta.llama3-1-70b-instruct-v1:0", "InvokeModel", "max_gen_len"),
    ],
)
def test_max_tokens_over_the_models_output_limit_is_refused_before_any_job(
    model_id, invocation_type, alias
):
    # Bedrock fails every record of such a job ("exceeds the model limit of 4096"); the
    # limit is the catalog's, whatever the family calls the setting.
    limit = mf.catalog.lookup(model_id).max_output_tokens
    family = mf.family_for(model_id, invocation_type)
    assert family.options({}, {alias: limit}).max_tokens == limit
    with pytest.raises(InvalidOptionsError) as exc:
        family.options({}, {alias: limit + 1})
    message = str(exc.value)
    assert f"max_tokens={limit + 1}" in message and f"{limit:,}" in message
    assert mf.catalog.base_model_id(model_id) in message


def test_max_tokens_of_a_model_without_a_known_limit_is_left_to_bedrock():
    family = mf.family_for("amazon.nova-2-lite-v1:0")
    assert mf.catalog.lookup("amazon.nova-2-lite-v1:0").max_output_tokens is None
    assert family.options({}, {"max_tokens": 60_000}).max_tokens == 60_000


def test_mistral_chat_body_sends_messages_with_system_role():
    assert body_of("mistral.mistral-large-2407-v1:0") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": PROMPT},
        ],
        "max_tokens": 100,
        "temperature": 0.5,
    }


def test_gpt_oss_body_uses_max_completion_tokens():
    assert body_of("openai.gpt-oss-120b-1:0", system=None) == {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_completion_tokens": 100,
        "temperature": 0.5,
    }


def test_qwen_body_uses_max_tokens():
    body = body_of("qwen.qwen3-coder-30b-a3b-v1:0", overrides={"stop_sequences": ["END"]})
    assert body["max_tokens"] == 100 and body["stop"] == ["END"]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}


def test_llama4_body_uses_llama4_header_tokens():
    prompt = body_of("us.meta.llama4-maverick-17b-instruct-v1:0", system=None)["prompt"]
    assert prompt == (
        f"<|begin_of_text|><|header_start|>user<|header_end|>\n\n{PROMPT}<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


def test_cohere_v4_body_sends_embedding_types_and_output_dimension():
    body = body_of(
        "cohere.embed-v4:0",
        overrides={"embedding_types": ["float"], "output_dimension": 512, "truncate": "RIGHT"},
    )
    assert body == {
        "texts": [PROMPT],
        "input_type": "search_document",
        "truncate": "RIGHT",
        "embedding_types": ["float"],
        "output_dimension": 512,
    }


def test_cohere_v3_body_sends_truncate_start():
    body = body_of("cohere.embed-english-v3", overrides={"truncate": "START"})
    assert body == {"texts": [PROMPT], "input_type": "search_document", "truncate": "START"}


@pytest.mark.parametrize(
    ("model_id", "truncate", "accepted"),
    [
        ("cohere.embed-english-v3", "LEFT", "NONE, START, END"),
        ("cohere.embed-multilingual-v3", "RIGHT", "NONE, START, END"),
        ("cohere.embed-v4:0", "END", "NONE, LEFT, RIGHT"),
        ("us.cohere.embed-v4:0", "START", "NONE, LEFT, RIGHT"),
    ],
)
def test_cohere_truncate_of_the_other_embed_version_is_refused(model_id, truncate, accepted):
    # AWS documents truncate NONE|START|END for Embed v3 and NONE|LEFT|RIGHT for Embed v4.
    with pytest.raises(InvalidOptionsError) as exc:
        body_of(model_id, overrides={"truncate": truncate})
    message = str(exc.value)
    assert f"truncate={truncate!r} is not accepted by {model_id.removeprefix('us.')}" in message
    assert f"it takes {accepted}" in message


def test_cohere_character_limit_is_embed_v3_only():
    # v3 documents 2,048 characters a text; v4 documents a ~128k-token context.
    assert mf.family_for("cohere.embed-english-v3").max_input_chars == 2048
    assert mf.family_for("cohere.embed-v4:0").max_input_chars is None
    assert mf.family_for("global.cohere.embed-v4:0").max_input_chars is None


@pytest.mark.parametrize(
    ("model_id", "family"),
    [
        ("openai.gpt-oss-20b-1:0", "openai-gpt-oss"),
        ("deepseek.v3-v1:0", "openai-compatible"),
        ("mistral.mistral-large-2407-v1:0", "mistral-chat"),
        ("mistral.mistral-large-2402-v1:0", "mistral"),
        ("cohere.embed-v4:0", "cohere-embed"),
    ],
)
def test_family_for_picks_the_catalog_family(model_id, family):
    assert mf.family_for(model_id).name == family


@pytest.mark.parametrize(
    "model_id", ["openai.gpt-oss-20b-1:0", "qwen.qwen3-32b-v1:0", "deepseek.v3-v1:0"]
)
def test_family_for_converse_works_for_any_catalog_text_model(model_id):
    assert mf.family_for(model_id, "Converse").name == "converse"


def test_family_for_unknown_model_names_the_closest_catalog_ids():
    with pytest.raises(UnknownModelError, match="anthropic.claude-3-haiku-20240307-v1:0"):
        mf.family_for("antropic.claude-3-haiku-20240307-v1:0")


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-3-haiku-20240307-v1:0",
        "mistral.mistral-large-2402-v1:0",
        "amazon.nova-lite-v1:0",
    ],
)
def test_an_empty_stop_sequence_is_refused(model_id):
    # It went into every record's body as "stop_sequences": [""].
    family = mf.family_for(model_id)
    with pytest.raises(InvalidOptionsError, match="a stop sequence is empty"):
        family.options({}, {"stop_sequences": ["END", ""]})
    assert family.options({}, {"stop_sequences": ["\n\n"]}).stop_sequences == ["\n\n"]


def _claude(stop_reason, content, tokens=(12, 0)):
    usage = {"input_tokens": tokens[0], "output_tokens": tokens[1]}
    return {"content": content, "stop_reason": stop_reason, "usage": usage}


def _messages(stop_reason, text, tokens=(12, 9)):
    usage = {"inputTokens": tokens[0], "outputTokens": tokens[1], "totalTokens": sum(tokens)}
    message = {"role": "assistant", "content": [{"text": text}]}
    return {"output": {"message": message}, "stopReason": stop_reason, "usage": usage}


def _chat(finish_reason, text):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    usage = {"prompt_tokens": 12, "completion_tokens": 9}
    return {"choices": [{**choice, "finish_reason": finish_reason}], "usage": usage}


BLOCKED = "The generated text has been blocked by our content filters."
FILTERED_SHAPES = [
    # Claude's refusal: empty content, or the text written before the classifier stopped it.
    pytest.param(CLAUDE_45, "InvokeModel", _claude("refusal", []), None, id="claude-refusal"),
    pytest.param(
        CLAUDE_45,
        "InvokeModel",
        _claude("refusal", [{"type": "text", "text": "Sure, step one"}], (12, 4)),
        "Sure, step one",
        id="claude-refusal-partial",
    ),
    # Nova writes a notice in place of the answer, with stopReason content_filtered.
    pytest.param(
        "amazon.nova-lite-v1:0",
        "InvokeModel",
        _messages("content_filtered", BLOCKED),
        BLOCKED,
        id="nova-content-filtered",
    ),
    pytest.param(
        CLAUDE_45, "Converse", _messages("guardrail_intervened", "x"), "x", id="converse-guardrail"
    ),
    pytest.param("qwen.qwen3-32b-v1:0", "InvokeModel", _chat("content_filter", ""), "", id="qwen"),
]


@pytest.mark.parametrize(("model_id", "invocation_type", "output", "text"), FILTERED_SHAPES)
def test_merge_refused_or_filtered_answer_is_a_content_filtered_error_keeping_what_was_written(
    tmp_path, model_id, invocation_type, output, text
):
    # A refusal passed for a success when it carried text (the filter's notice read as the
    # answer), or for an UnparseableOutput when it carried none; either way the row must say
    # what stopped it, keep what was paid for, and not be retried (it would be refused again).
    ok = {
        "amazon.nova-lite-v1:0": _messages("end_turn", "fine"),
        "qwen.qwen3-32b-v1:0": _chat("stop", "fine"),
    }.get(model_id, _claude("end_turn", [{"type": "text", "text": "fine"}], (12, 9)))
    if invocation_type == "Converse":
        ok = _messages("end_turn", "fine")
    stats, frame = merged(tmp_path, model_id, [output, ok], invocation_type)
    reason = frame[C.STOP_REASON][0]
    assert frame[C.ERROR_CODE].to_list() == [C.CONTENT_FILTERED, None]
    assert frame[C.ERROR_MESSAGE][0] == (
        f"The model refused, or a content filter stopped the answer (stop reason {reason!r}); "
        "response_text holds what was written before, if anything. Not retried: the same "
        "request would be refused again."
    )
    assert frame[C.RESPONSE_TEXT].to_list() == [text, "fine"]
    assert frame[C.INPUT_TOKENS][0] == 12 and frame[C.RAW_OUTPUT][0] is None
    assert (stats.succeeded, stats.failed) == (1, 1)


def test_merge_length_cut_answer_is_kept_with_its_stop_reason(tmp_path):
    output = _claude("max_tokens", [{"type": "text", "text": "Once upon a"}], (12, 3))
    _, frame = merged(tmp_path, CLAUDE_45, [output])
    assert frame.select(C.RESPONSE_TEXT, C.STOP_REASON, C.ERROR_CODE).row(0) == (
        "Once upon a",
        "max_tokens",
        None,
    )


@pytest.mark.parametrize("model_id", ["cohere.embed-v4:0", "global.cohere.embed-v4:0"])
def test_cohere_v4_dimensions_override_sets_output_dimension(model_id):
    # The run's `dimensions` override (`--dimensions`) is Embed v4's output_dimension: the
    # only way a run can ask v4 for 256, 512 or 1024 dimensions.
    body = body_of(model_id, overrides={"dimensions": 512})
    assert body == {"texts": [PROMPT], "input_type": "search_document", "output_dimension": 512}


def test_cohere_v3_dimensions_are_refused():
    # Embed v3 documents no output_dimension; its vectors are 1,024 long.
    with pytest.raises(InvalidOptionsError) as exc:
        body_of("cohere.embed-english-v3", overrides={"dimensions": 512})
    assert "dimensions=512 is not accepted by cohere.embed-english-v3" in str(exc.value)
