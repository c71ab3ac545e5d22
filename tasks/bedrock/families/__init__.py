"""Model families: the registry, `family_for`, and the register calls (one class a family).

Each family lives in its own module (batchata's provider folders); this module only keeps the
registry. `family_for` reads the batch model catalog (`tasks.bedrock.catalog`) to pick the
family of a known model, and falls back to id prefixes for models registered by hand.
"""

from __future__ import annotations

from tasks.bedrock import catalog
from tasks.bedrock.families.amazon import AmazonNova, TitanEmbedV2
from tasks.bedrock.families.anthropic import AnthropicMessages
from tasks.bedrock.families.base import (
    EMBEDDING_RESULT_SCHEMA,
    INVOCATION_TYPES,
    TEXT_RESULT_SCHEMA,
    ModelFamily,
    Options,
    TextOptions,
)
from tasks.bedrock.families.cohere import CohereEmbed
from tasks.bedrock.families.converse import Converse
from tasks.bedrock.families.meta import MetaLlama
from tasks.bedrock.families.mistral import Mistral, MistralChat
from tasks.bedrock.families.openai_compatible import OpenAICompatible, OpenAIGptOss
from tasks.bedrock.model_ids import INFERENCE_PROFILE_PREFIXES, base_model_id
from tasks.errors import InvalidOptionsError, UnknownModelError

__all__ = [
    "EMBEDDING_RESULT_SCHEMA",
    "INVOCATION_TYPES",
    "TEXT_RESULT_SCHEMA",
    "AmazonNova",
    "AnthropicMessages",
    "CohereEmbed",
    "Converse",
    "MetaLlama",
    "Mistral",
    "MistralChat",
    "ModelFamily",
    "OpenAICompatible",
    "OpenAIGptOss",
    "Options",
    "TextOptions",
    "TitanEmbedV2",
    "families",
    "family_for",
    "register",
    "unregister",
]

_registry: dict[str, ModelFamily] = {}
_bound: dict[tuple[int, str], ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add a family to the registry (its name must be new)."""
    if family.name in _registry:
        msg = f"A model family named {family.name!r} is already registered."
        raise ValueError(msg)
    _registry[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family from the registry (tests use it to clean up)."""
    family = _registry.pop(name, None)
    if family is not None:
        for key in [k for k in _bound if k[0] == id(family)]:
            del _bound[key]


def families() -> list[ModelFamily]:
    """Every registered family."""
    return list(_registry.values())


def _bind(family: ModelFamily, entry: catalog.CatalogEntry) -> ModelFamily:
    key = (id(family), entry.model_id)
    bound = _bound.get(key)
    if bound is None:
        bound = _bound[key] = family.bind(entry.model_id, entry.rules, entry.max_output_tokens)
    return bound


def _by_prefix(model_id: str) -> ModelFamily | None:
    base = base_model_id(model_id)
    matches = [
        (len(prefix), family)
        for family in _registry.values()
        for prefix in family.prefixes
        if base.startswith(prefix)
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def _unknown(model_id: str) -> UnknownModelError:
    listed = "; ".join(
        f"{family.name} ({', '.join(p + '*' for p in family.prefixes)})"
        for family in _registry.values()
        if family.prefixes
    )
    near = catalog.closest_ids(model_id)
    msg = (
        f"Unknown model id {model_id!r}: it is not in the batch model catalog and no "
        "registered model family matches it."
        + (f" Closest catalog ids: {', '.join(near)}." if near else "")
        + f" Registered families and id prefixes: {listed}. Inference-profile prefixes ("
        + ", ".join(INFERENCE_PROFILE_PREFIXES)
        + ") are allowed; to add a model, add it to tasks/bedrock/catalog.py (or register a "
        "family in tasks/bedrock/families/)."
    )
    return UnknownModelError(msg)


def family_for(
    model_id: str, invocation_type: str = "InvokeModel", options: dict | None = None
) -> ModelFamily:
    """The family that builds bodies for `model_id` and `invocation_type`.

    A catalog model gets its catalog family (bound to it, so per-model parameter rules hold);
    with Converse, any catalog text model gets the Converse family. Ids not in the catalog fall
    back to the registered families' id prefixes. ``options`` (a plan's) configure what the
    parser reads: the embedding types a run asked for.
    """
    return _family_for(model_id, invocation_type).configured(options)


def _family_for(model_id: str, invocation_type: str) -> ModelFamily:
    if invocation_type not in INVOCATION_TYPES:
        msg = f"invocation_type {invocation_type!r} is not one of {', '.join(INVOCATION_TYPES)}."
        raise InvalidOptionsError(msg)
    entry = catalog.find(model_id)
    family = _registry.get(entry.family) if entry is not None else _by_prefix(model_id)
    if family is None:
        raise _unknown(model_id)
    if invocation_type == "Converse":
        if family.is_embedding:
            msg = (
                f"Model {model_id!r} is an embedding model ({family.name}); Converse is for text "
                "models. Use invocation_type='InvokeModel'."
            )
            raise InvalidOptionsError(msg)
        family = _registry["converse"]
    return _bind(family, entry) if entry is not None else family


register(AnthropicMessages())
register(AmazonNova())
register(TitanEmbedV2())
register(CohereEmbed())
register(MetaLlama())
register(Mistral())
register(MistralChat())
register(OpenAICompatible())
register(OpenAIGptOss())
register(Converse())
