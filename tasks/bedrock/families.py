"""Model families: how a request body looks and how an output line is parsed, one class each."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from tasks.bedrock.model_ids import INFERENCE_PROFILE_PREFIXES, base_model_id
from tasks.errors import InvalidOptionsError, UnknownModelError
from tasks.pipeline.columns import (
    EMBEDDING,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    RESPONSE_TEXT,
    STOP_REASON,
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


def _field(expr: pl.Expr, *path: str) -> pl.Expr:
    for name in path:
        expr = expr.struct.field(name)
    return expr


def _texts_joined(content: pl.Expr) -> pl.Expr:
    """All text blocks of a content list, joined (thinking or tool blocks carry no text)."""
    return content.list.eval(pl.element().struct.field("text")).list.join("")


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

    @property
    def result_schema(self) -> dict[str, pl.DataType]:
        """Names and dtypes of the result columns this family's parser produces."""
        return dict(EMBEDDING_RESULT_SCHEMA if self.is_embedding else TEXT_RESULT_SCHEMA)

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
            return self.options_model.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            msg = f"Invalid inference parameters for the {self.name} family: {problems}."
            raise InvalidOptionsError(msg) from None

    def body_expr(self, prompt: pl.Expr, system: str | None, options: Options) -> pl.Expr:
        """The modelInput struct of every row, from the rendered prompt."""
        raise NotImplementedError

    def parse_exprs(self, output: pl.Expr) -> list[pl.Expr]:
        """Result columns (see `result_schema`) from the decoded modelOutput struct."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class AnthropicMessages(ModelFamily):
    """Anthropic Claude through the messages API."""

    name = "anthropic"
    prefixes = ("anthropic.",)

    class AnthropicOptions(TextOptions):
        top_k: int | None = Field(None, ge=0, description="Sample from the k likeliest tokens.")

    options_model = AnthropicOptions
    output_dtype = pl.Struct(
        {
            "content": pl.List(pl.Struct({"type": pl.String, "text": pl.String})),
            "stop_reason": pl.String,
            "usage": pl.Struct({"input_tokens": pl.Int64, "output_tokens": pl.Int64}),
        }
    )

    def body_expr(self, prompt, system, options):
        return _struct(
            anthropic_version="bedrock-2023-05-31",
            max_tokens=options.max_tokens,
            system=system,
            messages=_one(_struct(role="user", content=prompt)),
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            stop_sequences=options.stop_sequences,
        )

    def parse_exprs(self, output):
        return [
            _texts_joined(_field(output, "content")).alias(RESPONSE_TEXT),
            _field(output, "stop_reason").alias(STOP_REASON),
            _field(output, "usage", "input_tokens").alias(INPUT_TOKENS),
            _field(output, "usage", "output_tokens").alias(OUTPUT_TOKENS),
        ]


_MESSAGES_OUTPUT = pl.Struct(
    {
        "output": pl.Struct(
            {"message": pl.Struct({"content": pl.List(pl.Struct({"text": pl.String}))})}
        ),
        "stopReason": pl.String,
        "usage": pl.Struct({"inputTokens": pl.Int64, "outputTokens": pl.Int64}),
    }
)


def _parse_messages_output(output: pl.Expr) -> list[pl.Expr]:
    return [
        _texts_joined(_field(output, "output", "message", "content")).alias(RESPONSE_TEXT),
        _field(output, "stopReason").alias(STOP_REASON),
        _field(output, "usage", "inputTokens").alias(INPUT_TOKENS),
        _field(output, "usage", "outputTokens").alias(OUTPUT_TOKENS),
    ]


class AmazonNova(ModelFamily):
    """Amazon Nova text models through their native (messages-v1) invoke schema."""

    name = "amazon-nova"
    prefixes = ("amazon.nova-",)

    class NovaOptions(TextOptions):
        # The Nova 1 user guide spelled it max_new_tokens; the Invoke API takes maxTokens.
        max_tokens: int = Field(
            512, gt=0, validation_alias=AliasChoices("max_tokens", "max_new_tokens", "maxTokens")
        )
        top_k: int | None = Field(None, ge=0)

    options_model = NovaOptions
    output_dtype = _MESSAGES_OUTPUT

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
        return _parse_messages_output(output)


class Converse(ModelFamily):
    """Any text model through the Converse request shape (modelInvocationType=Converse)."""

    name = "converse"
    prefixes = ()
    invocation_type = "Converse"
    output_dtype = _MESSAGES_OUTPUT

    def body_expr(self, prompt, system, options):
        return _struct(
            messages=_one(_struct(role="user", content=_one(_struct(text=prompt)))),
            system=_one(_struct(text=system)) if system is not None else None,
            inferenceConfig=_struct(
                maxTokens=options.max_tokens,
                temperature=options.temperature,
                topP=options.top_p,
                stopSequences=options.stop_sequences,
            ),
        )

    def parse_exprs(self, output):
        return _parse_messages_output(output)


class MetaLlama(ModelFamily):
    """Meta Llama 3+ instruct models: a prompt in the Llama 3 chat format."""

    name = "meta-llama"
    prefixes = ("meta.llama",)

    class LlamaOptions(Options):
        max_tokens: int = Field(
            512, gt=0, validation_alias=AliasChoices("max_tokens", "max_gen_len")
        )
        temperature: float | None = Field(None, ge=0, le=1)
        top_p: float | None = Field(None, ge=0, le=1)

    options_model = LlamaOptions
    output_dtype = pl.Struct(
        {
            "generation": pl.String,
            "prompt_token_count": pl.Int64,
            "generation_token_count": pl.Int64,
            "stop_reason": pl.String,
        }
    )

    @staticmethod
    def chat_prompt(prompt: pl.Expr, system: str | None) -> pl.Expr:
        """The Llama 3 chat format around the user prompt (and system prompt)."""
        head = "<|begin_of_text|>"
        if system is not None:
            head += f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        head += "<|start_header_id|>user<|end_header_id|>\n\n"
        tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        return pl.concat_str([pl.lit(head), prompt, pl.lit(tail)])

    def body_expr(self, prompt, system, options):
        return _struct(
            prompt=self.chat_prompt(prompt, system),
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


class Mistral(ModelFamily):
    """Mistral instruct models: `<s>[INST] ... [/INST]`; no system role, so it leads the prompt."""

    name = "mistral"
    prefixes = ("mistral.",)
    supports_system = False

    class MistralOptions(TextOptions):
        stop_sequences: list[str] | None = Field(
            None, validation_alias=AliasChoices("stop_sequences", "stop")
        )
        top_k: int | None = Field(None, ge=0)

    options_model = MistralOptions
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


class TitanEmbedV2(ModelFamily):
    """Amazon Titan Text Embeddings v2 (8k tokens or 50k characters per input)."""

    name = "amazon-titan-embed-v2"
    prefixes = ("amazon.titan-embed-text-v2",)
    is_embedding = True
    supports_system = False
    max_input_chars = 50_000

    class TitanOptions(Options):
        dimensions: Literal[256, 512, 1024] = 1024
        normalize: bool = True

    options_model = TitanOptions
    output_dtype = pl.Struct({"embedding": pl.List(pl.Float32), "inputTextTokenCount": pl.Int64})

    def body_expr(self, prompt, system, options):
        return _struct(inputText=prompt, dimensions=options.dimensions, normalize=options.normalize)

    def parse_exprs(self, output):
        return [
            _field(output, "embedding").alias(EMBEDDING),
            _field(output, "inputTextTokenCount").alias(INPUT_TOKENS),
        ]


class CohereEmbed(ModelFamily):
    """Cohere Embed (English and multilingual v3): one text per record, 2,048 characters at most."""

    name = "cohere-embed"
    prefixes = ("cohere.embed-",)
    is_embedding = True
    supports_system = False
    max_input_chars = 2_048

    class CohereOptions(Options):
        input_type: Literal["search_document", "search_query", "classification", "clustering"] = (
            "search_document"
        )
        truncate: Literal["NONE", "START", "END"] | None = None

    options_model = CohereOptions
    output_dtype = pl.Struct({"embeddings": pl.List(pl.List(pl.Float32))})

    def body_expr(self, prompt, system, options):
        return _struct(texts=_one(prompt), input_type=options.input_type, truncate=options.truncate)

    def parse_exprs(self, output):
        # Cohere reports no token count; null is honest where an estimate would mislead billing.
        return [
            _field(output, "embeddings").list.first().alias(EMBEDDING),
            pl.lit(None, dtype=pl.Int64).alias(INPUT_TOKENS),
        ]


_registry: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add a family to the registry (its name must be new)."""
    if family.name in _registry:
        msg = f"A model family named {family.name!r} is already registered."
        raise ValueError(msg)
    _registry[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family from the registry (tests use it to clean up)."""
    _registry.pop(name, None)


def families() -> list[ModelFamily]:
    """Every registered family."""
    return list(_registry.values())


def family_for(model_id: str, invocation_type: str = "InvokeModel") -> ModelFamily:
    """The family that builds bodies for `model_id` and `invocation_type`."""
    if invocation_type not in INVOCATION_TYPES:
        msg = f"invocation_type {invocation_type!r} is not one of {', '.join(INVOCATION_TYPES)}."
        raise InvalidOptionsError(msg)
    base = base_model_id(model_id)
    matches = [
        (len(prefix), family)
        for family in _registry.values()
        for prefix in family.prefixes
        if base.startswith(prefix)
    ]
    if not matches:
        listed = "; ".join(
            f"{family.name} ({', '.join(p + '*' for p in family.prefixes)})"
            for family in _registry.values()
            if family.prefixes
        )
        msg = (
            f"Unknown model id {model_id!r}: no registered model family matches it. "
            f"Registered families and id prefixes: {listed}. Inference-profile prefixes "
            "("
            + ", ".join(INFERENCE_PROFILE_PREFIXES)
            + ") are allowed; to add a model, register a family in "
            "tasks/bedrock/families.py."
        )
        raise UnknownModelError(msg)
    family = max(matches, key=lambda m: m[0])[1]
    if invocation_type == "Converse":
        if family.is_embedding:
            msg = (
                f"Model {model_id!r} is an embedding model ({family.name}); Converse is for text "
                "models. Use invocation_type='InvokeModel'."
            )
            raise InvalidOptionsError(msg)
        return _registry["converse"]
    return family


register(AnthropicMessages())
register(AmazonNova())
register(MetaLlama())
register(Mistral())
register(TitanEmbedV2())
register(CohereEmbed())
register(Converse())
