"""The base of every model family: options, expression helpers, and the ModelFamily class."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import polars as pl
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.bedrock.catalog import TEMPERATURE_XOR_TOP_P
from tasks.errors import InvalidOptionsError
from tasks.pipeline.columns import (
    EMBEDDING,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    RESPONSE_TEXT,
    STOP_REASON,
    embedding_column,
)

INVOCATION_TYPES = ("InvokeModel", "Converse")


TEXT_RESULT_SCHEMA: dict[str, pl.DataType] = {
    RESPONSE_TEXT: pl.String(),
    STOP_REASON: pl.String(),
    INPUT_TOKENS: pl.Int64(),
    OUTPUT_TOKENS: pl.Int64(),
}
EMBEDDING_RESULT_SCHEMA: dict[str, pl.DataType] = {
    EMBEDDING: pl.List(pl.Float32()),
    INPUT_TOKENS: pl.Int64(),
}


class Options(BaseModel):
    """Base of the strict inference-option models: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class TextOptions(Options):
    """Generation options most text models share."""

    max_tokens: int = Field(512, gt=0, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=1, description="Sampling temperature.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass.")
    stop_sequences: list[str] | None = Field(None, description="Strings that end generation.")

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        # An empty one ended nothing and went into every record's body.
        if value is not None and any(s == "" for s in value):
            msg = "a stop sequence is empty; give text that ends generation, or none"
            raise ValueError(msg)
        return value


def _lit(value: Any) -> pl.Expr:
    if isinstance(value, list):
        return pl.lit(value, dtype=pl.List(pl.String))
    return pl.lit(value)


def _struct(**fields: Any) -> pl.Expr:
    """A struct of expressions and constants; fields set to None are left out of the JSON."""
    exprs = [
        (value if isinstance(value, pl.Expr) else _lit(value)).alias(name)
        for name, value in fields.items()
        if value is not None
    ]
    return pl.struct(exprs)


def _one(expr: pl.Expr) -> pl.Expr:
    """A one-element list holding `expr` of each row."""
    return pl.concat_list([expr])


def _chat_messages(prompt: pl.Expr, system: str | None) -> pl.Expr:
    """OpenAI-style chat messages: an optional system message, then the user's prompt."""
    user = _struct(role="user", content=prompt)
    if system is None:
        return _one(user)
    return pl.concat_list([_struct(role="system", content=pl.lit(system)), user])


def _field(expr: pl.Expr, *path: str) -> pl.Expr:
    for name in path:
        expr = expr.struct.field(name)
    return expr


def _texts_joined(content: pl.Expr) -> pl.Expr:
    """All text blocks of a content list, joined; null when they hold no text at all.

    Thinking, reasoning and tool blocks carry no `text` field, so they drop out; a reply made
    only of them (or of empty text) has no answer and must not pass for a success.
    """
    joined = content.list.eval(pl.element().struct.field("text")).list.join("")
    # replace, not when/then: a when/then evaluates the joined texts twice.
    return joined.replace("", None)


