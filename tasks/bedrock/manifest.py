"""A batch job's manifest.json.out: its record counts and the tokens Bedrock charged for it.

Bedrock writes ``manifest.json.out`` beside a job's ``.jsonl.out`` files, holding
``totalRecordCount``, ``processedRecordCount``, ``successRecordCount``, ``errorRecordCount``,
``inputTokenCount`` and ``outputTokenCount`` (AWS user guide, "View the results of a batch
inference job", docs.aws.amazon.com/bedrock/latest/userguide/batch-inference-results.html,
read 2026-12-07). GetModelInvocationJob carries the record counts but no tokens, so for models
whose outputs carry no token counts (Cohere Embed, the older Mistral text models) the manifest
is the only place a job's tokens are written.
"""

from __future__ import annotations

import json
from typing import Any

MANIFEST_FILE = "manifest.json.out"
MANIFEST_FIELDS = (
    "totalRecordCount",
    "processedRecordCount",
    "successRecordCount",
    "errorRecordCount",
    "inputTokenCount",
    "outputTokenCount",
)
TOKEN_FIELDS = ("inputTokenCount", "outputTokenCount")


def parse_manifest(data: bytes) -> dict[str, int] | None:
    """The manifest's numbers, or None when it is not one (empty, cut, or without tokens).

    A manifest we cannot read leaves the job's tokens unknown, never 0.
    """
    try:
        value: Any = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    numbers = {
        k: int(v)
        for k, v in value.items()
        if k in MANIFEST_FIELDS and isinstance(v, int | float) and not isinstance(v, bool)
    }
    if any(k not in numbers or numbers[k] < 0 for k in TOKEN_FIELDS):
        return None
    return numbers


def token_totals(manifest: dict[str, int]) -> tuple[int, int]:
    """(input, output) tokens Bedrock counted for the job (a `parse_manifest` result)."""
    return manifest["inputTokenCount"], manifest["outputTokenCount"]
