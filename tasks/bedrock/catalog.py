"""The foundation models Bedrock runs batch inference for, as one table with its sources.

Source of the model list and of the regions: AWS, "Supported Regions and models for batch
inference", https://docs.aws.amazon.com/bedrock/latest/userguide/batch-inference-supported.html
(read 2026-11-22). Only the first rows of its table could be read in full that day (Nova Lite,
Micro, Pro: plain id in us-east-1 and us-gov-west-1, inference profile in 15 regions; Nova
Premier: no plain id, profile in us-east-1, us-east-2, us-west-2). For the other rows the
catalog says what the project's DESIGN.md records from the same page (Nova 2 Lite and Llama 4
only through a profile) and otherwise leaves `plain_regions` unknown (None: not checked here,
Bedrock decides). Models whose batch support is known from AWS's Service Quotas names (e.g.
"Records per batch inference job for Qwen3 32B", "Sum of in-progress and submitted batch
inference jobs using a base model for DeepSeek v3", read 2026-11-22) carry that as their note.

Run ``python -m tasks.bedrock.catalog --markdown`` to print the README's model table.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from typing import Literal

from tasks.bedrock.model_ids import base_model_id, profile_prefix, strip_arn
from tasks.errors import InvalidOptionsError, UnknownModelError

SOURCE_URL = "https://docs.aws.amazon.com/bedrock/latest/userguide/batch-inference-supported.html"
SOURCE_READ = "2026-11-22"

TEXT = "text"
EMBEDDING = "embedding"

# Parameter rules a family enforces for the models that carry them.
# Anthropic's newer models answer a request with both set: "`temperature` and `top_p` cannot
# both be specified for this model. Please use only one." (error quoted in
# aws-samples/sample-connector-for-bedrock issue #87 for Claude Sonnet 4.5, read 2026-11-22).
TEMPERATURE_XOR_TOP_P = "temperature_xor_top_p"

# Regions each cross-Region profile geography can be called from (its source Regions): a
# profile id is only accepted in a Region of its own geography. "global." works everywhere.
_GEOGRAPHY_REGION_PREFIXES: dict[str, tuple[str, ...]] = {
    "us.": ("us-east-", "us-west-", "ca-"),
    "us-gov.": ("us-gov-",),
    "eu.": ("eu-",),
    "apac.": ("ap-",),
    "jp.": ("ap-northeast-1", "ap-northeast-3"),
    "au.": ("ap-southeast-2", "ap-southeast-4"),
}

# Plain Nova 1 ids: the batch page lists these Regions for the foundation model itself.
_NOVA1_PLAIN = ("us-east-1", "us-gov-west-1")
_NOVA1_PROFILE = (
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-south-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "eu-central-1",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-3",
)


@dataclass(frozen=True)
class CatalogEntry:
    """One batch-capable foundation model and what the project must know about it."""

    model_id: str
    name: str
    family: str  # name of the registered family that builds its InvokeModel bodies
    modality: Literal["text", "embedding"] = TEXT
    # True: batch needs an inference-profile id (us.…, global.…); a plain id is refused.
    profile_only: bool = False
    # Regions where a plain id works for batch; None when the source did not say.
    plain_regions: tuple[str, ...] | None = None
    # Regions where its inference profile works for batch; None when the source did not say.
    profile_regions: tuple[str, ...] | None = None
    # The most max_tokens Bedrock accepts for it (options above it are refused before a job:
    # Bedrock fails every such record); None: not known here, Bedrock decides.
    max_output_tokens: int | None = None
    dimensions: tuple[int, ...] = ()
    default_dimension: int | None = None
    # Per-model quota defaults where AWS documents one that differs; None: the account default
    # (QuotaSettings: 100 or 1,000 minimum records, 50,000 records, 1 GB file, 5 GB job).
    min_records: int | None = None
    max_records: int | None = None
    max_file_gb: float | None = None
    max_job_gb: float | None = None
    rules: tuple[str, ...] = ()
    note: str = ""

    @property
    def is_embedding(self) -> bool:
        """Embedding models return vectors and do not accept Converse."""
        return self.modality == EMBEDDING

    @property
    def provider(self) -> str:
        """The provider part of the id: anthropic, amazon, meta, ..."""
        return self.model_id.split(".", 1)[0]


_QUOTA_NOTE = "batch support from AWS Service Quotas names (read 2026-11-22)"
_UNVERIFIED = "regions not read from the batch page; Bedrock decides"


# Anthropic documents 8,192 output tokens for these two, but Bedrock refused more than 4,096:
# "The maximum tokens you requested exceeds the model limit of 4096" (Claude 3.5 Sonnet
# 20240620 in vercel/ai issue #2772 and RooCodeInc/Roo-Code issue #248; Claude 3.5 Haiku in
# langgenius/dify issue #10390; read 2026-12-07).
_BEDROCK_4096 = "Bedrock caps output at 4,096 tokens (its own error, quoted in public issues)"
# Nova 1's output cap: the model cards say 5K (5,120 where listed), AWS's Nova 1 -> Nova 2
# migration post 10K (both quoted in quattro004/Agent004's wiki, read 2026-12-07). The higher is
# kept, so that no value Bedrock accepts is refused here.
_NOVA1_MAX_OUTPUT = 10_000


def _claude(model_id: str, name: str, max_out: int, *rules: str, note: str = "") -> CatalogEntry:
    return CatalogEntry(
        model_id, name, "anthropic", max_output_tokens=max_out, rules=rules, note=note
    )


MODELS: tuple[CatalogEntry, ...] = (
    # Anthropic: messages API. Max output tokens from Anthropic's model overview, except where
    # Bedrock's own answers show a lower cap (_BEDROCK_4096 below).
    _claude("anthropic.claude-3-haiku-20240307-v1:0", "Claude 3 Haiku", 4096),
    _claude("anthropic.claude-3-sonnet-20240229-v1:0", "Claude 3 Sonnet", 4096),
    _claude("anthropic.claude-3-opus-20240229-v1:0", "Claude 3 Opus", 4096),
    _claude(
        "anthropic.claude-3-5-sonnet-20240620-v1:0", "Claude 3.5 Sonnet", 4096, note=_BEDROCK_4096
    ),
    _claude("anthropic.claude-3-5-sonnet-20241022-v2:0", "Claude 3.5 Sonnet v2", 8192),
    _claude(
        "anthropic.claude-3-5-haiku-20241022-v1:0", "Claude 3.5 Haiku", 4096, note=_BEDROCK_4096
    ),
    _claude("anthropic.claude-3-7-sonnet-20250219-v1:0", "Claude 3.7 Sonnet", 64000),
    _claude("anthropic.claude-sonnet-4-20250514-v1:0", "Claude Sonnet 4", 64000),
    _claude("anthropic.claude-opus-4-20250514-v1:0", "Claude Opus 4", 32000),
    _claude(
        "anthropic.claude-opus-4-1-20250805-v1:0",
        "Claude Opus 4.1",
        32000,
        TEMPERATURE_XOR_TOP_P,
        note="temperature/top_p rule assumed from Anthropic's 4.1 notes (unverified)",
    ),
    _claude(
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        "Claude Sonnet 4.5",
        64000,
        TEMPERATURE_XOR_TOP_P,
    ),
    _claude(
        "anthropic.claude-haiku-4-5-20251001-v1:0", "Claude Haiku 4.5", 64000, TEMPERATURE_XOR_TOP_P
    ),
    _claude(
        "anthropic.claude-opus-4-5-20251101-v1:0", "Claude Opus 4.5", 64000, TEMPERATURE_XOR_TOP_P
    ),
    # Amazon Nova: messages-v1 invoke schema.
    CatalogEntry(
        "amazon.nova-micro-v1:0",
        "Nova Micro",
        "amazon-nova",
        plain_regions=_NOVA1_PLAIN,
        profile_regions=_NOVA1_PROFILE,
        max_output_tokens=_NOVA1_MAX_OUTPUT,
    ),
    CatalogEntry(
        "amazon.nova-lite-v1:0",
        "Nova Lite",
        "amazon-nova",
        plain_regions=_NOVA1_PLAIN,
        profile_regions=_NOVA1_PROFILE,
        max_output_tokens=_NOVA1_MAX_OUTPUT,
    ),
    CatalogEntry(
        "amazon.nova-pro-v1:0",
        "Nova Pro",
        "amazon-nova",
        plain_regions=_NOVA1_PLAIN,
        profile_regions=_NOVA1_PROFILE,
        max_output_tokens=_NOVA1_MAX_OUTPUT,
    ),
    CatalogEntry(
        "amazon.nova-premier-v1:0",
        "Nova Premier",
        "amazon-nova",
        profile_only=True,
        plain_regions=(),
        profile_regions=("us-east-1", "us-east-2", "us-west-2"),
        max_output_tokens=32000,
    ),
    CatalogEntry(
        "amazon.nova-2-lite-v1:0",
        "Nova 2 Lite",
        "amazon-nova",
        profile_only=True,
        plain_regions=(),
        note="profile only per DESIGN.md; max output tokens not documented here",
    ),
    CatalogEntry(
        "amazon.titan-embed-text-v2:0",
        "Titan Text Embeddings V2",
        "amazon-titan-embed-v2",
        modality=EMBEDDING,
        dimensions=(256, 512, 1024),
        default_dimension=1024,
    ),
    # Cohere Embed: v3 floats by default; v4 (and v3 with embedding_types) keyed by type.
    CatalogEntry(
        "cohere.embed-english-v3",
        "Cohere Embed English v3",
        "cohere-embed",
        modality=EMBEDDING,
        dimensions=(1024,),
        default_dimension=1024,
    ),
    CatalogEntry(
        "cohere.embed-multilingual-v3",
        "Cohere Embed Multilingual v3",
        "cohere-embed",
        modality=EMBEDDING,
        dimensions=(1024,),
        default_dimension=1024,
    ),
    CatalogEntry(
        "cohere.embed-v4:0",
        "Cohere Embed v4",
        "cohere-embed",
        modality=EMBEDDING,
        dimensions=(256, 512, 1024, 1536),
        default_dimension=1536,
        note=_UNVERIFIED,
    ),
    # Meta Llama: a prompt in the Llama chat format, max_gen_len.
    CatalogEntry(
        "meta.llama3-1-8b-instruct-v1:0",
        "Llama 3.1 8B Instruct",
        "meta-llama",
        max_output_tokens=2048,
    ),
    CatalogEntry(
        "meta.llama3-1-70b-instruct-v1:0",
        "Llama 3.1 70B Instruct",
        "meta-llama",
        max_output_tokens=2048,
    ),
    CatalogEntry(
        "meta.llama3-2-1b-instruct-v1:0",
        "Llama 3.2 1B Instruct",
        "meta-llama",
        max_output_tokens=2048,
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "meta.llama3-2-3b-instruct-v1:0",
        "Llama 3.2 3B Instruct",
        "meta-llama",
        max_output_tokens=2048,
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "meta.llama3-2-11b-instruct-v1:0",
        "Llama 3.2 11B Instruct",
        "meta-llama",
        max_output_tokens=2048,
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "meta.llama3-2-90b-instruct-v1:0",
        "Llama 3.2 90B Instruct",
        "meta-llama",
        max_output_tokens=2048,
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "meta.llama3-3-70b-instruct-v1:0",
        "Llama 3.3 70B Instruct",
        "meta-llama",
        max_output_tokens=2048,
    ),
    CatalogEntry(
        "meta.llama4-scout-17b-instruct-v1:0",
        "Llama 4 Scout 17B Instruct",
        "meta-llama",
        profile_only=True,
        plain_regions=(),
        note="profile only per DESIGN.md",
    ),
    CatalogEntry(
        "meta.llama4-maverick-17b-instruct-v1:0",
        "Llama 4 Maverick 17B Instruct",
        "meta-llama",
        profile_only=True,
        plain_regions=(),
        note="profile only per DESIGN.md",
    ),
    # Mistral: text completion (2402) and chat completion (Large 2407 and later).
    CatalogEntry(
        "mistral.mistral-small-2402-v1:0",
        "Mistral Small (24.02)",
        "mistral",
        max_output_tokens=8192,
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "mistral.mistral-large-2402-v1:0",
        "Mistral Large (24.02)",
        "mistral",
        max_output_tokens=8192,
    ),
    CatalogEntry(
        "mistral.mistral-large-2407-v1:0",
        "Mistral Large 2 (24.07)",
        "mistral-chat",
        max_output_tokens=8192,
        note=_UNVERIFIED,
    ),
    # OpenAI-compatible chat completions (gpt-oss, Qwen, DeepSeek).
    CatalogEntry("openai.gpt-oss-20b-1:0", "gpt-oss-20b", "openai-gpt-oss", note=_QUOTA_NOTE),
    CatalogEntry("openai.gpt-oss-120b-1:0", "gpt-oss-120b", "openai-gpt-oss", note=_QUOTA_NOTE),
    CatalogEntry("qwen.qwen3-32b-v1:0", "Qwen3 32B", "openai-compatible", note=_QUOTA_NOTE),
    CatalogEntry(
        "qwen.qwen3-235b-a22b-2507-v1:0",
        "Qwen3 235B A22B 2507",
        "openai-compatible",
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "qwen.qwen3-coder-30b-a3b-v1:0",
        "Qwen3 Coder 30B A3B",
        "openai-compatible",
        note=_QUOTA_NOTE,
    ),
    CatalogEntry(
        "qwen.qwen3-coder-480b-a35b-v1:0",
        "Qwen3 Coder 480B A35B",
        "openai-compatible",
        note=_QUOTA_NOTE,
    ),
    CatalogEntry("deepseek.v3-v1:0", "DeepSeek V3.1", "openai-compatible", note=_QUOTA_NOTE),
)

CATALOG: dict[str, CatalogEntry] = {entry.model_id: entry for entry in MODELS}


def find(model_id: str) -> CatalogEntry | None:
    """The entry of a model id as a caller writes it (profile prefix, ARN), or None."""
    return CATALOG.get(base_model_id(model_id))


def closest_ids(model_id: str, n: int = 5) -> list[str]:
    """The catalog ids nearest to `model_id` (difflib), best first."""
    return difflib.get_close_matches(base_model_id(model_id), list(CATALOG), n=n, cutoff=0.4)


def lookup(model_id: str) -> CatalogEntry:
    """The entry of a model id (profile prefixes and ARNs accepted), or UnknownModelError."""
    entry = find(model_id)
    if entry is None:
        near = closest_ids(model_id)
        hint = f" Closest known ids: {', '.join(near)}." if near else ""
        msg = (
            f"Model id {model_id!r} is not in the batch model catalog ({len(CATALOG)} models, "
            f"from {SOURCE_URL} read {SOURCE_READ}).{hint} Run "
            "`python -m tasks.bedrock.catalog --markdown` for the full list."
        )
        raise UnknownModelError(msg)
    return entry


def quota_key(model_id: str) -> str:
    """What the "jobs submitted or in progress per model" quota counts a job under.

    AWS names the quota "Sum of in-progress and submitted batch inference jobs using a base
    model for ${model}" (Service Quotas, read 2026-11-22); no quota of that kind exists per
    inference profile, while on-demand quotas do come in separate cross-Region variants. So a
    job on ``us.X``, ``global.X``, an ARN of either, or plain ``X`` all count against X: the
    base model id. (Inferred from the quota names; AWS does not say it in prose.)
    """
    return base_model_id(model_id)


def _region_matches(prefix: str, region: str) -> bool:
    if prefix == "global.":
        return True
    starts = _GEOGRAPHY_REGION_PREFIXES.get(prefix)
    return starts is None or region.startswith(starts)


def check_batch_region(model_id: str, region: str) -> CatalogEntry:
    """The entry if `model_id` can run batch in `region`, else an error worded like AWS's.

    Profile-only models with a plain id are refused with the wording Bedrock's runtime uses
    ("Invocation of model ID X with on-demand throughput isn't supported. Retry your request
    with the ID or ARN of an inference profile that contains this model.", quoted in
    langchain-ai/langchain-aws issue #1019 for amazon.nova-2-lite-v1:0, read 2026-11-22); the
    exact batch (CreateModelInvocationJob) wording was not found and may differ.
    """
    entry = lookup(model_id)
    prefix = profile_prefix(model_id)
    base = entry.model_id
    if prefix is None:
        if entry.profile_only or (
            entry.plain_regions is not None and region not in entry.plain_regions
        ):
            where = (
                "in any Region"
                if entry.profile_only or not entry.plain_regions
                else f"in {region} (plain id works in: {', '.join(entry.plain_regions)})"
            )
            msg = (
                f"Invocation of model ID {strip_arn(model_id)} with on-demand throughput isn't "
                f"supported for batch inference {where}. Retry your request with the ID or ARN "
                f"of an inference profile that contains this model (e.g. us.{base} or "
                f"global.{base})."
            )
            raise InvalidOptionsError(msg)
        return entry
    if not _region_matches(prefix, region) or (
        entry.profile_regions is not None and region not in entry.profile_regions
    ):
        known = (
            f" Regions with its inference profile: {', '.join(entry.profile_regions)}."
            if entry.profile_regions
            else ""
        )
        msg = (
            f"The provided model identifier {strip_arn(model_id)} is not supported for batch "
            f"inference in {region}: the {prefix.rstrip('.')} inference profile does not serve "
            f"this Region.{known}"
        )
        raise InvalidOptionsError(msg)
    return entry


def markdown_table() -> str:
    """The README's model table: one row per catalog entry, with the source and its date."""
    lines = [
        f"Models the catalog knows (`tasks/bedrock/catalog.py`), from AWS's [Supported Regions "
        f"and models for batch inference]({SOURCE_URL}), read {SOURCE_READ}. Regenerate with "
        "`python -m tasks.bedrock.catalog --markdown`.",
        "",
        "| Model id | Name | Family | Modality | Batch id | Max output tokens | Dimensions |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in MODELS:
        if e.profile_only:
            how = "inference profile only"
        elif e.plain_regions:
            how = f"plain id in {', '.join(e.plain_regions)}; else profile"
        else:
            how = "plain id or profile"
        dims = ", ".join(str(d) for d in e.dimensions) or "–"
        out = f"{e.max_output_tokens:,}" if e.max_output_tokens else "–"
        lines.append(
            f"| `{e.model_id}` | {e.name} | {e.family} | {e.modality} | {how} | {out} | {dims} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - a printing entry point
    if "--markdown" in sys.argv[1:]:
        sys.stdout.write(markdown_table())
    else:
        for entry in MODELS:
            print(entry.model_id)
