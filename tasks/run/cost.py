"""A run's cost: the pre-flight estimate and its ceiling, the guard while running, the actuals."""

from __future__ import annotations

import json
import threading
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.aws import storage
from tasks.aws.clients import polars_storage_options
from tasks.bedrock.prices import ModelPrice, ceil_usd, format_usd, price_for
from tasks.errors import CostCeilingError
from tasks.pipeline import columns as C
from tasks.pipeline import tokens
from tasks.pipeline.attempts import SUPERSEDED
from tasks.pipeline.estimate import CostEstimate, estimate_from_dir
from tasks.pipeline.plan import RunPlan
from tasks.pipeline.tokens import JobTokens, job_tokens_of
from tasks.settings import get_settings

if TYPE_CHECKING:
    from tasks.run.layout import RunLayout
    from tasks.run.params import BatchParams
    from tasks.run.state import RunState

ESTIMATE_FILE = "estimate.json"
COST_CEILING_REACHED = "CostCeilingReached"
HELD_BACK_USD = "held_back_usd"  # the most the rows a ceiling held back may cost to send
# The price an estimate of a run under a batch job's minimum is at (`_price_basis`).
ON_DEMAND_BASIS = "the on-demand price"
# Where a run's max_cost_usd came from, when a pipeline runs it as a stage under what its own
# ceiling leaves (flows.pipeline). A refusal then says so and leaves the figure to raise to
# the pipeline's refusal: the run's own figure is not the one the user sets.
CEILING_SOURCE: ContextVar[str | None] = ContextVar("ceiling_source", default=None)


def save_estimate(plan: RunPlan, out_dir: Path, layout: RunLayout, kms_key_id: str | None) -> None:
    """Estimate from the freshly written shards (CountTokens on their sample) into the run dir."""
    client = None
    reason = "BEDROCK_BATCH_COST_COUNT_TOKENS is off"
    if get_settings().cost.count_tokens:
        from tasks.aws.clients import client as aws_client

        client = aws_client("bedrock-runtime")
    estimate = estimate_from_dir(plan, out_dir, client, use_variable=True, offline_reason=reason)
    data = json.dumps(estimate.to_dict(), indent=1).encode()
    storage.write_bytes(layout.run_file(ESTIMATE_FILE), data, kms_key_id)


def load_estimate(plan: RunPlan, layout: RunLayout) -> CostEstimate:
    """The estimate the run saved, or an offline one from the plan (a plan of an older run)."""
    uri = layout.run_file(ESTIMATE_FILE)
    if storage.exists(uri):
        return CostEstimate.from_dict(json.loads(storage.read_bytes(uri)))
    return estimate_from_dir(plan, None, use_variable=True, offline_reason="no saved estimate")


