"""Mistral: text-completion models (prompt → outputs[]) and chat models (messages → choices[])."""

from __future__ import annotations

import polars as pl
from pydantic import AliasChoices, Field

from tasks.bedrock.families.base import (
    ModelFamily,
    TextOptions,
    _chat_messages,
    _field,
    _struct,
)
from tasks.pipeline.columns import INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_TEXT, STOP_REASON


class MistralOptions(TextOptions):
    """Mistral's options; `stop` is its name for stop sequences."""

    stop_sequences: list[str] | None = Field(
        None, validation_alias=AliasChoices("stop_sequences", "stop")
    )
    top_k: int | None = Field(None, ge=0)


class Mistral(ModelFamily):
    """Mistral text completion (7B, Mixtral, Small/Large 2402): `<s>[INST] ... [/INST]`.

    No system role, so a system prompt leads the user prompt; the response has no token counts.
    """

    name = "mistral"
    prefixes = ("mistral.",)
    supports_system = False
    options_model = MistralOptions
    reports_tokens = False
    expected_shape = "outputs[0].text"
    output_dtype = pl.Struct(
        {"outputs": pl.List(pl.Struct({"text": pl.String, "stop_reason": pl.String}))}
    )

    def body_expr(self, prompt, system, options):
        head = "<s>[INST] " + (f"{system}\n\n" if system is not None else "")
        return _struct(
            prompt=pl.concat_str([pl.lit(head), prompt, pl.lit(" [/INST]")]),
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            stop=options.stop_sequences,
        )

    def parse_exprs(self, output):
        first = _field(output, "outputs").list.first()
        return [
            first.struct.field("text").alias(RESPONSE_TEXT),
            first.struct.field("stop_reason").alias(STOP_REASON),
            pl.lit(None, dtype=pl.Int64).alias(INPUT_TOKENS),
            pl.lit(None, dtype=pl.Int64).alias(OUTPUT_TOKENS),
        ]


class ChatOptions(TextOptions):
    """Mistral chat completion's options (no top_k in the chat API)."""

    stop_sequences: list[str] | None = Field(
        None, validation_alias=AliasChoices("stop_sequences", "stop")
    )


class MistralChat(ModelFamily):
    """Mistral chat completion (Large 2407 and later): messages in, choices[0].message out.

    AWS's "Mistral AI chat completion" page (read 2026-11-22) documents `messages` with
    system/user/assistant roles and `choices[].message.content` with `stop_reason`; it shows
    no usage block, so token counts are read when present but not required.
    """

    name = "mistral-chat"
    prefixes = ()  # chosen through the catalog: the ids look like the text models'
    options_model = ChatOptions
    reports_tokens = False
    expected_shape = "choices[0].message.content"
    output_dtype = pl.Struct(
        {
            "choices": pl.List(
                pl.Struct(
                    {
                        "message": pl.Struct({"content": pl.String}),
                        "stop_reason": pl.String,
                        "finish_reason": pl.String,
                    }
                )
            ),
            "usage": pl.Struct({"prompt_tokens": pl.Int64, "completion_tokens": pl.Int64}),
        }
    )

    def body_expr(self, prompt, system, options):
        return _struct(
            messages=_chat_messages(prompt, system),
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=options.stop_sequences,
        )

    def parse_exprs(self, output):
        first = _field(output, "choices").list.first()
        return [
            first.struct.field("message").struct.field("content").alias(RESPONSE_TEXT),
            pl.coalesce(
                first.struct.field("stop_reason"), first.struct.field("finish_reason")
            ).alias(STOP_REASON),
            _field(output, "usage", "prompt_tokens").alias(INPUT_TOKENS),
            _field(output, "usage", "completion_tokens").alias(OUTPUT_TOKENS),
        ]
