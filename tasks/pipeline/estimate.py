"""The cost estimate of a plan: input tokens from the real request bodies, output as a range.

Input tokens: a sample of the request lines preprocess kept (``estimate-sample.jsonl``) is
counted with bedrock-runtime ``CountTokens`` (the count Bedrock would charge) and a line
``tokens = a * prompt_chars + b`` is fitted to it: ``b`` carries what every request adds (the
system prompt, the family's framing), ``a`` the tokenizer's rate. Every shard is then priced
from its prompt characters, known exactly from preprocess. Where the model or the dry run has
no CountTokens, a characters-per-token ratio stands in and the output says so.

Output tokens are a range: expected from ``BEDROCK_BATCH_COST_EXPECTED_OUTPUT_TOKENS`` (unknown
when unset), at most ``max_tokens`` a record. Costs are at the batch price of
``tasks.bedrock.prices`` (the on-demand price for a run too small for a batch job); an unknown
price gives an unknown (None) cost.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.bedrock.prices import ModelPrice, format_usd
from tasks.pipeline.plan import RunPlan
from tasks.pipeline.preprocess import SAMPLE_FILE

# Offline ratio when nothing better is known: about 4 characters a token for English text
# (the rule of thumb OpenAI and Anthropic give); code, JSON and other scripts take more tokens.
DEFAULT_CHARS_PER_TOKEN = 4.0
OFFLINE_TOLERANCE = "about ±25% for English prose"
_CONVERSE_MEMBERS = ("messages", "system", "toolConfig", "additionalModelRequestFields")


@dataclass
class ShardEstimate:
    """One shard's estimated tokens and cost (USD at its price; None when unknown).

    The price is the batch one, or the on-demand one for a shard under a job's minimum
    (`ShardPlan.on_demand`).
    """

    shard: str
    records: int
    input_tokens: int
    output_expected: int | None
    output_max: int
    cost_low: float | None
    cost_high: float | None
    on_demand: bool = False

    def per_record_high(self) -> float | None:
        """The upper-bound cost of one record of this shard."""
        return None if self.cost_high is None else self.cost_high / max(self.records, 1)


@dataclass
class CostEstimate:
    """A plan's estimate: how input tokens were counted, the price used, each shard."""

    model_id: str
    method: str
    slope: float  # tokens per prompt character
    intercept: float  # tokens every request adds
    price: dict[str, Any] | None
    shards: list[ShardEstimate] = field(default_factory=list)
    sampled: int = 0

    @property
    def input_tokens(self) -> int:
        return sum(s.input_tokens for s in self.shards)

    @property
    def output_max(self) -> int:
        return sum(s.output_max for s in self.shards)

    @property
    def output_expected(self) -> int | None:
        values = [s.output_expected for s in self.shards]
        return None if any(v is None for v in values) else sum(values)

    @property
    def cost_low(self) -> float | None:
        return _sum_or_none(s.cost_low for s in self.shards)

    @property
    def cost_high(self) -> float | None:
        return _sum_or_none(s.cost_high for s in self.shards)

    def shard(self, name: str) -> ShardEstimate | None:
        return next((s for s in self.shards if s.shard == name), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {
            "input_tokens": self.input_tokens,
            "output_expected": self.output_expected,
            "output_max": self.output_max,
            "cost_low_usd": self.cost_low,
            "cost_high_usd": self.cost_high,
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostEstimate:
        data = {k: v for k, v in data.items() if k != "totals"}
        data["shards"] = [ShardEstimate(**s) for s in data.get("shards", [])]
        return cls(**data)


def _sum_or_none(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def read_sample(out_dir: Path) -> list[dict[str, Any]]:
    """The request lines preprocess kept for the estimate (empty when there are none)."""
    path = Path(out_dir) / SAMPLE_FILE
    if not path.is_file():
        return []
    # Records end at "\n" only: a prompt's U+2028 or U+0085 is raw JSON text that
    # str.splitlines() would cut at.
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _count_input(model_input: dict, invocation_type: str) -> dict[str, Any]:
    """The CountTokens `input` for one request body (botocore's CountTokensInput union)."""
    if invocation_type == "Converse":
        return {"converse": {k: model_input[k] for k in _CONVERSE_MEMBERS if k in model_input}}
    return {"invokeModel": {"body": json.dumps(model_input).encode()}}


def count_sample(
    client, model_id: str, invocation_type: str, sample: list[dict[str, Any]]
) -> list[tuple[int, int]]:
    """(prompt chars, CountTokens inputTokens) of every sampled line; raises the client's error."""
    bodies = [json.loads(s["line"])["modelInput"] for s in sample]

    def count(body: dict) -> int:
        answer = client.count_tokens(modelId=model_id, input=_count_input(body, invocation_type))
        return int(answer["inputTokens"])

    if not bodies:
        return []
    first = count(bodies[0])  # an unsupported model fails once, not once a thread
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="count-tokens") as pool:
        rest = list(pool.map(count, bodies[1:]))
    return [(int(s["chars"]), t) for s, t in zip(sample, [first, *rest], strict=True)]


def fit(counts: list[tuple[int, int]]) -> tuple[float, float]:
    """(tokens per prompt char, tokens per request) fitted to the counted sample."""
    x = np.array([c for c, _ in counts], dtype=np.float64)
    y = np.array([t for _, t in counts], dtype=np.float64)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        if slope > 0 and intercept >= 0:
            return float(slope), float(intercept)
    return float(y.sum() / max(x.sum(), 1.0)), 0.0


def estimate_plan(
    plan: RunPlan,
    price: ModelPrice | None,
    *,
    counts: list[tuple[int, int]] | None = None,
    offline_reason: str = "",
    system_chars: int = 0,
    chars_per_token: float | None = None,
    expected_output: int | None = None,
    is_embedding: bool = False,
) -> CostEstimate:
    """Tokens and batch-price cost per shard of ``plan``.

    Args:
        plan: the shards, with their prompt characters.
        price: the model's price (None: costs unknown).
        counts: (prompt chars, CountTokens tokens) of sampled records; None or empty: offline.
        offline_reason: why there are no counts, said in the method.
        system_chars: characters of the system prompt every record sends (offline only).
        chars_per_token: the offline ratio (default 4).
        expected_output: expected output tokens a record (None: unknown).
        is_embedding: embeddings produce no output tokens.

    Returns:
        The estimate.
    """
    if counts:
        slope, intercept = fit(counts)
        method = (
            f"CountTokens on {len(counts)} sampled records, fitted: {slope:.4f} tokens per "
            f"prompt character + {intercept:.1f} per request"
        )
    else:
        ratio = chars_per_token or DEFAULT_CHARS_PER_TOKEN
        slope, intercept = 1.0 / ratio, system_chars / ratio
        method = (
            f"offline ({offline_reason or 'no CountTokens'}): {ratio:g} characters per token, "
            f"{OFFLINE_TOLERANCE}"
        )
    max_tokens = 0 if is_embedding else int(plan.options.get("max_tokens") or 0)
    if is_embedding:
        expected_output = 0
    elif expected_output is not None:
        expected_output = min(expected_output, max_tokens)
    shards = []
    for s in plan.shards:
        tokens = math.ceil(slope * s.chars + intercept * s.records)
        out_max = max_tokens * s.records
        out_expected = None if expected_output is None else expected_output * s.records
        mode = "on_demand" if s.on_demand else "batch"
        low = price.cost(tokens, out_expected or 0, mode) if price else None
        high = price.cost(tokens, out_max, mode) if price else None
        shards.append(
            ShardEstimate(s.name, s.records, tokens, out_expected, out_max, low, high, s.on_demand)
        )
    return CostEstimate(
        model_id=plan.model_id,
        method=method,
        slope=slope,
        intercept=intercept,
        price=asdict(price) if price else None,
        shards=shards,
        sampled=len(counts or []),
    )


def _tokens(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def format_estimate(estimate: CostEstimate) -> str:
    """The estimate as the dry run prints it: the method, the price, a line a shard, the total."""
    p = estimate.price
    if p and p.get("batch_input") is not None:
        price = (
            f"batch ${p['batch_input']:g} in / ${p['batch_output']:g} out per million tokens "
            f"({p['source']}, read {p['read']})"
        )
    else:
        price = (
            "no batch price known for this model: costs are unknown; set one in "
            "BEDROCK_BATCH_PRICES_FILE or the Prefect Variable bedrock-batch-prices"
        )
    header = (
        f"{'shard':<12} {'records':>9} {'input tokens':>13} {'output tokens exp / max':>24} "
        f"{'cost (batch) low – high':>26}"
    )
    lines = [
        f"Cost estimate for {estimate.model_id}",
        f"  input tokens: {estimate.method}",
        "  output tokens: expected "
        + (
            "unknown (set BEDROCK_BATCH_COST_EXPECTED_OUTPUT_TOKENS)"
            if estimate.output_expected is None
            else "from BEDROCK_BATCH_COST_EXPECTED_OUTPUT_TOKENS"
        )
        + ", at most max_tokens a record",
        f"  price: {price}",
        "",
        header,
        "-" * len(header),
    ]

    def row(name, records, tin, texp, tmax, low, high):
        outs = f"{_tokens(texp)} / {_tokens(tmax)}"
        cost = f"{format_usd(low)} – {format_usd(high)}"
        return f"{name:<12} {records:>9,} {tin:>13,} {outs:>24} {cost:>26}"

    for s in estimate.shards:
        lines.append(
            row(
                s.shard,
                s.records,
                s.input_tokens,
                s.output_expected,
                s.output_max,
                s.cost_low,
                s.cost_high,
            )
        )
    lines.append("-" * len(header))
    lines.append(
        row(
            "total",
            sum(s.records for s in estimate.shards),
            estimate.input_tokens,
            estimate.output_expected,
            estimate.output_max,
            estimate.cost_low,
            estimate.cost_high,
        )
    )
    if estimate.output_expected is None:
        lines.append("(low: input tokens only, as no expected output is set)")
    for s in estimate.shards:
        if s.on_demand:
            lines.append(
                f"({s.shard}: {s.records:,} records, fewer than a batch job takes; served on "
                "demand through bedrock-runtime, its cost at the on-demand price)"
            )
    return "\n".join(lines)


def estimate_from_dir(
    plan: RunPlan,
    out_dir: Path | None,
    client=None,
    *,
    use_variable: bool = False,
    offline_reason: str = "no bedrock-runtime client",
) -> CostEstimate:
    """The estimate of a plan preprocess wrote in ``out_dir``, counting with ``client`` if given.

    A model without CountTokens (a ValidationException), missing permissions or no network
    fall back to the offline ratio, and the method names why.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from prompt_templates import prompt_id_to_template
    from tasks.bedrock.families import family_for
    from tasks.bedrock.prices import price_for
    from tasks.settings import get_settings

    settings = get_settings().cost
    family = family_for(plan.model_id, plan.invocation_type)
    template = prompt_id_to_template.get(plan.prompt_id) if plan.prompt_id else None
    counts: list[tuple[int, int]] | None = None
    if client is not None and settings.sample_records:
        sample = read_sample(out_dir) if out_dir else []
        offline_reason = "no sampled records kept with the plan"
        if sample:
            try:
                counts = count_sample(client, plan.model_id, plan.invocation_type, sample)
            except (ClientError, BotoCoreError) as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Message") or str(exc)
                offline_reason = f"CountTokens unavailable: {code}"
    return estimate_plan(
        plan,
        price_for(plan.model_id, use_variable),
        counts=counts,
        offline_reason=offline_reason,
        system_chars=len(template.system or "") if template else 0,
        chars_per_token=settings.chars_per_token,
        expected_output=settings.expected_output_tokens,
        is_embedding=family.is_embedding,
    )