@task(cache_policy=NO_CACHE)
def preflight_cost(
    params: BatchParams, plan: RunPlan, layout: RunLayout, jobs_created: int = 0
) -> CostEstimate:
    """Show the estimate as an artifact, and refuse the run when it may pass max_cost_usd.

    Args:
        params: the run's parameters (``max_cost_usd``).
        plan: its shards.
        layout: where the run keeps its estimate.
        jobs_created: the jobs a resumed run created before (`RunState.jobs_created`): they
            go on whatever the ceiling, so a refusal says nothing more was submitted.

    Returns:
        The estimate, for the guard that keeps the run under the ceiling.
    """
    logger = get_run_logger()
    estimate = load_estimate(plan, layout)
    basis = _price_basis(estimate)
    rows = [
        {
            "shard": s.shard,
            "records": s.records,
            "input_tokens": s.input_tokens,
            "output_tokens_expected": s.output_expected,
            "output_tokens_max": s.output_max,
            "cost_low_usd": s.cost_low,
            "cost_high_usd": s.cost_high,
        }
        for s in estimate.shards
    ]
    create_table_artifact(
        rows,
        key=f"bedrock-batch-{_safe(layout.run_name)}-estimate"[:100].strip("-"),
        description=f"Cost estimate ({basis}): {estimate.method}",
    )
    logger.info(
        "Estimate: %s input tokens (%s), output up to %s tokens, cost %s – %s at %s",
        f"{estimate.input_tokens:,}",
        estimate.method,
        f"{estimate.output_max:,}",
        format_usd(estimate.cost_low),
        format_usd(estimate.cost_high),
        basis,
    )
    for s in estimate.shards:
        if s.on_demand:
            logger.warning(
                "%s records are fewer than a batch job's minimum (%s, "
                "BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB): served on demand through "
                "bedrock-runtime at the full price, not the batch discount (on_demand=False "
                "refuses such a run instead)",
                f"{s.records:,}",
                f"{plan.quotas.get('min_records_per_job', '?'):,}",
            )
    ceiling = params.max_cost_usd
    if ceiling is not None:
        high = estimate.cost_high
        facts = {"on_demand": basis == ON_DEMAND_BASIS, "jobs_created": jobs_created}
        sent = (
            f"nothing more was submitted (the {jobs_created} jobs it created before go on, "
            "kept for its next run)"
            if jobs_created
            else "nothing was submitted"
        )
        if high is None:
            msg = (
                f"max_cost_usd={ceiling} is set but {basis} of {params.model_id} is "
                f"unknown, so the run cannot be kept under it; {sent}. Set the price in "
                "BEDROCK_BATCH_PRICES_FILE or the Prefect Variable bedrock-batch-prices."
            )
            raise CostCeilingError(msg, **facts)
        if high > ceiling:
            max_tokens = plan.options.get("max_tokens")
            low = format_usd(estimate.cost_low)
            source = CEILING_SOURCE.get()
            over = f"the {format_usd(ceiling)} {source}" if source else f"max_cost_usd={ceiling}"
            advice = (
                "The pipeline's refusal names the max_cost_usd it needs."
                if source
                else f"Raise max_cost_usd to at least {ceil_usd(high)}, lower max_tokens "
                f"(now {max_tokens}) or send fewer records."
            )
            msg = (
                f"The estimated cost of run {layout.run_name} is {low} – {format_usd(high)} at "
                f"{basis} ({estimate.input_tokens:,} input tokens, up to "
                f"{estimate.output_max:,} output tokens), over {over}; {sent}. {advice}"
            )
            raise CostCeilingError(msg, upper_bound_usd=high, **facts)
    return estimate


def _price_basis(estimate: CostEstimate) -> str:
    """Which price the estimate is at: a run under a job's minimum is served on demand."""
    if estimate.shards and all(s.on_demand for s in estimate.shards):
        return ON_DEMAND_BASIS
    return "the batch price"


