"""Model-family registry: request bodies, output parsing, id lookup, options."""

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
