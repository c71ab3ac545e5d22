"""OpenAI chat-completions models on Bedrock: gpt-oss, Qwen3, DeepSeek."""

from __future__ import annotations

import polars as pl

from tasks.bedrock.families.base import (
    ModelFamily,
    TextOptions,
    _chat_messages,
    _field,
    _struct,
)
from tasks.pipeline.columns import INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_TEXT, STOP_REASON

# gpt-oss through InvokeModel puts its reasoning, in <reasoning> tags, before the answer
# (AWS "OpenAI models" page, read 2026-11-22); the answer alone is the response text.
_REASONING = r"(?s)^\s*<reasoning>.*?</reasoning>\s*"


class OpenAICompatible(ModelFamily):
    """Models that take and return OpenAI's chat-completion objects (Qwen3, DeepSeek V3.1)."""

    name = "openai-compatible"
    prefixes = ("qwen.", "deepseek.")
    options_model = TextOptions
    max_tokens_field = "max_tokens"
    expected_shape = "choices[0].message.content, usage.prompt_tokens, usage.completion_tokens"
    # OpenAI's finish_reason "content_filter": "content was omitted due to a flag from our
    # content filters" (openai/openai-python commit f10c757, chat/completions.ts).
    filtered_stop_reasons = ("content_filter",)
    output_dtype = pl.Struct(
        {
            "choices": pl.List(
                pl.Struct(
                    {"message": pl.Struct({"content": pl.String}), "finish_reason": pl.String}
                )
            ),
            "usage": pl.Struct({"prompt_tokens": pl.Int64, "completion_tokens": pl.Int64}),
        }
    )

    def body_expr(self, prompt, system, options):
        return _struct(
            messages=_chat_messages(prompt, system),
            **{self.max_tokens_field: options.max_tokens},
            temperature=options.temperature,
            top_p=options.top_p,
            stop=options.stop_sequences,
        )

    def parse_exprs(self, output):
        first = _field(output, "choices").list.first()
        return [
            first.struct.field("message")
            .struct.field("content")
            .str.replace(_REASONING, "")
            .alias(RESPONSE_TEXT),
            first.struct.field("finish_reason").alias(STOP_REASON),
            _field(output, "usage", "prompt_tokens").alias(INPUT_TOKENS),
            _field(output, "usage", "completion_tokens").alias(OUTPUT_TOKENS),
        ]


class OpenAIGptOss(OpenAICompatible):
    """OpenAI gpt-oss-20b/120b: chat completions with max_completion_tokens."""

    name = "openai-gpt-oss"
    prefixes = ("openai.",)
    max_tokens_field = "max_completion_tokens"