class CostGuard:
    """Keeps a running run under ``max_cost_usd``: actual cost plus what is in flight.

    A new job or on-demand tail is admitted only if the cost already known (shards merged)
    plus the upper-bound estimate of everything admitted and not yet merged, plus its own
    upper bound, stays under the ceiling. Thread-safe: shards run in threads.
    """

    def __init__(self, ceiling: float, estimate: CostEstimate, price: ModelPrice | None):
        self.ceiling = ceiling
        self.estimate = estimate
        self.price = price
        self._lock = threading.Lock()
        self._reserved: dict[str, float] = {}
        self._actual: dict[str, float] = {}
        # What `resume` reserved for an attempt that may not have started (shard, attempt):
        # its `admit`, if it comes, decides again instead of reserving it twice.
        self._resumed: dict[tuple[str, int], float] = {}
        self.held: dict[str, int] = {}

    def upper_bound(self, shard: str, records: int, on_demand: bool) -> float:
        """The most ``records`` of ``shard`` may cost (on demand at its full price)."""
        s = self.estimate.shard(shard)
        per_record = s.per_record_high() if s else None
        if per_record is None:
            return float("inf")
        cost = per_record * records
        if on_demand and not s.on_demand and self.price is not None:
            batch_in, batch_out = self.price.per_million("batch")
            od_in, od_out = self.price.per_million("on_demand")
            if None in (batch_in, od_in):
                return float("inf")
            cost *= max(od_in / batch_in, (od_out or 0) / (batch_out or 1))
        return cost

    def admit(self, shard: str, records: int, on_demand: bool, attempt: int = 0) -> bool:
        """Reserve the attempt's upper bound, or refuse it (and count the records held back)."""
        cost = self.upper_bound(shard, records, on_demand)
        with self._lock:
            own = self._resumed.pop((shard, attempt), 0.0)
            spent = sum(self._actual.values()) + sum(self._reserved.values()) - own
            if spent + cost > self.ceiling:
                self._reserved[shard] = self._reserved.get(shard, 0.0) - own
                self.held[shard] = self.held.get(shard, 0) + records
                return False
            self._reserved[shard] = self._reserved.get(shard, 0.0) + cost - own
            return True

    def resume(self, state: RunState) -> None:
        """Count what a resumed run spent before its crash; a new guard knew none of it.

        Merged shards at their actual cost; the attempts of shards not merged yet at their
        upper bound until they merge: batch jobs created (in flight, or ended before the
        crash), a job that may have been created just before it (its slot held, no ARN saved)
        and on-demand tails (answers may be kept). Without this, the retries of a resumed run
        were admitted as if nothing had been spent. Those that may not have started are
        decided again by their `admit`, and so are held attempts whose shard's merge was
        forgotten (a higher ceiling sends them): reserved from the start, the retries of the
        held rows sent first cannot take the share of those whose shard has not started (more
        shards than task threads), which the named figure (`ceiling_to_send_held`) counted.
        Attempts a forgotten merge priced (`paid_usd`: held rows sent now, a lost part) count
        at that price: their upper bounds asked a ceiling far over what was spent to send the
        held rows.
        """
        for name, shard in state.shards.items():
            if shard.part_uri:
                superseded = (shard.merge_stats or {}).get(SUPERSEDED)
                job_tokens = job_tokens_of(shard.merge_stats)
                actual = shard_actual(shard.part_uri, self.price, superseded, job_tokens)
                self.settle(name, actual)
                continue
            paid = shard.paid_attempts if shard.paid_usd is not None else 0
            if paid:
                with self._lock:
                    self._reserved[name] = self._reserved.get(name, 0.0) + shard.paid_usd
            for attempt in shard.attempts[paid:]:
                on_demand = attempt.served_by == C.SERVED_ON_DEMAND
                created = attempt.job_arn is not None and not on_demand
                # Held, its shard not merged: sent again now if its admit fits.
                held = attempt.status == COST_CEILING_REACHED
                maybe = (
                    held or on_demand or (attempt.job_arn is None and attempt.lease_id is not None)
                )
                if not (created or maybe):
                    continue
                cost = self.upper_bound(name, attempt.records, on_demand)
                with self._lock:
                    self._reserved[name] = self._reserved.get(name, 0.0) + cost
                    if maybe:
                        self._resumed[(name, attempt.attempt)] = cost

    def settle(self, shard: str, actual: float | None) -> None:
        """The shard merged: its reservations become what it actually cost."""
        with self._lock:
            reserved = self._reserved.pop(shard, 0.0)
            for key in [k for k in self._resumed if k[0] == shard]:
                del self._resumed[key]
            self._actual[shard] = reserved if actual is None else actual

    @property
    def spent(self) -> float:
        with self._lock:
            return sum(self._actual.values())


def token_usage(
    parts: list[str],
    superseded: dict[str, list[dict[str, Any]]] | None = None,
    part_rows: pl.DataFrame | None = None,
    job_tokens: JobTokens | None = None,
) -> pl.DataFrame:
    """Tokens and rows of the output parts, by part, job and how they were served.

    Read from the parts, or from ``part_rows``: the one part's rows, still in memory at its
    merge. Resolved by `resolve_usage` (``superseded`` by part URI, ``job_tokens``).
    """
    if not parts:
        return pl.DataFrame()
    if part_rows is not None:
        frame = part_rows.lazy().with_columns(pl.lit(parts[0]).alias(tokens.PART))
    else:
        options = polars_storage_options() if storage.is_s3(parts[0]) else None
        frame = pl.scan_parquet(
            parts, storage_options=options, missing_columns="insert", include_file_paths=tokens.PART
        )
    usage = tokens.tally(frame, tokens.BY_PART).collect()
    return resolve_usage(usage, parts, superseded, job_tokens)


def resolve_usage(
    usage: pl.DataFrame,
    parts: list[str],
    superseded: dict[str, list[dict[str, Any]]] | None = None,
    job_tokens: JobTokens | None = None,
) -> pl.DataFrame:
    """A `tokens.tally` table of ``parts`` (by `tokens.BY_PART`) as the run pays for it.

    ``superseded`` (by part URI, matched to ``parts`` by file name) adds the tokens of paid
    answers a later attempt replaced (`Settled.superseded`) to ``superseded_rows``. Answered
    rows without a token count (Cohere Embed and Mistral report none) cost their job's
    manifest's (``job_tokens``, `tokens.with_manifests`), else unknown, not $0.
    """
    by_name = {Path(p).name: p for p in parts}
    replaced = [
        {**s, tokens.PART: by_name[Path(part).name]}
        for part, entries in (superseded or {}).items()
        if Path(part).name in by_name
        for s in entries
    ]
    usage = tokens.with_replaced(usage, replaced, tokens.BY_PART)
    usage = usage.sort(tokens.PART, C.SERVED_BY, C.JOB_ID, nulls_last=True)
    return tokens.with_manifests(usage, job_tokens)


