"""Cohere Embed v3 and v4: one text per record; floats as a list or keyed by type."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import AliasChoices, Field

from tasks.bedrock.families.base import ModelFamily, Options, _field, _one, _struct
from tasks.bedrock.model_ids import base_model_id
from tasks.errors import InvalidOptionsError
from tasks.pipeline.columns import INPUT_TOKENS, embedding_column

_FLOATS = pl.List(pl.List(pl.Float32))
# v3 without embedding_types answers {"embeddings": [[...]], "response_type":
# "embeddings_floats"}; v4, and v3 with embedding_types, answer {"embeddings": {"float":
# [[...]]}, "response_type": "embeddings_by_type"} (Bedrock model parameters for Cohere Embed
# v3 and v4, read 2026-11-22).
_AS_LIST = pl.Struct({"embeddings": _FLOATS})
_BY_TYPE_PATTERN = r'"embeddings"\s*:\s*\{'
# embedding_types: "float" (default), "int8" (signed int8 embeddings), "uint8" (unsigned int8),
# "binary" (signed binary), "ubinary" (unsigned binary); the answer keys each asked type's
# vectors by its name (model-parameters-embed-v3.html, model-parameters-embed-v4.html, read
# 2026-12-07). Signed ones are Int8, unsigned ones UInt8: a float column held them as floats.
EMBEDDING_DTYPES: dict[str, pl.DataType] = {
    "float": pl.Float32(),
    "int8": pl.Int8(),
    "uint8": pl.UInt8(),
    "binary": pl.Int8(),
    "ubinary": pl.UInt8(),
}
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]

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
    """Cohere Embed's request fields; every asked embedding type is parsed into its column."""

    input_type: Literal["search_document", "search_query", "classification", "clustering"] = (
        "search_document"
    )
    truncate: Literal["NONE", "START", "END", "LEFT", "RIGHT"] | None = Field(
        None, description="v3: NONE, START or END; v4: NONE, LEFT or RIGHT."
    )
    embedding_types: list[EmbeddingType] | None = Field(
        None,
        min_length=1,
        description=(
            "Cohere's embedding_types: float, int8, uint8, binary, ubinary; each one asked "
            "lands in its own column (embedding, embedding_int8, ...)."
        ),
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
    expected_shape = "embeddings[0] or embeddings.<type>[0]"
    output_dtype = _AS_LIST
    embedding_dtypes = EMBEDDING_DTYPES

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
        # The float vectors under "embeddings" (`output_dtype`'s shape), the other asked
        # types beside them under their own names (`decode_raw`).
        return [
            *(
                _field(output, "embeddings" if kind == "float" else kind)
                .list.first()
                .alias(embedding_column(kind))
                for kind in self.output_types
            ),
            pl.lit(None, dtype=pl.Int64).alias(INPUT_TOKENS),
        ]

    def decode_raw(self, raw):
        # Two shapes in one column: each row is decoded with the dtype of its own shape, and
        # both end up as {"embeddings": floats, <type>: ...} (lists of lists), which
        # `parse_exprs` reads.
        by_type = raw.str.contains(_BY_TYPE_PATTERN)
        as_list = pl.when(~by_type).then(raw).str.json_decode(_AS_LIST)
        keyed_dtype = pl.Struct(
            {
                "embeddings": pl.Struct(
                    {k: pl.List(pl.List(EMBEDDING_DTYPES[k])) for k in self.output_types}
                )
            }
        )
        keyed = pl.when(by_type).then(raw).str.json_decode(keyed_dtype)
        vectors = [
            (
                pl.coalesce(_field(as_list, "embeddings"), _field(keyed, "embeddings", kind))
                if kind == "float"
                else _field(keyed, "embeddings", kind)
            ).alias("embeddings" if kind == "float" else kind)
            for kind in self.output_types
        ]
        return pl.struct(vectors)
