"""Model ids as callers write them: inference-profile prefixes, ARNs and the base model id."""

from __future__ import annotations

import re

# Geographies of cross-Region (system-defined) inference profiles: the id is the geography,
# a dot and the model id (us.anthropic.claude-...). Source: AWS CDK
# CrossRegionInferenceProfileRegion (GLOBAL, US, US_GOV, EU, APAC, JP, AU), and AWS's
# "Supported Regions and models for inference profiles" page, read 2026-11-22.
INFERENCE_PROFILE_PREFIXES: tuple[str, ...] = (
    "us.",
    "us-gov.",
    "eu.",
    "apac.",
    "jp.",
    "au.",
    "global.",
)

_FOUNDATION_ARN = re.compile(r"^arn:aws(-[^:]+)?:bedrock:[a-z0-9-]*::foundation-model/(?P<id>.+)$")
_PROFILE_ARN = re.compile(
    r"^arn:aws(-[^:]+)?:bedrock:[a-z0-9-]+:[0-9]{12}:inference-profile/(?P<id>.+)$"
)


def strip_arn(model_id: str) -> str:
    """The id inside a foundation-model or inference-profile ARN (other text unchanged)."""
    for pattern in (_FOUNDATION_ARN, _PROFILE_ARN):
        match = pattern.match(model_id)
        if match:
            return match.group("id")
    return model_id


def profile_prefix(model_id: str) -> str | None:
    """The inference-profile geography prefix of an id (``"us."``), or None for a plain id."""
    model_id = strip_arn(model_id)
    return next((p for p in INFERENCE_PROFILE_PREFIXES if model_id.startswith(p)), None)


def base_model_id(model_id: str) -> str:
    """The foundation model id without an ARN or an inference-profile prefix."""
    model_id = strip_arn(model_id)
    prefix = profile_prefix(model_id)
    return model_id[len(prefix) :] if prefix else model_id
