"""Model prices (USD per million tokens, on demand and batch) with their sources, and overrides.

AWS publishes the prices on https://aws.amazon.com/bedrock/pricing/ ("Pricing for Batch mode
is the same as pricing for On-Demand mode" in its old wording; the model tables carry separate
batch columns, about half the on-demand price). That page renders its numbers client-side, so
they could not be read from it directly on 2026-11-22; the figures below come from two
transcriptions of it, each named in its entry:

- ``_PAGE_2025``: the page's model tables as transcribed on 2025-07-20 (us-east-1), in
  convo-lang/convo-lang ``packages/convo-lang-bedrock/bedrock-pricing.md``, read 2026-11-22.
  "N/A" in its batch columns is kept as unknown here.
- ``_AWS_TOOLKIT``: aws/agent-toolkit-for-aws ``bedrock_pricing.py`` STATIC_FALLBACK ("verified
  2026-10-05 against aws.amazon.com/bedrock/pricing"), read 2026-11-22; on demand only.

A price nobody could source is None and the cost it would give is reported as unknown, never
guessed. Prices differ by Region (us-east-1 here), by inference profile (geographic profiles
of the newest Claude models cost about 10% more than global ones) and by contract: override
them with a JSON file named by ``BEDROCK_BATCH_PRICES_FILE`` and/or the Prefect Variable
``bedrock-batch-prices``, both of the shape (per million tokens, any field may be left out)::

    {"anthropic.claude-3-haiku-20240307-v1:0": {
        "batch_input": 0.125, "batch_output": 0.625,
        "on_demand_input": 0.25, "on_demand_output": 1.25,
        "source": "our AWS contract", "read": "2026-11-22"}}
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tasks.bedrock import catalog
from tasks.bedrock.model_ids import base_model_id
from tasks.errors import RunSettingsError

PRICING_URL = "https://aws.amazon.com/bedrock/pricing/"
PRICES_VARIABLE = "bedrock-batch-prices"
_PAGE_2025 = (
    f"{PRICING_URL} (us-east-1, as transcribed 2025-07-20 in convo-lang/convo-lang "
    "packages/convo-lang-bedrock/bedrock-pricing.md)"
)
_AWS_TOOLKIT = (
    f"{PRICING_URL} (as in aws/agent-toolkit-for-aws bedrock_pricing.py, verified 2026-10-05)"
)
READ = "2026-11-22"
MILLION = 1_000_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of one model; None where no source gave the price."""

    model_id: str
    on_demand_input: float | None = None
    on_demand_output: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None
    source: str = ""
    read: str = READ

    def per_million(self, mode: str) -> tuple[float | None, float | None]:
        """(input, output) price for ``mode`` "batch" or "on_demand"."""
        if mode == "batch":
            return self.batch_input, self.batch_output
        return self.on_demand_input, self.on_demand_output

    def cost(self, input_tokens: int, output_tokens: int, mode: str = "batch") -> float | None:
        """USD for these tokens at the ``mode`` price; None when a needed price is unknown."""
        price_in, price_out = self.per_million(mode)
        if price_in is None or (output_tokens and price_out is None):
            return None
        return (input_tokens * price_in + output_tokens * (price_out or 0.0)) / MILLION


def format_usd(value: float | None, sign: str = "$") -> str:
    """A cost for people: 4 decimals, more for a cost under $0.001 so it never reads as $0.

    Two significant digits at least: $0.0000018 for a one-record Nova Micro run, which 4
    decimals showed as $0.0000 (and 2 as $0.00). "unknown" for None.
    """
    if value is None:
        return "unknown"
    return f"{sign}{value:,.{_decimals(value)}f}"


def _decimals(value: float) -> int:
    """4, or enough for two significant digits of a cost under $0.001."""
    if 0 < abs(value) < 0.001:
        return 1 - math.floor(math.log10(abs(value)))
    return 4


def ceil_usd(value: float) -> str:
    """``value`` rounded up at `format_usd`'s precision: a ceiling that is at least it."""
    decimals = _decimals(value)
    scale = 10**decimals
    units = math.ceil(value * scale)
    if units / scale < value:  # the product rounded down in floating point
        units += 1
    return f"{units / scale:.{decimals}f}"


