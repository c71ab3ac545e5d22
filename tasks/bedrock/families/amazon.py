"""Amazon models: Nova 1 and Nova 2 (messages-v1 schema) and Titan Text Embeddings v2."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import AliasChoices, Field

from tasks.bedrock.families.base import ModelFamily, Options, TextOptions, _field, _one, _struct
from tasks.bedrock.families.converse import (
    MESSAGES_FILTERED,
    MESSAGES_OUTPUT,
    MESSAGES_SHAPE,
    parse_messages_output,
)
from tasks.pipeline.columns import INPUT_TOKENS, embedding_column


class NovaOptions(TextOptions):
    """Nova's inferenceConfig; max_new_tokens is the Nova 1 user guide's spelling."""

    max_tokens: int = Field(
        512, gt=0, validation_alias=AliasChoices("max_tokens", "max_new_tokens", "maxTokens")
    )
    top_k: int | None = Field(None, ge=0)


class AmazonNova(ModelFamily):
    """Amazon Nova text models (Nova 1, Premier, Nova 2) through the messages-v1 invoke schema.

    Nova 2 with reasoning enabled puts `reasoningContent` blocks before the text block; they
    carry no `text`, so only the answer lands in response_text.
    """

    name = "amazon-nova"
    prefixes = ("amazon.nova-",)
    options_model = NovaOptions
    output_dtype = MESSAGES_OUTPUT
    expected_shape = MESSAGES_SHAPE
    filtered_stop_reasons = MESSAGES_FILTERED

    def body_expr(self, prompt, system, options):
        return _struct(
            schemaVersion="messages-v1",
            system=_one(_struct(text=system)) if system is not None else None,
            messages=_one(_struct(role="user", content=_one(_struct(text=prompt)))),
            inferenceConfig=_struct(
                maxTokens=options.max_tokens,
                temperature=options.temperature,
                topP=options.top_p,
                topK=options.top_k,
                stopSequences=options.stop_sequences,
            ),
        )

    def parse_exprs(self, output):
        return parse_messages_output(output)


class TitanOptions(Options):
    """Titan v2's output size, normalisation and embedding types."""

    dimensions: Literal[256, 512, 1024] = 1024
    normalize: bool = True
    embedding_types: list[Literal["float", "binary"]] | None = Field(
        None,
        min_length=1,
        validation_alias=AliasChoices("embedding_types", "embeddingTypes"),
        description="Titan v2's embeddingTypes: float, binary or both (default float).",
    )


# embeddingTypes "accepts a list containing 'float', 'binary', or both"; the answer's
# embeddingsByType holds each asked type, "binary": [int,..] (model-parameters-titan-embed-
# text.html, V2 Request and Response, read 2026-12-07). Binary values are 0 or 1: UInt8.
_TITAN_DTYPES: dict[str, pl.DataType] = {"float": pl.Float32(), "binary": pl.UInt8()}


class TitanEmbedV2(ModelFamily):
    """Amazon Titan Text Embeddings v2 (8k tokens or 50k characters per input)."""

    name = "amazon-titan-embed-v2"
    prefixes = ("amazon.titan-embed-text-v2",)
    is_embedding = True
    supports_system = False
    max_input_chars = 50_000
    options_model = TitanOptions
    embedding_dimensions = (256, 512, 1024)
    expected_shape = "embedding[] or embeddingsByType.<type>[], inputTextTokenCount"
    output_dtype = pl.Struct(
        {
            "embedding": pl.List(pl.Float32),
            "inputTextTokenCount": pl.Int64,
            "embeddingsByType": pl.Struct({k: pl.List(v) for k, v in _TITAN_DTYPES.items()}),
        }
    )
    embedding_dtypes = _TITAN_DTYPES

    def body_expr(self, prompt, system, options):
        return _struct(
            inputText=prompt,
            dimensions=options.dimensions,
            normalize=options.normalize,
            embeddingTypes=options.embedding_types,
        )

    def parse_exprs(self, output):
        by_type = _field(output, "embeddingsByType")
        return [
            *(
                (
                    pl.coalesce(_field(output, "embedding"), by_type.struct.field(kind))
                    if kind == "float"
                    else by_type.struct.field(kind)
                ).alias(embedding_column(kind))
                for kind in self.output_types
            ),
            _field(output, "inputTextTokenCount").alias(INPUT_TOKENS),
        ]
