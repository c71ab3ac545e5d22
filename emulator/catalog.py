"""The foundation models the emulator knows: a view of the project's batch model catalog."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tasks.bedrock import catalog as project_catalog
from tasks.bedrock.model_ids import INFERENCE_PROFILE_PREFIXES, base_model_id
from tasks.errors import InvalidOptionsError, UnknownModelError

from .exceptions import ValidationException

# Family names are the project's registry names, so one table decides a model's shape.
ANTHROPIC = "anthropic"
NOVA = "amazon-nova"
TITAN_EMBED = "amazon-titan-embed-v2"
COHERE_EMBED = "cohere-embed"
LLAMA = "meta-llama"
MISTRAL = "mistral"
MISTRAL_CHAT = "mistral-chat"
OPENAI_COMPATIBLE = "openai-compatible"
OPENAI_GPT_OSS = "openai-gpt-oss"
OPENAI_CHAT = (OPENAI_COMPATIBLE, OPENAI_GPT_OSS)

# Used where a catalog entry gives no max output tokens.
DEFAULT_MAX_OUTPUT_TOKENS = 4096

__all__ = [
    "CATALOG",
    "INFERENCE_PROFILE_PREFIXES",
    "ModelSpec",
    "base_model_id",
    "lookup",
    "resolve_batch_model",
]


@dataclass(frozen=True)
class ModelSpec:
    """One foundation model: its id, family, and whether it embeds or generates text."""

    model_id: str
    family: str
    embedding: bool = False
    dimensions: tuple[int, ...] = ()
    default_dimension: int = 0
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    # The catalog's cap, when it knows one: a record asking for more is refused, as Bedrock does.
    output_limit: int | None = None
    rules: tuple[str, ...] = ()

    @property
    def converse(self) -> bool:
        """Text models accept the Converse invocation type; embedding models do not."""
        return not self.embedding

    @property
    def short_name(self) -> str:
        """The id without its version suffix, used in emulated text: anthropic.claude-3-haiku."""
        return re.sub(r"-\d{8}.*$|-v\d.*$|:\d+$", "", self.model_id)

    @property
    def response_model_name(self) -> str:
        """What Anthropic's modelOutput.model holds: the short name, claude-3-haiku-20240307."""
        return re.sub(r"-v\d+(:\d+)?$", "", self.model_id.split(".", 1)[-1])


def _spec(entry: project_catalog.CatalogEntry) -> ModelSpec:
    return ModelSpec(
        model_id=entry.model_id,
        family=entry.family,
        embedding=entry.is_embedding,
        dimensions=entry.dimensions,
        default_dimension=entry.default_dimension or 0,
        max_output_tokens=entry.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS,
        output_limit=entry.max_output_tokens,
        rules=entry.rules,
    )


CATALOG: dict[str, ModelSpec] = {e.model_id: _spec(e) for e in project_catalog.MODELS}


def lookup(model_id: str) -> ModelSpec | None:
    """The catalog entry for a model id as a caller may write it, or None when unknown."""
    return CATALOG.get(base_model_id(model_id))


def resolve_batch_model(model_id: str, region: str) -> ModelSpec:
    """The spec of a model a batch job may run in `region`, or a ValidationException.

    Unknown ids, profile-only models given a plain id (Nova Premier, Nova 2 Lite, Llama 4),
    plain Nova 1 ids outside the Regions where they work, and profile ids of another
    geography are refused with the project catalog's AWS-like wording.
    """
    try:
        entry = project_catalog.check_batch_region(model_id, region)
    except UnknownModelError:
        near = project_catalog.closest_ids(model_id)
        msg = (
            f"The provided model identifier {model_id!r} is invalid or not supported for batch "
            "inference."
            + (f" Closest supported model ids: {', '.join(near)}." if near else "")
            + " Model ids may carry an inference-profile prefix ("
            + ", ".join(INFERENCE_PROFILE_PREFIXES)
            + ")."
        )
        raise ValidationException(msg) from None
    except InvalidOptionsError as exc:
        raise ValidationException(str(exc)) from None
    return CATALOG[entry.model_id]