def _p(model_id, od_in, od_out, b_in=None, b_out=None, source=_PAGE_2025) -> ModelPrice:
    return ModelPrice(model_id, od_in, od_out, b_in, b_out, source if od_in is not None else "")


# One entry per catalog model (test_prices checks the catalog is covered).
PRICES: dict[str, ModelPrice] = {
    p.model_id: p
    for p in (
        _p("anthropic.claude-3-haiku-20240307-v1:0", 0.25, 1.25, 0.125, 0.625),
        _p("anthropic.claude-3-sonnet-20240229-v1:0", None, None),
        _p("anthropic.claude-3-opus-20240229-v1:0", None, None),
        _p("anthropic.claude-3-5-sonnet-20240620-v1:0", 3.0, 15.0, 1.5, 7.5),
        _p("anthropic.claude-3-5-sonnet-20241022-v2:0", 3.0, 15.0, 1.5, 7.5),
        _p("anthropic.claude-3-5-haiku-20241022-v1:0", 0.8, 4.0),
        _p("anthropic.claude-3-7-sonnet-20250219-v1:0", 3.0, 15.0),
        _p("anthropic.claude-sonnet-4-20250514-v1:0", 3.0, 15.0),
        _p("anthropic.claude-opus-4-20250514-v1:0", 15.0, 75.0),
        _p("anthropic.claude-opus-4-1-20250805-v1:0", None, None),
        _p("anthropic.claude-sonnet-4-5-20250929-v1:0", None, None),
        _p("anthropic.claude-haiku-4-5-20251001-v1:0", 1.0, 5.0, source=_AWS_TOOLKIT),
        _p("anthropic.claude-opus-4-5-20251101-v1:0", None, None),
        _p("amazon.nova-micro-v1:0", 0.035, 0.14, 0.0175, 0.07),
        _p("amazon.nova-lite-v1:0", 0.06, 0.24, 0.03, 0.12),
        _p("amazon.nova-pro-v1:0", 0.8, 3.2, 0.4, 1.6),
        _p("amazon.nova-premier-v1:0", 2.5, 12.5, 1.25, 6.25),
        _p("amazon.nova-2-lite-v1:0", None, None),
        # Embeddings: no transcription of the page's embedding table was found (searched
        # 2026-12-07; only unsourced per-project constants and one calculator site, for Embed
        # v4 alone), so these stay unknown and a run's cost says "unknown", not a guess. Its
        # tokens are still right (each job's manifest). The page charges embeddings "for every
        # input token processed" (no output price); a batch price it does not publish stays
        # None rather than the on-demand one: its old wording said batch "is the same as
        # pricing for On-Demand mode", its tables now list about half for select models only.
        # Give the prices with BEDROCK_BATCH_PRICES_FILE or the Prefect Variable.
        _p("amazon.titan-embed-text-v2:0", None, None),
        _p("cohere.embed-english-v3", None, None),
        _p("cohere.embed-multilingual-v3", None, None),
        _p("cohere.embed-v4:0", None, None),
        _p("meta.llama3-1-8b-instruct-v1:0", 0.22, 0.22, 0.11, 0.11),
        _p("meta.llama3-1-70b-instruct-v1:0", 0.72, 0.72, 0.36, 0.36),
        _p("meta.llama3-2-1b-instruct-v1:0", 0.1, 0.1),
        _p("meta.llama3-2-3b-instruct-v1:0", 0.15, 0.15),
        _p("meta.llama3-2-11b-instruct-v1:0", 0.16, 0.16),
        _p("meta.llama3-2-90b-instruct-v1:0", 0.72, 0.72),
        _p("meta.llama3-3-70b-instruct-v1:0", 0.72, 0.72, 0.36, 0.36),
        _p("meta.llama4-scout-17b-instruct-v1:0", 0.17, 0.66, 0.085, 0.33),
        _p("meta.llama4-maverick-17b-instruct-v1:0", 0.24, 0.97, 0.12, 0.485),
        _p("mistral.mistral-small-2402-v1:0", None, None),
        _p("mistral.mistral-large-2402-v1:0", None, None),
        _p("mistral.mistral-large-2407-v1:0", None, None),
        _p("openai.gpt-oss-20b-1:0", None, None),
        _p("openai.gpt-oss-120b-1:0", None, None),
        _p("qwen.qwen3-32b-v1:0", None, None),
        _p("qwen.qwen3-235b-a22b-2507-v1:0", None, None),
        _p("qwen.qwen3-coder-30b-a3b-v1:0", None, None),
        _p("qwen.qwen3-coder-480b-a35b-v1:0", None, None),
        _p("deepseek.v3-v1:0", None, None),
    )
}

