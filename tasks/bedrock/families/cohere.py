"""Cohere Embed v3 and v4: one text per record; floats as a list or keyed by type."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from tasks.bedrock.families.base import ModelFamily, Options, _field, _one, _struct
from tasks.pipeline.columns import EMBEDDING, INPUT_TOKENS

_FLOATS = pl.List(pl.List(pl.Float32))
# v3 without embedding_types answers {"embeddings": [[...]], "response_type":
# "embeddings_floats"}; v4, and v3 with embedding_types, answer {"embeddings": {"float":
# [[...]]}, "response_type": "embeddings_by_type"} (Bedrock model parameters for Cohere Embed
# v3 and v4, read 2026-11-22).
_AS_LIST = pl.Struct({"embeddings": _FLOATS})
_BY_TYPE = pl.Struct({"embeddings": pl.Struct({"float": _FLOATS})})
_BY_TYPE_PATTERN = r'"embeddings"\s*:\s*\{'


class CohereOptions(Options):
    """Cohere Embed's request fields; only float vectors are parsed back."""

    input_type: Literal["search_document", "search_query", "classification", "clustering"] = (
        "search_document"
    )
    truncate: Literal["NONE", "START", "END"] | None = None
    embedding_types: list[Literal["float"]] | None = Field(
        None, description="Cohere's embedding_types; the parser reads the float vectors."
    )
    output_dimension: Literal[256, 512, 1024, 1536] | None = Field(
        None, description="Embed v4 only: the vector length (default 1536)."
    )


class CohereEmbed(ModelFamily):
    """Cohere Embed (English and multilingual v3, v4): 2,048 characters at most per text."""

    name = "cohere-embed"
    prefixes = ("cohere.embed-",)
    is_embedding = True
    supports_system = False
    max_input_chars = 2_048
    options_model = CohereOptions
    # Cohere's embed responses carry no token count; null is honest where an estimate would
    # mislead billing, so tokens are not required for a success.
    reports_tokens = False
    embedding_dimensions = (256, 512, 1024, 1536)
    expected_shape = "embeddings[0] or embeddings.float[0]"
    output_dtype = _AS_LIST

    def body_expr(self, prompt, system, options):
        return _struct(
            texts=_one(prompt),
            input_type=options.input_type,
            truncate=options.truncate,
            embedding_types=options.embedding_types,
            output_dimension=options.output_dimension,
        )

    def parse_exprs(self, output):
        return [
            _field(output, "embeddings").list.first().alias(EMBEDDING),
            pl.lit(None, dtype=pl.Int64).alias(INPUT_TOKENS),
        ]

    def decode_raw(self, raw):
        # Two shapes in one column: each row is decoded with the dtype of its own shape, and
        # both end up as the float list of lists `parse_exprs` reads.
        by_type = raw.str.contains(_BY_TYPE_PATTERN)
        as_list = pl.when(~by_type).then(raw).str.json_decode(_AS_LIST)
        keyed = pl.when(by_type).then(raw).str.json_decode(_BY_TYPE)
        return pl.struct(
            pl.coalesce(_field(as_list, "embeddings"), _field(keyed, "embeddings", "float")).alias(
                "embeddings"
            )
        )