def _price_rows(usage: pl.DataFrame, price: ModelPrice | None) -> list[dict[str, Any]]:
    rows = []
    for r in usage.iter_rows(named=True):
        served = r[C.SERVED_BY]
        mode = "on_demand" if served == C.SERVED_ON_DEMAND else "batch"
        cost = None
        if served in (C.SERVED_BATCH, C.SERVED_ON_DEMAND) and r[tokens.UNCOUNTED]:
            cost = None
        elif served in (C.SERVED_BATCH, C.SERVED_ON_DEMAND) and price is not None:
            cost = price.cost(r[C.INPUT_TOKENS], r[C.OUTPUT_TOKENS], mode)
        elif served not in (C.SERVED_BATCH, C.SERVED_ON_DEMAND):
            cost = 0.0
        rows.append({**r, "cost_usd": cost})
    return rows


def price_usage(usage: pl.DataFrame, price: ModelPrice | None) -> dict[str, Any]:
    """What a resolved usage table (`resolve_usage`) cost, per job, per part and in all.

    Rows a batch job served are priced at the batch price, the on-demand tail at the full
    on-demand price, each apart; skipped rows cost nothing. The run's end prices the table
    its exactly-once check collected, a shard's merge the one of its rows in memory.
    """
    by_part: dict[str, dict[str, Any]] = {}
    totals = {"batch_usd": 0.0, "on_demand_usd": 0.0, "on_demand_rows": 0, "batch_rows": 0}
    jobs = []
    for r in _price_rows(usage, price):
        part = by_part.setdefault(r[tokens.PART], {"batch_usd": 0.0, "on_demand_usd": 0.0})
        key = "on_demand" if r[C.SERVED_BY] == C.SERVED_ON_DEMAND else "batch"
        if r[C.SERVED_BY] in (C.SERVED_BATCH, C.SERVED_ON_DEMAND):
            totals[f"{key}_rows"] += r[tokens.ROWS]
            jobs.append(
                {
                    "job_id": r[C.JOB_ID],
                    "served_by": r[C.SERVED_BY],
                    "rows": r[tokens.ROWS],
                    "superseded_rows": r[tokens.SUPERSEDED_ROWS],
                    "input_tokens": r[C.INPUT_TOKENS],
                    "output_tokens": r[C.OUTPUT_TOKENS],
                    "cost_usd": r["cost_usd"],
                }
            )
        for target in (part, totals):
            if target[f"{key}_usd"] is not None:
                target[f"{key}_usd"] = (
                    None if r["cost_usd"] is None else target[f"{key}_usd"] + r["cost_usd"]
                )
    batch, on_demand = totals["batch_usd"], totals["on_demand_usd"]
    totals["total_usd"] = None if None in (batch, on_demand) else batch + on_demand
    return {"jobs": jobs, "parts": by_part, **totals}


def actual_cost(
    parts: list[str],
    price: ModelPrice | None,
    superseded: dict[str, list[dict[str, Any]]] | None = None,
    part_rows: pl.DataFrame | None = None,
    job_tokens: JobTokens | None = None,
) -> dict[str, Any]:
    """What the output parts cost (`price_usage`), read from them (see `token_usage`)."""
    return price_usage(token_usage(parts, superseded, part_rows, job_tokens), price)


def shard_actual(
    part_uri: str,
    price: ModelPrice | None,
    superseded: list[dict[str, Any]] | None = None,
    job_tokens: JobTokens | None = None,
) -> float | None:
    """What one merged shard cost, read from its part (a resumed guard), None when unknown."""
    total = actual_cost([part_uri], price, {part_uri: superseded or []}, job_tokens=job_tokens)
    return total["total_usd"]


def run_price(model_id: str) -> ModelPrice | None:
    """The run's price, with the file and Prefect Variable overrides."""
    return price_for(model_id, use_variable=True)


