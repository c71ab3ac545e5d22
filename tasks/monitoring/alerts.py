"""Alert rules over the batch metrics, and the state that makes each condition alert once."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prefect import task
from prefect.variables import Variable
from pydantic import BaseModel, ConfigDict, Field

from tasks.monitoring.cloudwatch import (
    INPUT_TOKENS_PER_MINUTE,
    METRIC_NAMES,
    OUTPUT_TOKENS_PER_MINUTE,
    PENDING_RECORDS,
    ModelSeries,
    Series,
)

STALLED = "stalled"
THROUGHPUT_HIGH_INPUT = "throughput-high-input"
THROUGHPUT_HIGH_OUTPUT = "throughput-high-output"
BACKLOG_GROWING = "backlog-growing"
RULES = (STALLED, THROUGHPUT_HIGH_INPUT, THROUGHPUT_HIGH_OUTPUT, BACKLOG_GROWING)

STATE_TAG = "bedrock-batch-monitor"

# The unit `value` and `threshold` share in each rule's events: one number against another
# of the same kind, so an automation or a reader can compare them without knowing the rule.
MINUTES = "minutes"
TOKENS_PER_MINUTE = "tokens/minute"
FRACTION = "fraction"


class AlertThresholds(BaseModel):
    """Thresholds of the alert rules; every one is a monitor deployment parameter."""

    model_config = ConfigDict(extra="forbid")

    stall_minutes: float = Field(
        30.0,
        gt=0,
        description="Stalled: records pending > 0 and no input tokens processed for this long.",
    )
    input_tokens_per_minute: float = Field(
        1_000_000.0,
        ge=0,
        description="Throughput alert when average input tokens/min over the window exceeds this.",
    )
    output_tokens_per_minute: float = Field(
        1_000_000.0,
        ge=0,
        description="Throughput alert when average output tokens/min over the window exceeds this.",
    )
    throughput_window_minutes: float = Field(
        360.0, gt=0, description="Window the tokens-per-minute averages are taken over (6 h)."
    )
    backlog_window_minutes: float = Field(
        60.0, gt=0, description="Window over which pending records must keep rising."
    )
    backlog_growth_fraction: float = Field(
        0.1,
        ge=0,
        description="Backlog alert when pending records grew by more than this fraction "
        "(0.1 = 10%) from the first to the last point of the window.",
    )
    backlog_min_points: int = Field(
        3, ge=2, description="Fewest data points in the window before backlog growth is judged."
    )
    disabled_rules: list[str] = Field(
        default_factory=list, description=f"Rules not to evaluate, from {list(RULES)}."
    )


@dataclass
class Condition:
    """The outcome of one rule for one model at one evaluation time."""

    rule: str
    active: bool
    value: float | None = None
    threshold: float | None = None
    since: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    unit: str = ""
    metrics: list[str] = field(default_factory=list)
    window_minutes: float | None = None


@dataclass
class Transition:
    """A condition that started (`resolved=False`) or ended (`resolved=True`) in this run."""

    model_id: str
    rule: str
    resolved: bool
    payload: dict[str, Any]


def _window(points: Series, start: datetime, end: datetime) -> Series:
    return [(ts, value) for ts, value in points if start <= ts <= end]


def stale_after(period_seconds: int) -> timedelta:
    """How long a model's series may be silent before its last value no longer holds.

    Bedrock publishes a model's batch metrics each minute while jobs are pending and stops when
    none is left; CloudWatch may show a point a few minutes late, so silence counts only after
    five periods and at least five minutes.
    """
    return timedelta(seconds=max(5 * period_seconds, 300))


def evaluate_stalled(
    series: ModelSeries, now: datetime, stall_minutes: float, period_seconds: int = 60
) -> Condition:
    """Records pending > 0 and input tokens/min = 0 at every point for at least `stall_minutes`.

    Walks back from the latest point while pending stays above zero and no input tokens were
    processed; the condition holds once that stretch is at least `stall_minutes` long. A missing
    token point counts as zero (Bedrock stops publishing throughput when nothing is processed).
    """
    pending = {ts: value for ts, value in series.get(PENDING_RECORDS, []) if ts <= now}
    tokens = {ts: value for ts, value in series.get(INPUT_TOKENS_PER_MINUTE, []) if ts <= now}

    def condition(
        active: bool, minutes: float | None, pending_now: float | None, since=None
    ) -> Condition:
        # value and threshold are both minutes; the records pending ride in the detail.
        detail = {} if pending_now is None else {"pending_records": pending_now}
        if minutes is not None:
            detail["stalled_minutes"] = minutes
        return Condition(
            STALLED,
            active,
            minutes,
            stall_minutes,
            since,
            detail,
            MINUTES,
            [METRIC_NAMES[PENDING_RECORDS], METRIC_NAMES[INPUT_TOKENS_PER_MINUTE]],
            stall_minutes,
        )

    if not pending:
        return condition(False, None, None)
    latest_ts = max(pending)
    latest = pending[latest_ts]
    if latest_ts < now - stale_after(period_seconds):
        # Bedrock stopped publishing: no job of the model is pending any more.
        return condition(False, 0.0, 0.0)
    since: datetime | None = None
    for ts in sorted(set(pending) | set(tokens), reverse=True):
        if ts in pending and pending[ts] <= 0:
            break
        if tokens.get(ts, 0.0) > 0:
            break
        since = ts
    if latest <= 0 or since is None:
        return condition(False, 0.0, latest)
    stalled_minutes = round((now - since).total_seconds() / 60.0, 2)
    active = stalled_minutes >= stall_minutes
    return condition(active, stalled_minutes, latest, since if active else None)


def evaluate_throughput(
    rule: str, points: Series, now: datetime, window_minutes: float, threshold: float
) -> Condition:
    """Average tokens/min over the last `window_minutes` above `threshold`."""
    metric = METRIC_NAMES[
        INPUT_TOKENS_PER_MINUTE if rule == THROUGHPUT_HIGH_INPUT else OUTPUT_TOKENS_PER_MINUTE
    ]
    inside = _window(points, now - timedelta(minutes=window_minutes), now)
    if not inside:
        return Condition(
            rule, False, None, threshold, None, {}, TOKENS_PER_MINUTE, [metric], window_minutes
        )
    average = sum(value for _, value in inside) / len(inside)
    return Condition(
        rule,
        average > threshold,
        average,
        threshold,
        inside[0][0] if average > threshold else None,
        {"average_tokens_per_minute": average, "points": len(inside)},
        TOKENS_PER_MINUTE,
        [metric],
        window_minutes,
    )


def evaluate_backlog(
    points: Series,
    now: datetime,
    window_minutes: float,
    growth_fraction: float,
    min_points: int,
    period_seconds: int = 60,
) -> Condition:
    """Pending records rose from the first to the last point of the window by > the fraction.

    Judged only over a backlog that spans the whole window: records pending at its start and
    at every point since, the latest point still fresh. A run that starts inside the window
    fills its backlog as its jobs are submitted; that is the run starting, not a backlog
    outgrowing the model, and it is judged once the window holds nothing but its backlog.
    """
    shape = (FRACTION, [METRIC_NAMES[PENDING_RECORDS]], window_minutes)
    start = now - timedelta(minutes=window_minutes)
    inside = _window(points, start, now)
    not_judged = Condition(BACKLOG_GROWING, False, None, growth_fraction, None, {}, *shape)
    if len(inside) < min_points or inside[-1][0] < now - stale_after(period_seconds):
        return not_judged
    # Bedrock publishes while a model has records pending and stops when none is left: a
    # window that starts late, or has a zero or a silence in it, holds a backlog's beginning.
    slack = timedelta(seconds=2 * period_seconds)
    silent = stale_after(period_seconds)
    if inside[0][0] > start + slack or any(value <= 0 for _, value in inside):
        return not_judged
    if any(b[0] - a[0] > silent for a, b in zip(inside, inside[1:], strict=False)):
        return not_judged
    first, last = inside[0][1], inside[-1][1]
    growth = round((last - first) / first, 4)
    active = growth > growth_fraction
    return Condition(
        BACKLOG_GROWING,
        active,
        growth,
        growth_fraction,
        inside[0][0] if active else None,
        {
            "first_pending_records": first,
            "last_pending_records": last,
            "growth_fraction": growth,
        },
        *shape,
    )


def evaluate_rules(
    series: ModelSeries, thresholds: AlertThresholds, now: datetime, period_seconds: int = 60
) -> list[Condition]:
    """Every enabled rule for one model's series, evaluated at `now`."""
    conditions = [
        evaluate_stalled(series, now, thresholds.stall_minutes, period_seconds),
        evaluate_throughput(
            THROUGHPUT_HIGH_INPUT,
            series.get(INPUT_TOKENS_PER_MINUTE, []),
            now,
            thresholds.throughput_window_minutes,
            thresholds.input_tokens_per_minute,
        ),
        evaluate_throughput(
            THROUGHPUT_HIGH_OUTPUT,
            series.get(OUTPUT_TOKENS_PER_MINUTE, []),
            now,
            thresholds.throughput_window_minutes,
            thresholds.output_tokens_per_minute,
        ),
        evaluate_backlog(
            series.get(PENDING_RECORDS, []),
            now,
            thresholds.backlog_window_minutes,
            thresholds.backlog_growth_fraction,
            thresholds.backlog_min_points,
            period_seconds,
        ),
    ]
    return [c for c in conditions if c.rule not in thresholds.disabled_rules]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def transition(
    model_id: str,
    condition: Condition,
    previous: dict[str, Any] | None,
    now: datetime,
    reading: dict[str, Any] | None = None,
) -> tuple[Transition | None, dict[str, Any] | None]:
    """Compare a condition with its stored state: the event to emit (if any) and the new state.

    Args:
        model_id: The model the condition is about.
        condition: This run's outcome of the rule.
        previous: The stored state of the rule for the model; None when it was not firing.
        now: The evaluation time.
        reading: How the series were read (CloudWatch statistic and period): a value means
            little without them, so every event carries them.

    Returns:
        A start transition when the condition began, a resolved one when it ended, None while
        it stays the same; and the state to store (None once resolved).
    """
    payload = {
        "value": condition.value,
        "threshold": condition.threshold,
        "unit": condition.unit,
        "metrics": condition.metrics,
        "window_minutes": condition.window_minutes,
        **(reading or {}),
        "evaluated_at": now.isoformat(),
        **condition.detail,
    }
    if condition.active and previous is None:
        started_at = _iso(condition.since) or now.isoformat()
        state = {"firing": True, "started_at": started_at, "alerted_at": now.isoformat()}
        return Transition(
            model_id, condition.rule, False, {**payload, "started_at": started_at}
        ), state
    if condition.active:
        return None, previous
    if previous is not None:
        started_at = previous.get("started_at")
        resolved = {**payload, "started_at": started_at, "resolved_at": now.isoformat()}
        return Transition(model_id, condition.rule, True, resolved), None
    return None, None


def state_variable_name(prefix: str, model_id: str, rule: str) -> str:
    """A Prefect Variable name for one model+rule (Variable names allow [a-z0-9_-] only)."""
    slug = re.sub(r"[^a-z0-9_-]+", "_", model_id.lower()).strip("_")[:120]
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:8]
    return f"{prefix}__{rule.replace('-', '_')}__{slug}_{digest}"


@task
def load_alert_state(prefix: str, model_id: str, rule: str) -> dict[str, Any] | None:
    """The stored state of one rule for one model; None when the condition is not firing."""
    value = Variable.get(state_variable_name(prefix, model_id, rule), default=None)
    return value if isinstance(value, dict) else None


@task
def save_alert_state(prefix: str, model_id: str, rule: str, state: dict[str, Any] | None) -> None:
    """Store the rule's state for the model; a resolved condition removes its Variable."""
    name = state_variable_name(prefix, model_id, rule)
    if state is None:
        Variable.unset(name)
    else:
        Variable.set(
            name, {**state, "model_id": model_id, "rule": rule}, tags=[STATE_TAG], overwrite=True
        )
