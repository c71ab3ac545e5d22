"""Structured answers: a forced tool call or a JSON-only instruction answered in its shape.

The answer is synthesized from the request's JSON schema, deterministically from each record's
hash: booleans, numbers, strings, enums, arrays and objects, every required field set. Free
strings quote the prompt, as text replies do, so each answer names the prompt it answers. The
`schema_error` fault corrupts a share of them (wrong type, missing field, cut JSON, prose).
"""

from __future__ import annotations

import json

import polars as pl

TOOL_NAME = "_tool_name"
ANSWER = "_answer_json"
FAULT = "_schema_fault"
QUOTE = "_quote"  # the reply's quote of the user's prompt (responders.quote)
# Fault kinds (0: none).
WRONG_TYPE, MISSING_FIELD, TRUNCATED, PROSE = 1, 2, 3, 4

_TOOL_SCHEMA = "$.tools[0].input_schema"
_TOOL_CHOICE = "$.tool_choice.name"
# The JSON-only instruction of tasks.pipeline.structured, as it reads inside the encoded body.
_INSTRUCTION = r"matching this JSON schema: (\{.*?\})\\nDo not wrap it in prose"
# String keywords a quote of the prompt could break (a free string quotes it).
_CONSTRAINED = {"maxLength", "minLength", "pattern", "format", "const"}


def _value(node: dict, name: str, h: pl.Expr, salt: int, wrong: bool) -> pl.Expr:
    kinds = node.get("type")
    if isinstance(kinds, list):
        kinds = next((k for k in kinds if k != "null"), "string")
    if kinds is None and "anyOf" in node:
        inner = next((n for n in node["anyOf"] if n.get("type") != "null"), {"type": "string"})
        return _value(inner, name, h, salt, wrong)
    mixed = (h // (salt * 7 + 1)) % 1_000_003
    if wrong:  # a value of another type than asked for
        return pl.lit("yes") if kinds in ("boolean", "integer", "number") else pl.lit(12345)
    if "enum" in node:
        options = node["enum"]
        return pl.lit(pl.Series(options)).get((mixed % len(options)).cast(pl.Int64))
    if kinds == "boolean":
        return mixed % 2 == 0
    if kinds == "integer":
        return (mixed % 100).cast(pl.Int64)
    if kinds == "number":
        return (mixed % 1000).cast(pl.Float64) / 10
    if kinds == "array":
        item = _value(node.get("items") or {"type": "string"}, name, h, salt + 1, False)
        return pl.concat_list([item])
    if kinds == "object":
        return _object(node, h, salt + 1, False)
    value = pl.concat_str(pl.lit(f"emulated {name} "), (mixed % 10_000).cast(pl.String))
    if _CONSTRAINED.intersection(node):  # a quote could break the string's own rules
        return value
    return pl.concat_str(value, pl.lit(" re: "), pl.col(QUOTE))


def _object(schema: dict, h: pl.Expr, salt: int, wrong: bool) -> pl.Expr:
    props = schema.get("properties") or {"value": {"type": "string"}}
    return pl.struct(
        [
            _value(node, name, h, salt + i, wrong).alias(name)
            for i, (name, node) in enumerate(props.items())
        ]
    )


def _answers(schema_text: str, h: pl.Expr, fault: pl.Expr, text_ok: bool) -> pl.Expr:
    """JSON text answering `schema_text`, corrupted where `fault` says so."""
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError:
        schema = {}
    good = _object(schema, h, 0, False).struct.json_encode()
    wrong = _object(schema, h, 0, True).struct.json_encode()
    out = pl.when(fault == WRONG_TYPE).then(wrong).when(fault == MISSING_FIELD).then(pl.lit("{}"))
    if text_ok:
        out = (
            out.when(fault == TRUNCATED)
            .then(good.str.slice(0, good.str.len_chars() // 2))
            .when(fault == PROSE)
            .then(pl.lit("I am not sure how to put that as JSON, sorry."))
        )
    else:  # a tool call's input is always an object: cut or prose become the other two
        out = out.when(fault == TRUNCATED).then(wrong).when(fault == PROSE).then(pl.lit("{}"))
    return out.otherwise(good)


def add_answers(ok: pl.DataFrame, model_input: str, hash_col: str, tool_ok: bool) -> pl.DataFrame:
    """Add the tool name (forced tool calls) and the JSON answer of every structured request."""
    mi = pl.col(model_input)
    if FAULT not in ok.columns:
        ok = ok.with_columns(pl.lit(0, dtype=pl.Int64).alias(FAULT))
    ok = ok.with_columns(
        (mi.str.json_path_match(_TOOL_CHOICE) if tool_ok else pl.lit(None, pl.String)).alias(
            TOOL_NAME
        ),
    ).with_columns(
        pl.when(pl.col(TOOL_NAME).is_not_null())
        .then(mi.str.json_path_match(_TOOL_SCHEMA))
        .otherwise(mi.str.extract(_INSTRUCTION, 1).str.replace_all('\\"', '"', literal=True))
        .alias("_schema")
    )
    wanted = ok.filter(pl.col("_schema").is_not_null())
    if not wanted.height:
        return ok.with_columns(pl.lit(None, dtype=pl.String).alias(ANSWER)).drop("_schema")
    parts = []
    for (schema_text, is_tool), part in wanted.group_by(
        "_schema", pl.col(TOOL_NAME).is_not_null(), maintain_order=True
    ):
        h, fault = pl.col(hash_col), pl.col(FAULT).fill_null(0)
        parts.append(part.select("__i", _answers(schema_text, h, fault, not is_tool).alias(ANSWER)))
    answers = pl.concat(parts)
    return ok.join(answers, on="__i", how="left", maintain_order="left").drop("_schema")