def batch_cost_of(model_id: str):
    """The live table's cost of a merged shard's tokens at the batch price (None: unknown)."""
    price = run_price(model_id)
    if price is None:
        return None

    def cost_of(input_tokens: int, output_tokens: int) -> float | None:
        return price.cost(input_tokens, output_tokens, "batch")

    return cost_of


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def cost_guard(
    params: BatchParams, estimate: CostEstimate, state: RunState | None = None
) -> CostGuard | None:
    """The run's guard when it has a ceiling, counting what ``state`` says was spent."""
    if params.max_cost_usd is None:
        return None
    guard = CostGuard(params.max_cost_usd, estimate, run_price(params.model_id))
    if state is not None:
        guard.resume(state)
    return guard


def run_usage(usage: pl.DataFrame, parts: list[str], results: list[Any]) -> pl.DataFrame:
    """The usage table the exactly-once check collected (`check_output`), resolved with what
    the shards' merges recorded: the answers a repair replaced and the jobs' manifests."""
    superseded = {r.part_uri: r.stats.get(SUPERSEDED) or [] for r in results}
    job_tokens = {job: pair for r in results for job, pair in job_tokens_of(r.stats).items()}
    return resolve_usage(usage, parts, superseded, job_tokens)


def cost_summary(ctx: Any, results: list[Any], usage: pl.DataFrame) -> dict[str, Any]:
    """The run's cost for summary.json and the event: actual (batch, on demand), held back.

    ``usage``: the run's resolved usage table (`run_usage`).
    """
    price = run_price(ctx.model_id)
    actual = price_usage(usage, price)
    guard = ctx.cost_guard
    held = {r.shard: r.held_back for r in results if r.held_back}
    bounds = [r.held_back_usd for r in results if r.held_back]
    held_usd = None if None in bounds else sum(bounds)
    return {
        "currency": "USD",
        "batch_usd": actual["batch_usd"],
        "on_demand_usd": actual["on_demand_usd"],
        "total_usd": actual["total_usd"],
        "batch_rows": actual["batch_rows"],
        "on_demand_rows": actual["on_demand_rows"],
        "max_cost_usd": guard.ceiling if guard else None,
        "held_back_rows": sum(held.values()),
        "held_back_shards": sorted(held),
        HELD_BACK_USD: held_usd,
        "price": {k: getattr(price, k) for k in ("source", "read")} if price else None,
        "jobs": actual["jobs"],
        "parts": {Path(k).name: v for k, v in actual["parts"].items()},
    }


def cost_markdown(cost: dict[str, Any]) -> str:
    """One line of the run's markdown artifact."""
    on_demand = format_usd(cost["on_demand_usd"])
    line = (
        f"- Cost: {format_usd(cost['batch_usd'])} batch ({cost['batch_rows']:,} rows) + "
        f"{on_demand} on demand at the full price ({cost['on_demand_rows']:,} rows) = "
        f"{format_usd(cost['total_usd'])}"
    )
    if cost["held_back_rows"]:
        line += (
            f"; max_cost_usd={cost['max_cost_usd']} held back {cost['held_back_rows']:,} rows of "
            f"{len(cost['held_back_shards'])} shards (error code {COST_CEILING_REACHED})"
        )
        needed = ceiling_to_send_held(cost)
        if needed is not None and CEILING_SOURCE.get() is None:  # a stage's: the pipeline's
            line += f": the same run with max_cost_usd={needed} sends them"
    return line


def ceiling_to_send_held(cost: dict[str, Any], spent_before: float = 0.0) -> str | None:
    """The least max_cost_usd a re-run needs to send what the ceiling held back.

    The re-run's guard counts what the run cost (its shards priced by their merges, see
    `CostGuard.resume`) plus the upper bound of each held attempt, and only a ceiling over
    the one that held them sends them (`lifecycle._send_what_was_held`). ``spent_before``:
    what a pipeline's stages before this one cost. None when a price or a bound is unknown.
    """
    held, total, old = cost.get(HELD_BACK_USD), cost.get("total_usd"), cost.get("max_cost_usd")
    if held is None or total is None or old is None:
        return None
    needed = spent_before + total + held
    above = spent_before + old
    if needed > above:
        return ceil_usd(needed)
    figure = ceil_usd(above)
    if float(figure) <= above:  # the old ceiling itself: one unit of the figure's last digit
        unit = 10 ** -len(figure.partition(".")[2])
        figure = ceil_usd(float(figure) + unit)
    return figure
