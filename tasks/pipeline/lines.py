"""Bedrock JSONL input lines: record ids, and one family body encoded once around row values."""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from prompt_templates import PromptTemplate
from tasks.bedrock.families import ModelFamily

ROW = "__row"


def record_id_expr(row_index: pl.Expr) -> pl.Expr:
    """Bedrock-valid record ids (11 alphanumerics): `R` + the 10-digit source row index."""
    return pl.concat_str([pl.lit("R"), row_index.cast(pl.String).str.zfill(10)])


_RID_SENTINEL = "RIDSENTINELQXZ"
_PROMPT_SENTINEL = "PROMPTSENTINELQXZ"


def _escaped(value: pl.Expr) -> pl.Expr:
    """The JSON-escaped text of `value` (no quotes), escaped by Polars' own JSON encoder."""
    encoded = pl.struct(value.cast(pl.String).alias("s")).struct.json_encode()
    return encoded.str.head(-2).str.tail(-6)


def _escape_literal(text: str) -> str:
    return pl.select(_escaped(pl.lit(text, dtype=pl.String))).item()


@dataclass(frozen=True)
class LineFormat:
    """How one JSONL line `{"recordId":..,"modelInput":..}` is built for a family and template.

    The family's body is encoded once with `struct.json_encode` around placeholders; each row
    then only escapes its own column values into that skeleton, which gives the same bytes as
    encoding the whole struct per row at a fraction of the cost (checked in the tests).
    """

    pieces: tuple[tuple[str, str], ...]  # ("const", json text) | ("column", name) | ("id", "")
    reference: pl.Expr  # the plain per-row struct encoding, used when no skeleton applies
    literal_chars: int

    @property
    def const_bytes(self) -> int:
        """Bytes of every line that do not depend on the row (record id included)."""
        return 11 + sum(len(v.encode()) for k, v in self.pieces if k == "const")

    @property
    def columns(self) -> list[str]:
        """The columns whose escaped values go into the line."""
        return [v for k, v in self.pieces if k == "column"]

    def expr(self, record_id: pl.Expr) -> pl.Expr:
        """The JSONL line of every row."""
        if not self.pieces:
            return self.reference
        parts = []
        for kind, value in self.pieces:
            if kind == "const":
                parts.append(pl.lit(value, dtype=pl.String))
            elif kind == "id":
                parts.append(record_id)
            else:
                parts.append(_escaped(pl.col(value)))
        return pl.concat_str(parts)

    def value_bytes_upper(self) -> pl.Expr:
        """An upper bound of the row-dependent bytes (an escape is at most 6 bytes a byte)."""
        return pl.sum_horizontal(
            [pl.col(c).cast(pl.String).str.len_bytes().cast(pl.UInt64) * 6 for c in self.columns]
            or [pl.lit(0, dtype=pl.UInt64)]
        )

    def value_bytes(self) -> pl.Expr:
        """The exact row-dependent bytes."""
        return pl.sum_horizontal(
            [_escaped(pl.col(c)).str.len_bytes().cast(pl.UInt64) for c in self.columns]
            or [pl.lit(0, dtype=pl.UInt64)]
        )


def _structured(family: ModelFamily, template: PromptTemplate, options):
    """`body(prompt)` asking for the template's output schema, and raw JSON to put in place."""
    schema = template.output_schema
    extra = family.structured_fields(schema) if schema is not None else {}
    suffix = schema.instruction() if schema is not None and family.json_instruction(schema) else ""
    # Constant JSON values (a tool's input_schema) go in as placeholders replaced after encoding:
    # a Polars struct would add null keys where the schema's nodes differ in shape.
    raw = {
        f'"RAWJSON{i}SENTINEL"': json.dumps(v, separators=(",", ":"))
        for i, v in enumerate(extra.values())
    }

    def body(prompt: pl.Expr) -> pl.Expr:
        if suffix:
            prompt = pl.concat_str([prompt, pl.lit(suffix)])
        expr = family.body_expr(prompt, template.system, options)
        if extra:
            expr = expr.struct.with_fields(
                pl.lit(f"RAWJSON{i}SENTINEL").alias(k) for i, k in enumerate(extra)
            )
        return expr

    return body, raw


def _put_raw(text, raw: dict[str, str]):
    for placeholder, value in raw.items():
        text = (
            text.replace(placeholder, value)
            if isinstance(text, str)
            else text.str.replace(placeholder, value, literal=True)
        )
    return text


def compile_line(family: ModelFamily, template: PromptTemplate, options) -> LineFormat:
    """The LineFormat of `family` with `template` and `options`."""
    body, raw = _structured(family, template, options)
    reference = _put_raw(
        pl.struct(
            record_id_expr(pl.col(ROW)).alias("recordId"),
            body(template.render_expr()).alias("modelInput"),
        ).struct.json_encode(),
        raw,
    )
    literal_chars = sum(len(literal) for literal, _ in template.parts)
    skeleton_body = body(pl.lit(_PROMPT_SENTINEL))
    skeleton = _put_raw(
        pl.select(
            pl.struct(
                pl.lit(_RID_SENTINEL).alias("recordId"), skeleton_body.alias("modelInput")
            ).struct.json_encode()
        ).item(),
        raw,
    )
    if skeleton.count(_RID_SENTINEL) != 1 or skeleton.count(_PROMPT_SENTINEL) != 1:
        return LineFormat((), reference, literal_chars)
    head, rest = skeleton.split(_RID_SENTINEL)
    mid, tail = rest.split(_PROMPT_SENTINEL)
    pieces: list[tuple[str, str]] = [("const", head), ("id", ""), ("const", mid)]
    for literal, column in template.parts:
        if literal:
            pieces.append(("const", _escape_literal(literal)))
        if column is not None:
            pieces.append(("column", column))
    pieces.append(("const", tail))
    merged: list[tuple[str, str]] = []
    for kind, value in pieces:
        if kind == "const" and merged and merged[-1][0] == "const":
            merged[-1] = ("const", merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return LineFormat(tuple(merged), reference, literal_chars)
