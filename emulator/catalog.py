"""The foundation models the emulator knows, keyed by model id, with their family and shape."""

from __future__ import annotations

import re
from dataclasses import dataclass

ANTHROPIC = "anthropic"
NOVA = "nova"
TITAN_EMBED = "titan-embed"
COHERE_EMBED = "cohere-embed"
LLAMA = "llama"
MISTRAL = "mistral"

INFERENCE_PROFILE_PREFIXES = ("us.", "eu.", "apac.", "global.")
_FOUNDATION_ARN = re.compile(r"^arn:aws(-[^:]+)?:bedrock:[a-z0-9-]+::foundation-model/(?P<id>.+)$")
_PROFILE_ARN = re.compile(
    r"^arn:aws(-[^:]+)?:bedrock:[a-z0-9-]+:[0-9]{12}:inference-profile/(?P<id>.+)$"
)


@dataclass(frozen=True)
class ModelSpec:
    """One foundation model: its id, family, and whether it embeds or generates text."""

    model_id: str
    family: str
    embedding: bool = False
    dimensions: tuple[int, ...] = ()
    default_dimension: int = 0
    max_output_tokens: int = 4096

    @property
    def converse(self) -> bool:
        """Text models accept the Converse invocation type; embedding models do not."""
        return not self.embedding

    @property
    def short_name(self) -> str:
        """The id without its version suffix, used in emulated text: anthropic.claude-3-haiku."""
        return re.sub(r"-\d{8}.*$|-v\d.*$|:\d+$", "", self.model_id)


_MODELS = [
    ModelSpec("anthropic.claude-3-haiku-20240307-v1:0", ANTHROPIC),
    ModelSpec("anthropic.claude-3-sonnet-20240229-v1:0", ANTHROPIC),
    ModelSpec("anthropic.claude-3-opus-20240229-v1:0", ANTHROPIC),
    ModelSpec("anthropic.claude-3-5-sonnet-20240620-v1:0", ANTHROPIC, max_output_tokens=8192),
    ModelSpec("anthropic.claude-3-5-sonnet-20241022-v2:0", ANTHROPIC, max_output_tokens=8192),
    ModelSpec("anthropic.claude-3-5-haiku-20241022-v1:0", ANTHROPIC, max_output_tokens=8192),
    ModelSpec("anthropic.claude-3-7-sonnet-20250219-v1:0", ANTHROPIC, max_output_tokens=64000),
    ModelSpec("anthropic.claude-sonnet-4-20250514-v1:0", ANTHROPIC, max_output_tokens=64000),
    ModelSpec("amazon.nova-micro-v1:0", NOVA, max_output_tokens=5120),
    ModelSpec("amazon.nova-lite-v1:0", NOVA, max_output_tokens=5120),
    ModelSpec("amazon.nova-pro-v1:0", NOVA, max_output_tokens=5120),
    ModelSpec(
        "amazon.titan-embed-text-v2:0",
        TITAN_EMBED,
        embedding=True,
        dimensions=(256, 512, 1024),
        default_dimension=1024,
    ),
    ModelSpec(
        "cohere.embed-english-v3",
        COHERE_EMBED,
        embedding=True,
        dimensions=(1024,),
        default_dimension=1024,
    ),
    ModelSpec(
        "cohere.embed-multilingual-v3",
        COHERE_EMBED,
        embedding=True,
        dimensions=(1024,),
        default_dimension=1024,
    ),
    ModelSpec("meta.llama3-1-8b-instruct-v1:0", LLAMA, max_output_tokens=2048),
    ModelSpec("meta.llama3-1-70b-instruct-v1:0", LLAMA, max_output_tokens=2048),
    ModelSpec("meta.llama3-3-70b-instruct-v1:0", LLAMA, max_output_tokens=2048),
    ModelSpec("mistral.mistral-small-2402-v1:0", MISTRAL, max_output_tokens=8192),
    ModelSpec("mistral.mistral-large-2402-v1:0", MISTRAL, max_output_tokens=8192),
]

CATALOG: dict[str, ModelSpec] = {spec.model_id: spec for spec in _MODELS}


def base_model_id(model_id: str) -> str:
    """Strip a foundation-model or inference-profile ARN and a us./eu./apac./global. prefix."""
    for pattern in (_FOUNDATION_ARN, _PROFILE_ARN):
        match = pattern.match(model_id)
        if match:
            model_id = match.group("id")
            break
    for prefix in INFERENCE_PROFILE_PREFIXES:
        if model_id.startswith(prefix):
            return model_id[len(prefix) :]
    return model_id


def lookup(model_id: str) -> ModelSpec | None:
    """The catalog entry for a model id as a caller may write it, or None when unknown."""
    return CATALOG.get(base_model_id(model_id))
