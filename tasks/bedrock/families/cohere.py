"""Cohere Embed v3 and v4: one text per record; floats as a list or keyed by type."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import AliasChoices, Field

from tasks.bedrock.families.base import ModelFamily, Options, _field, _one, _struct
from tasks.bedrock.model_ids import base_model_id
from tasks.errors import InvalidOptionsError
from tasks.pipeline.columns import EMBEDDING, INPUT_TOKENS

_FLOATS = pl.List(pl.List(pl.Float32))
# v3 without embedding_types answers {"embeddings": [[...]], "response_type":
# "embeddings_floats"}; v4, and v3 with embedding_types, answer {"embeddings": {"float":
# [[...]]}, "response_type": "embeddings_by_type"} (Bedrock model parameters for Cohere Embed
# v3 and v4, read 2026-11-22).
_AS_LIST = pl.Struct({"embeddings": _FLOATS})
_BY_TYPE = pl.Struct({"embeddings": pl.Struct({"float": _FLOATS})})
_BY_TYPE_PATTERN = r'"embeddings"\s*:\s*\{'

# v3 and v4 differ in two request facts. Embed v3: truncate "NONE|START|END", each text at most
# 2,048 characters (docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-embed-v3.html).
# Embed v4: truncate "NONE | LEFT | RIGHT", context "up to ~128k tokens" with no character limit
# (.../model-parameters-embed-v4.html). Both read 2026-12-08.
_V4_PREFIX = "cohere.embed-v4"
_V3_TRUNCATE = ("NONE", "START", "END")
_V4_TRUNCATE = ("NONE", "LEFT", "RIGHT")
_V3_MAX_CHARS = 2_048


def _is_v4(model_id: str | None) -> bool:
    return model_id is not None and base_model_id(model_id).startswith(_V4_PREFIX)


class CohereOptions(Options):
    """Cohere Embed's request fields; only float vectors are parsed back."""

    input_type: Literal["search_document", "search_query", "classification", "clustering"] = (
        "search_document"
    )
    truncate: Literal["NONE", "START", "END", "LEFT", "RIGHT"] | None = Field(
        None, description="v3: NONE, START or END; v4: NONE, LEFT or RIGHT."
    )
    embedding_types: list[Literal["float"]] | None = Field(
        None, description="Cohere's embedding_types; the parser reads the float vectors."
    )
    # `dimensions` too: the run's override (and `--dimensions`) names the vector length so for
    # every embedding model; without the alias Embed v4's length could not be chosen at all.
    output_dimension: Literal[256, 512, 1024, 1536] | None = Field(
        None,
        validation_alias=AliasChoices("output_dimension", "dimensions"),
        description="Embed v4 only: the vector length (default 1536).",
    )


class CohereEmbed(ModelFamily):
    """Cohere Embed (English and multilingual v3, v4): 2,048 characters a text on v3."""

    name = "cohere-embed"
    prefixes = ("cohere.embed-",)
    is_embedding = True
    supports_system = False
    max_input_chars = _V3_MAX_CHARS
    options_model = CohereOptions
    # Cohere's embed responses carry no token count; null is honest where an estimate would
    # mislead billing, so tokens are not required for a success.
    reports_tokens = False
    embedding_dimensions = (256, 512, 1024, 1536)
    expected_shape = "embeddings[0] or embeddings.float[0]"
    output_dtype = _AS_LIST

    def bind(self, model_id, rules=(), max_output_tokens=None):
        bound = super().bind(model_id, rules, max_output_tokens)
        if _is_v4(model_id):
            bound.max_input_chars = None  # ~128k tokens, checked by Bedrock, not by characters
        return bound

    def check_options(self, options):
        super().check_options(options)
        if self.model_id is None:
            return
        if options.output_dimension is not None and not _is_v4(self.model_id):
            # Embed v3's request has no output_dimension (model-parameters-embed-v3.html lists
            # texts, input_type, truncate, embedding_types); its vectors are 1,024 long.
            msg = (
                f"dimensions={options.output_dimension} is not accepted by {self.model_id}: "
                "Cohere Embed v3 returns 1,024 dimensions and takes no output_dimension (Embed "
                "v4 takes 256, 512, 1024 or 1536). Drop dimensions from the overrides."
            )
            raise InvalidOptionsError(msg)
        if options.truncate is None:
            return
        allowed = _V4_TRUNCATE if _is_v4(self.model_id) else _V3_TRUNCATE
        if options.truncate not in allowed:
            msg = (
                f"truncate={options.truncate!r} is not accepted by {self.model_id}: it takes "
                f"{', '.join(allowed)} (Cohere Embed v3 takes NONE, START, END; v4 takes NONE, "
                "LEFT, RIGHT). Change truncate in the template params or the overrides."
            )
            raise InvalidOptionsError(msg)

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
