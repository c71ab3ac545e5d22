"""Structured outputs: a template's output schema, and the extraction and validation of answers.

An answer may hold its JSON as the whole text, inside prose, in a fenced block, or as a forced
tool call's input (the family puts that in response_text). Extraction and decoding are Polars
expressions over the whole shard; only rows Polars cannot decode are isolated (by halving, as
`outputs._parse_raw` does) and explained one by one. Validated fields become typed columns
(one per top-level field; nested objects are structs, arrays are lists). A row that does not
validate gets error code SchemaValidationError, the field and the problem, and keeps its text.
Extra fields are ignored (pydantic's default); the raw text keeps them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import polars as pl
from pydantic import BaseModel

from tasks.errors import TemplateError
from tasks.pipeline import columns as C

SCHEMA_VALIDATION_ERROR = "SchemaValidationError"
# Whether a row went from SchemaValidationError to valid on a later attempt.
SCHEMA_REPAIRED = "schema_repaired"

_RESERVED = {
    C.RECORD_ID,
    C.RESPONSE_TEXT,
    C.STOP_REASON,
    C.INPUT_TOKENS,
    C.OUTPUT_TOKENS,
    C.EMBEDDING,
    *C.STATUS_COLUMNS,
    SCHEMA_REPAIRED,
}
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]{0,63}$")
_SCALARS: dict[str, pl.DataType] = {
    "boolean": pl.Boolean(),
    "integer": pl.Int64(),
    "number": pl.Float64(),
    "string": pl.String(),
}
_CANDIDATE = "__json"
_DECODED = "__decoded"
_REASON = "__reason"
# JSON-only instruction appended to the prompt where the family has no forced tool call; the
# emulator finds the schema between these markers.
INSTRUCTION_START = (
    "\n\nAnswer with a single JSON object only, no other text, matching this JSON schema: "
)
INSTRUCTION_END = "\nDo not wrap it in prose."


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with pydantic's `$ref`s to `$defs` replaced by their definitions."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k not in ("$defs", "title")}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _type_of(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):  # ["string", "null"]: an optional value
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "anyOf" in node:  # pydantic's Optional[X]
        kinds = [n for n in node["anyOf"] if n.get("type") != "null"]
        return _type_of(kinds[0]) if len(kinds) == 1 else None
    if kind is None and "enum" in node:
        return "string"
    return kind


def _unwrap(node: dict[str, Any]) -> dict[str, Any]:
    if "anyOf" in node:
        kinds = [n for n in node["anyOf"] if n.get("type") != "null"]
        if len(kinds) == 1:
            return {**kinds[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    return node


def _dtype(node: dict[str, Any], where: str) -> pl.DataType:
    node = _unwrap(node)
    kind = _type_of(node)
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        return pl.List(_dtype(node.get("items") or {"type": "string"}, f"{where}[]"))
    if kind == "object":
        props = node.get("properties") or {}
        if not props:
            msg = f"Output schema field {where!r} is an object without properties; list them."
            raise TemplateError(msg)
        return pl.Struct({k: _dtype(v, f"{where}.{k}") for k, v in props.items()})
    msg = (
        f"Output schema field {where!r} has type {node.get('type')!r}; use one of boolean, "
        "integer, number, string (enums too), array or object."
    )
    raise TemplateError(msg)


@dataclass(frozen=True)
class OutputSchema:
    """The shape a template's answers must have: a JSON schema object (or a pydantic model).

    Attributes:
        name: the forced tool's name (Anthropic) and the Converse schema's name.
        json_schema: {"type": "object", "properties": {...}, "required": [...]}.
        description: what the tool or the schema is for (sent to the model).
        converse_output_config: also send Converse's `outputConfig.textFormat` (only for
            models that support Bedrock structured outputs; the JSON instruction always goes).
    """

    name: str
    json_schema: dict[str, Any] = field(compare=False, hash=False)
    description: str = ""
    converse_output_config: bool = False

    @classmethod
    def from_model(cls, model: type[BaseModel], name: str | None = None, **kwargs) -> OutputSchema:
        """The schema of a pydantic model (its `$defs` inlined)."""
        raw = model.model_json_schema()
        schema = _inline_refs(raw, raw.get("$defs", {}))
        description = kwargs.pop("description", raw.get("description", ""))
        return cls(name or model.__name__, schema, description=description, **kwargs)

    def check(self, template_id: str) -> None:
        """Raise TemplateError naming `template_id` if the schema cannot be used."""
        if not _NAME.match(self.name):
            msg = (
                f"Output schema name {self.name!r} of template {template_id!r} must match "
                "[a-zA-Z][a-zA-Z0-9_]* (at most 64 characters): it names the forced tool."
            )
            raise TemplateError(msg)
        if _type_of(self.json_schema) != "object" or not self.json_schema.get("properties"):
            msg = f"Output schema of template {template_id!r} must be an object with properties."
            raise TemplateError(msg)
        clash = sorted(set(self.fields) & _RESERVED)
        if clash:
            msg = (
                f"Output schema of template {template_id!r} has field(s) {clash} that clash "
                "with output columns; rename them."
            )
            raise TemplateError(msg)
        self.dtype  # noqa: B018  (checks every field's type)

    @property
    def properties(self) -> dict[str, dict[str, Any]]:
        return {k: _unwrap(v) for k, v in self.json_schema.get("properties", {}).items()}

    @property
    def fields(self) -> list[str]:
        """Top-level field names: the typed columns, in order."""
        return list(self.properties)

    @property
    def required(self) -> list[str]:
        return list(self.json_schema.get("required", []))

    @cached_property
    def dtype(self) -> pl.Struct:
        """The Polars struct an answer decodes into."""
        return _dtype(self.json_schema, self.name)

    @property
    def columns(self) -> dict[str, pl.DataType]:
        """Typed output columns and their dtypes."""
        return {f.name: f.dtype for f in self.dtype.fields}

    def schema_json(self) -> str:
        """The JSON schema as compact text."""
        return json.dumps(self.json_schema, separators=(",", ":"), sort_keys=True)

    def instruction(self) -> str:
        """The JSON-only instruction appended to prompts (the fallback that always works)."""
        return INSTRUCTION_START + self.schema_json() + INSTRUCTION_END


# ---------------------------------------------------------------- extraction (vectorised)


def json_candidate_expr(text: pl.Expr) -> pl.Expr:
    """The JSON object text an answer holds: a fenced block, the whole text, or {...} in prose."""
    fenced = text.str.extract(r"(?s)```(?:json|JSON)?\s*(\{.*?\})\s*```", 1)
    stripped = text.str.strip_chars()
    # Whole only when it ends as an object too: "{...}\n\nI hope this helps." is prose.
    whole = pl.when(stripped.str.starts_with("{") & stripped.str.ends_with("}")).then(stripped)
    in_prose = text.str.extract(r"(?s)(\{.*\})", 1)
    # An opening brace with no closing one: a cut answer, kept so the reason can say so.
    cut = text.str.extract(r"(?s)(\{.*)", 1)
    return pl.coalesce(fenced, whole, in_prose, cut)


def _object_in(text: str, schema: dict[str, Any]) -> str | None:
    """The JSON object in ``text`` that fits ``schema`` (else the first one), by trying each
    opening brace: the few rows the vectorised candidates miss (braces in the prose around
    the answer, or an echoed object before it)."""
    decoder = json.JSONDecoder()
    first = None
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            pass
        else:
            if isinstance(value, dict):
                if _problem(value, schema, "$") is None:
                    return text[start:end]
                first = first or text[start:end]
        start = text.find("{", start + 1)
    return first


def _decode_again(answered: pl.DataFrame, schema: OutputSchema) -> pl.DataFrame:
    """Rows not decoded whose text holds an object elsewhere get that object instead."""
    missed = answered.filter(
        pl.col(_DECODED).is_null() & pl.col(C.RESPONSE_TEXT).str.contains("{", literal=True)
    )
    if not missed.height:
        return answered
    found = [_object_in(text, schema.json_schema) for text in missed[C.RESPONSE_TEXT]]
    retry = missed.select("__i", pl.Series(_CANDIDATE, found, dtype=pl.String)).filter(
        pl.col(_CANDIDATE).is_not_null()
    )
    if not retry.height:
        return answered
    again = _decode(retry, schema.dtype).filter(pl.col(_DECODED).is_not_null())
    return answered.update(again, on="__i")


def _decode(frame: pl.DataFrame, dtype: pl.Struct) -> pl.DataFrame:
    """Decode `_CANDIDATE` strictly; rows Polars refuses are isolated and left null."""
    try:
        return frame.with_columns(pl.col(_CANDIDATE).str.json_decode(dtype).alias(_DECODED))
    except pl.exceptions.ComputeError:
        if frame.height > 1:
            mid = frame.height // 2
            return pl.concat([_decode(frame[:mid], dtype), _decode(frame[mid:], dtype)])
        return frame.with_columns(pl.lit(None, dtype=dtype).alias(_DECODED))


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _problem(value: Any, node: dict[str, Any], where: str) -> str | None:
    """Why `value` does not fit `node` (first problem), or None."""
    node = _unwrap(node)
    kind = _type_of(node)
    got = _json_type(value)
    ok = (
        got == kind
        or (kind == "number" and got == "integer")
        or (got == "null" and "null" in (node.get("type") or []))
    )
    if not ok:
        return f"{where}: expected {kind}, got {got} {json.dumps(value)[:40]}"
    if "enum" in node and value not in node["enum"]:
        return f"{where}: {json.dumps(value)[:40]} is not one of {node['enum']}"
    if kind == "object":
        for name in node.get("required", []):
            if value.get(name) is None:
                return f"{where}.{name}: required field is missing"
        for name, sub in (node.get("properties") or {}).items():
            if value.get(name) is not None and (
                why := _problem(value[name], sub, f"{where}.{name}")
            ):
                return why
    if kind == "array":
        for i, item in enumerate(value):
            if why := _problem(item, node.get("items") or {"type": "string"}, f"{where}[{i}]"):
                return why
    return None


def explain(candidate: str | None, schema: OutputSchema, stop_reason: str | None) -> str:
    """Why one answer does not validate: the field and the problem (rare rows only)."""
    if candidate is None:
        return "The answer holds no JSON object."
    try:
        value = json.loads(candidate)
    except json.JSONDecodeError as exc:
        cut = (
            " (stop reason max_tokens: the answer was cut; raise max_tokens)"
            if stop_reason
            in (
                "max_tokens",
                "length",
            )
            else ""
        )
        return f"The answer's JSON does not parse: {exc.msg} at character {exc.pos}{cut}."
    if not isinstance(value, dict):
        return f"The answer's JSON is {_json_type(value)}, not an object."
    why = _problem(value, schema.json_schema, "$")
    return f"{why}." if why else "The answer does not fit the schema."


def _lenient_type_checks(schema: OutputSchema) -> list[tuple[pl.Expr, pl.Expr]]:
    """Checks for what Polars decodes leniently: a number or boolean read as a string field."""
    checks = []
    for name, node in schema.properties.items():
        if _type_of(node) == "string":
            key = re.escape(json.dumps(name))
            quoted = pl.col(_CANDIDATE).str.contains(key + r'\s*:\s*"')
            bare = pl.col(_DECODED).struct.field(name).is_not_null() & ~quoted
            checks.append((bare, pl.lit(f"$.{name}: expected string, got a non-string value.")))
    return checks


def validation_exprs(schema: OutputSchema) -> list[tuple[pl.Expr, pl.Expr]]:
    """(is_bad, reason) over the decoded struct, nested fields included: required fields,
    enums (of arrays' items too), strict strings, integers and arrays as written.

    Polars decodes leniently where the schema is strict (3.7 into an integer field as 3, a
    lone "x" into a list field as ["x"]), so integers and arrays are checked on the answer's
    own JSON text; the rest on the decoded values. Before, only top-level fields were checked
    and a nested enum or required field passed unseen.
    """
    decoded = pl.col(_DECODED)
    checks: list[tuple[pl.Expr, pl.Expr]] = [
        (decoded.is_null(), pl.lit(None, dtype=pl.String))  # explained one by one
    ]
    checks += _required(decoded, schema.json_schema, "$")
    checks += _lenient_type_checks(schema)
    for name, node in schema.properties.items():
        checks += _field_checks(decoded.struct.field(name), node, f"$.{name}")
    return checks


def _required(value: pl.Expr, node: dict[str, Any], where: str) -> list[tuple[pl.Expr, pl.Expr]]:
    """An object's required fields that are missing (an object that is there)."""
    return [
        (
            value.is_not_null() & value.struct.field(name).is_null(),
            pl.lit(f"{where}.{name}: required field is missing."),
        )
        for name in _unwrap(node).get("required", [])
    ]


def _raw(where: str) -> pl.Expr:
    """The JSON text at ``where`` in the answer (a string value without its quotes)."""
    return pl.col(_CANDIDATE).str.json_path_match(where)


def _field_checks(value: pl.Expr, node: dict[str, Any], where: str) -> list:
    """The checks of one field and, for objects, of its own fields."""
    node = _unwrap(node)
    kind = _type_of(node)
    plain = re.fullmatch(r"\$(\.[A-Za-z_][A-Za-z0-9_]*)+", where) is not None
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    if "enum" in node:
        allowed = [v for v in node["enum"] if v is not None]
        checks.append(
            (
                value.is_not_null() & ~value.is_in(allowed),
                pl.concat_str(
                    pl.lit(f"{where}: "),
                    value.cast(pl.String),
                    pl.lit(f" is not one of {node['enum']}."),
                ),
            )
        )
    if kind == "integer" and plain:
        raw = _raw(where)
        checks.append(
            (
                value.is_not_null() & ~raw.str.contains(r"^-?\d+$"),
                pl.concat_str(pl.lit(f"{where}: expected integer, got "), raw, pl.lit(".")),
            )
        )
    if kind == "array":
        if plain:
            checks.append(
                (
                    value.is_not_null() & ~_raw(where).str.starts_with("["),
                    pl.lit(f"{where}: expected array, got a single value."),
                )
            )
        items = _unwrap(node.get("items") or {})
        if "enum" in items:
            allowed = [v for v in items["enum"] if v is not None]
            checks.append(
                (
                    value.is_not_null() & ~value.list.eval(pl.element().is_in(allowed)).list.all(),
                    pl.lit(f"{where}[]: an item is not one of {items['enum']}."),
                )
            )
    if kind == "object":
        checks += _required(value, node, where)
        for name, child in (node.get("properties") or {}).items():
            checks += _field_checks(value.struct.field(name), child, f"{where}.{name}")
    return checks


def apply_schema(frame: pl.DataFrame, schema: OutputSchema) -> pl.DataFrame:
    """Typed columns from each successful answer; invalid ones become SchemaValidationError.

    `frame` has response_text, stop_reason, error_code, error_message and raw_output. Rows that
    already failed keep their error and get null typed columns.
    """
    columns = schema.columns
    answered = frame.with_row_index("__i").filter(pl.col(C.ERROR_CODE).is_null())
    answered = answered.with_columns(json_candidate_expr(pl.col(C.RESPONSE_TEXT)).alias(_CANDIDATE))
    answered = (
        _decode_again(_decode(answered, schema.dtype), schema)
        if answered.height
        else answered.with_columns(pl.lit(None, dtype=schema.dtype).alias(_DECODED))
    )
    checks = validation_exprs(schema)  # built once: a nested schema has many
    reason = pl.lit(None, dtype=pl.String)
    for bad, message in reversed(checks):
        reason = pl.when(bad).then(message).otherwise(reason)
    bad = pl.col(_DECODED).is_null()
    for check, _ in checks[1:]:
        bad = bad | check.fill_null(False)
    answered = answered.with_columns(bad.alias("__bad"), reason.alias(_REASON))
    # Undecodable rows are few (a bad shard is a bug, not the norm): explain each in Python.
    unexplained = answered.filter(pl.col("__bad") & pl.col(_REASON).is_null())
    if unexplained.height:
        why = [
            explain(c, schema, s)
            for c, s in zip(unexplained[_CANDIDATE], unexplained[C.STOP_REASON], strict=True)
        ]
        fix = unexplained.select("__i", pl.Series("__why", why, dtype=pl.String))
        answered = answered.join(fix, on="__i", how="left").with_columns(
            pl.coalesce(_REASON, "__why").alias(_REASON)
        )
    typed = answered.select(
        "__i",
        "__bad",
        pl.col(_REASON),
        *[
            pl.when(~pl.col("__bad")).then(pl.col(_DECODED).struct.field(n)).alias(n)
            for n in columns
        ],
    )
    merged = frame.with_row_index("__i").join(typed, on="__i", how="left", maintain_order="left")
    bad_row = pl.col("__bad").fill_null(False)
    return merged.with_columns(
        pl.when(bad_row)
        .then(pl.lit(SCHEMA_VALIDATION_ERROR))
        .otherwise(C.ERROR_CODE)
        .alias(C.ERROR_CODE),
        pl.when(bad_row)
        .then(pl.concat_str(pl.lit("The answer does not fit output schema: "), pl.col(_REASON)))
        .otherwise(C.ERROR_MESSAGE)
        .alias(C.ERROR_MESSAGE),
        *[pl.col(n).cast(d) for n, d in columns.items()],
    ).drop("__i", "__bad", _REASON)