class ModelFamily:
    """A family of models that share one request body and one output shape."""

    name: ClassVar[str]
    prefixes: ClassVar[tuple[str, ...]] = ()
    invocation_type: ClassVar[str] = "InvokeModel"
    is_embedding: ClassVar[bool] = False
    supports_system: ClassVar[bool] = True
    # Guidance for validation; None means no limit we check before sending.
    max_input_chars: ClassVar[int | None] = None
    options_model: ClassVar[type[Options]] = TextOptions
    output_dtype: ClassVar[pl.DataType]
    # What a success must hold: tokens too when the family's outputs report them.
    reports_tokens: ClassVar[bool] = True
    # Lengths an embedding may have (empty: any non-empty length).
    embedding_dimensions: ClassVar[tuple[int, ...]] = ()
    # The fields the parser reads, named in UnparseableOutput messages.
    expected_shape: ClassVar[str] = ""
    # Stop reasons that mean the model refused or a content filter stopped the answer: such a
    # record is a ContentFiltered error (its text, if any, kept), not a success.
    filtered_stop_reasons: ClassVar[tuple[str, ...]] = ()
    # Embedding types a model can answer with, and each one's Polars element dtype.
    embedding_dtypes: ClassVar[dict[str, pl.DataType]] = {"float": pl.Float32()}
    # The types a run asked for (`configured`); empty: the default, floats only.
    embedding_types: tuple[str, ...] = ()
    # Set on the copy `bind` makes for one catalog model.
    model_id: str | None = None
    rules: tuple[str, ...] = ()
    max_output_tokens: int | None = None

    def bind(
        self, model_id: str, rules: tuple[str, ...] = (), max_output_tokens: int | None = None
    ) -> ModelFamily:
        """A copy of this family for one model, carrying that model's parameter rules."""
        bound = copy.copy(self)
        bound.model_id, bound.rules = model_id, tuple(rules)
        bound.max_output_tokens = max_output_tokens
        return bound

    def configured(self, options: dict[str, Any] | None) -> ModelFamily:
        """A copy parsing what a run's options (the plan's) ask for: its embedding types."""
        asked = tuple((options or {}).get("embedding_types") or ())
        if not self.is_embedding or not asked:
            return self
        configured = copy.copy(self)
        configured.embedding_types = asked
        return configured

    @property
    def output_types(self) -> tuple[str, ...]:
        """The embedding types the parser reads into columns (floats when none was asked)."""
        return self.embedding_types or ("float",)

    @property
    def result_schema(self) -> dict[str, pl.DataType]:
        """Names and dtypes of the result columns this family's parser produces."""
        if not self.is_embedding:
            return dict(TEXT_RESULT_SCHEMA)
        vectors = {
            embedding_column(t): pl.List(self.embedding_dtypes[t]) for t in self.output_types
        }
        return {**vectors, INPUT_TOKENS: pl.Int64()}

    def options(
        self, template_params: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
    ) -> Options:
        """Options from a template's params (those this family knows) and strict overrides."""
        canonical: dict[str, str] = {}
        for name, info in self.options_model.model_fields.items():
            canonical[name] = name
            if isinstance(info.validation_alias, AliasChoices):
                canonical.update(
                    (alias, name)
                    for alias in info.validation_alias.choices
                    if isinstance(alias, str)
                )
        unknown = sorted(set(overrides or {}) - set(canonical))
        if unknown:
            msg = (
                f"Inference parameter(s) {', '.join(unknown)} are not accepted by the "
                f"{self.name} family; accepted: {', '.join(sorted(canonical))}."
            )
            raise InvalidOptionsError(msg)
        # Template params the family does not know (a max_tokens for an embedding) are dropped.
        values = {canonical[k]: v for k, v in (template_params or {}).items() if k in canonical}
        values.update({canonical[k]: v for k, v in (overrides or {}).items()})
        try:
            options = self.options_model.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            msg = f"Invalid inference parameters for the {self.name} family: {problems}."
            raise InvalidOptionsError(msg) from None
        self.check_options(options)
        return options

    def check_options(self, options: Options) -> None:
        """Refuse options the bound model does not accept: its `rules`, its output limit."""
        limit, asked = self.max_output_tokens, getattr(options, "max_tokens", None)
        if limit is not None and asked is not None and asked > limit:
            # Bedrock answers every such record with "The maximum tokens you requested exceeds
            # the model limit of 4096. Try again with a maximum tokens value that is lower than
            # 4096." (quoted in langgenius/dify issue #10390, vercel/ai issue #2772).
            msg = (
                f"max_tokens={asked} is over the {limit:,} output tokens model {self.model_id} "
                "can return: Bedrock would fail every record ('The maximum tokens you requested "
                f"exceeds the model limit of {limit}'). Set max_tokens to {limit} or less in the "
                "template params or the overrides."
            )
            raise InvalidOptionsError(msg)
        if (
            TEMPERATURE_XOR_TOP_P in self.rules
            and getattr(options, "temperature", None) is not None
            and getattr(options, "top_p", None) is not None
        ):
            msg = (
                f"Model {self.model_id} accepts temperature or top_p, not both (Bedrock answers "
                "'`temperature` and `top_p` cannot both be specified for this model'); got "
                f"temperature={options.temperature} and top_p={options.top_p}. Drop one of "
                "them from the template params or the overrides."
            )
            raise InvalidOptionsError(msg)

    def body_expr(self, prompt: pl.Expr, system: str | None, options: Options) -> pl.Expr:
        """The modelInput struct of every row, from the rendered prompt."""
        raise NotImplementedError

    # JSON path (from modelOutput) of a forced tool call's input, when the family forces one.
    tool_input_path: ClassVar[str | None] = None

    def structured_fields(self, schema: Any) -> dict[str, Any]:
        """Top-level body keys (JSON values) that ask for `schema`'s shape; none by default."""
        return {}

    def json_instruction(self, schema: Any) -> bool:
        """Whether the prompt carries the JSON-only instruction (the fallback that always works)."""
        return True

    def parse_exprs(self, output: pl.Expr) -> list[pl.Expr]:
        """Result columns (see `result_schema`) from the decoded modelOutput struct."""
        raise NotImplementedError

    def decode_raw(self, raw: pl.Expr) -> pl.Expr:
        """The modelOutput struct (`output_dtype`) from its JSON text; strict, as Polars is.

        Families whose models answer in more than one shape override it.
        """
        return raw.str.json_decode(self.output_dtype)

    def parse_raw(self, raw: pl.Expr) -> list[pl.Expr]:
        """Result columns from the modelOutput JSON text (decode once, then `parse_exprs`)."""
        return self.parse_exprs(self.decode_raw(raw))

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Result columns a success must have non-null."""
        if self.is_embedding:
            vectors = tuple(embedding_column(t) for t in self.output_types)
            return (*vectors, INPUT_TOKENS) if self.reports_tokens else vectors
        if self.reports_tokens:
            return (RESPONSE_TEXT, INPUT_TOKENS, OUTPUT_TOKENS)
        return (RESPONSE_TEXT,)

    def problem_expr(self) -> pl.Expr:
        """Over the parsed result columns: why a row is not a success, or null when it is."""
        shape = f" (expected {self.expected_shape})" if self.expected_shape else ""
        checks = [
            (
                pl.col(name).is_null(),
                f"modelOutput has no {name} where the {self.name} family reads it{shape}.",
            )
            for name in self.required_columns
        ]
        for kind in self.output_types if self.is_embedding else ():
            column = embedding_column(kind)
            length = pl.col(column).list.len()
            # Binary types pack bits: their length is not the vector's dimensions.
            allowed = self.embedding_dimensions if kind in ("float", "int8", "uint8") else ()
            bad = length == 0 if not allowed else ~length.is_in(list(allowed))
            expected = ", ".join(str(d) for d in allowed) or "at least 1"
            checks.append((bad, f"The {column} has the wrong length (expected {expected})."))
        expr = pl.lit(None, dtype=pl.String)
        for bad, message in reversed(checks):
            expr = pl.when(bad).then(pl.lit(message)).otherwise(expr)
        return expr

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
