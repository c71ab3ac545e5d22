"""Meta Llama 3 and 4 instruct models: a prompt in the Llama chat format, max_gen_len."""

from __future__ import annotations

import polars as pl
from pydantic import AliasChoices, Field

from tasks.bedrock.families.base import ModelFamily, Options, _field, _struct
from tasks.bedrock.model_ids import base_model_id
from tasks.pipeline.columns import INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_TEXT, STOP_REASON


class LlamaOptions(Options):
    """Llama's sampling options; max_gen_len is Bedrock's name for max_tokens."""

    max_tokens: int = Field(512, gt=0, validation_alias=AliasChoices("max_tokens", "max_gen_len"))
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)


class MetaLlama(ModelFamily):
    """Meta Llama 3.x and 4 instruct models (model-parameters-meta)."""

    name = "meta-llama"
    prefixes = ("meta.llama",)
    options_model = LlamaOptions
    expected_shape = "generation, prompt_token_count, generation_token_count"
    output_dtype = pl.Struct(
        {
            "generation": pl.String,
            "prompt_token_count": pl.Int64,
            "generation_token_count": pl.Int64,
            "stop_reason": pl.String,
        }
    )

    @staticmethod
    def chat_prompt(prompt: pl.Expr, system: str | None, llama4: bool = False) -> pl.Expr:
        """The Llama 3 (or Llama 4) chat format around the user prompt (and system prompt)."""
        # Llama 4 renamed the header tokens (<|header_start|>, <|eot|>); Meta's Llama 4 model
        # card, not read from AWS's page (unverified for Bedrock).
        start, end, eot = (
            ("<|header_start|>", "<|header_end|>", "<|eot|>")
            if llama4
            else ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        )
        head = "<|begin_of_text|>"
        if system is not None:
            head += f"{start}system{end}\n\n{system}{eot}"
        head += f"{start}user{end}\n\n"
        tail = f"{eot}{start}assistant{end}\n\n"
        return pl.concat_str([pl.lit(head), prompt, pl.lit(tail)])

    def body_expr(self, prompt, system, options):
        llama4 = self.model_id is not None and base_model_id(self.model_id).startswith(
            "meta.llama4"
        )
        return _struct(
            prompt=self.chat_prompt(prompt, system, llama4),
            max_gen_len=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
        )

    def parse_exprs(self, output):
        return [
            _field(output, "generation").alias(RESPONSE_TEXT),
            _field(output, "stop_reason").alias(STOP_REASON),
            _field(output, "prompt_token_count").alias(INPUT_TOKENS),
            _field(output, "generation_token_count").alias(OUTPUT_TOKENS),
        ]
