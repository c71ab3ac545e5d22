"""Anthropic Claude (3 to 4.x) through the messages API."""

from __future__ import annotations

import polars as pl
from pydantic import Field

from tasks.bedrock.families.base import (
    ModelFamily,
    TextOptions,
    _field,
    _one,
    _struct,
    _texts_joined,
)
from tasks.pipeline.columns import INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_TEXT, STOP_REASON


class AnthropicOptions(TextOptions):
    """Claude's sampling options; the 4.1+ models take temperature or top_p, not both."""

    top_k: int | None = Field(None, ge=0, description="Sample from the k likeliest tokens.")


class AnthropicMessages(ModelFamily):
    """Anthropic Claude through the messages API (model-parameters-anthropic-claude-messages)."""

    name = "anthropic"
    prefixes = ("anthropic.",)
    options_model = AnthropicOptions
    expected_shape = "content[].text, usage.input_tokens, usage.output_tokens"
    # Claude 4+ stops with "refusal" when its safety classifiers intervene, with empty content
    # or the text written before (platform.claude.com/docs/en/build-with-claude/
    # handling-stop-reasons).
    filtered_stop_reasons = ("refusal",)
    output_dtype = pl.Struct(
        {
            "content": pl.List(pl.Struct({"type": pl.String, "text": pl.String})),
            "stop_reason": pl.String,
            "usage": pl.Struct({"input_tokens": pl.Int64, "output_tokens": pl.Int64}),
        }
    )

    def body_expr(self, prompt, system, options):
        return _struct(
            anthropic_version="bedrock-2023-05-31",
            max_tokens=options.max_tokens,
            system=system,
            messages=_one(_struct(role="user", content=prompt)),
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            stop_sequences=options.stop_sequences,
        )

    # A forced tool call answers with a tool_use block (no text) whose `input` is the object.
    tool_input_path = "$.content[?(@.type=='tool_use')].input"

    def structured_fields(self, schema):
        """A forced tool call: `tools` + `tool_choice: {type: tool, name}` (InvokeModel batch)."""
        tool = {"name": schema.name, "input_schema": schema.json_schema}
        if schema.description:
            tool["description"] = schema.description
        return {"tools": [tool], "tool_choice": {"type": "tool", "name": schema.name}}

    def json_instruction(self, schema):
        return False

    def parse_exprs(self, output):
        return [
            _texts_joined(_field(output, "content")).alias(RESPONSE_TEXT),
            _field(output, "stop_reason").alias(STOP_REASON),
            _field(output, "usage", "input_tokens").alias(INPUT_TOKENS),
            _field(output, "usage", "output_tokens").alias(OUTPUT_TOKENS),
        ]