_FIELDS = {f.name for f in fields(ModelPrice)} - {"model_id"}
_NUMBERS = ("on_demand_input", "on_demand_output", "batch_input", "batch_output")


def _apply(table: dict[str, ModelPrice], overrides: Any, where: str) -> None:
    """Merge one override document (the README's shape) into ``table``."""
    if not isinstance(overrides, dict):
        msg = f"Prices in {where} must be a JSON object keyed by model id; got {overrides!r:.80}."
        raise RunSettingsError(msg)
    for model_id, entry in overrides.items():
        unknown = sorted(set(entry) - _FIELDS) if isinstance(entry, dict) else ["(not an object)"]
        bad = [
            k for k in _NUMBERS if k in entry and not isinstance(entry[k], (int, float, type(None)))
        ]
        if unknown or bad:
            msg = (
                f"Price of {model_id!r} in {where}: unknown fields {unknown} or non-numbers "
                f"{bad}; fields are {', '.join(sorted(_FIELDS))} (USD per million tokens)."
            )
            raise RunSettingsError(msg)
        base = base_model_id(model_id)
        current = table.get(base, ModelPrice(base))
        values = {k: (float(v) if k in _NUMBERS and v is not None else v) for k, v in entry.items()}
        values.setdefault("source", where)
        table[base] = replace(current, **values)


def _variable_overrides() -> Any:
    """The Prefect Variable's value, or None outside a reachable Prefect API."""
    try:
        from prefect.variables import Variable

        return Variable.get(PRICES_VARIABLE, default=None)
    except Exception as exc:  # no server, no context: the variable is an optional layer
        log.debug("Prefect Variable %s not read: %s", PRICES_VARIABLE, exc)
        return None


def load_prices(
    prices_file: str | None = None, use_variable: bool = False
) -> dict[str, ModelPrice]:
    """The built-in table, then the prices file, then the Prefect Variable (last one wins)."""
    table = dict(PRICES)
    if prices_file:
        path = Path(prices_file)
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            msg = f"BEDROCK_BATCH_PRICES_FILE={prices_file!r} could not be read as JSON: {exc}."
            raise RunSettingsError(msg) from None
        _apply(table, document, f"prices file {prices_file}")
    if use_variable:
        value = _variable_overrides()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                msg = f"Prefect Variable {PRICES_VARIABLE!r} is not JSON."
                raise RunSettingsError(msg) from None
        if value:
            _apply(table, value, f"Prefect Variable {PRICES_VARIABLE}")
    return table


def price_for(model_id: str, use_variable: bool = False) -> ModelPrice | None:
    """The price of a model id as a caller writes it (profile prefix, ARN), with overrides."""
    from tasks.settings import get_settings

    table = load_prices(get_settings().cost.prices_file, use_variable)
    price = table.get(base_model_id(model_id))
    if price is None and catalog.find(model_id) is None:
        return None
    return price


def markdown_table() -> str:
    """The README's price table."""
    lines = [
        "| Model id | On demand in / out | Batch in / out | Source |",
        "| --- | --- | --- | --- |",
    ]

    def pair(a, b):
        return "unknown" if a is None else f"${a:g} / ${b:g}"

    names = {_PAGE_2025: "AWS page, 2025 transcription", _AWS_TOOLKIT: "AWS agent toolkit"}
    for p in PRICES.values():
        on_demand = pair(p.on_demand_input, p.on_demand_output)
        batch = pair(p.batch_input, p.batch_output)
        lines.append(f"| `{p.model_id}` | {on_demand} | {batch} | {names.get(p.source, '–')} |")
    return "\n".join(lines) + "\n"
