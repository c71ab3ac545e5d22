"""What one monitor run publishes: metric events, alert transitions and the UI artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.monitoring.alerts import (
    AlertThresholds,
    Transition,
    evaluate_rules,
    load_alert_state,
    save_alert_state,
    stale_after,
    transition,
)
from tasks.monitoring.cloudwatch import METRIC_NAMES, ModelSeries
from tasks.monitoring.events import emit_alert, emit_metrics

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """Unicode block sparkline of a series (empty string for no data)."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    last = len(SPARK_BLOCKS) - 1
    if span == 0:
        return SPARK_BLOCKS[last if high > 0 else 0] * len(values)
    return "".join(SPARK_BLOCKS[round((v - low) / span * last)] for v in values)


def latest_values(
    series: ModelSeries, now: datetime | None = None, period_seconds: int = 60
) -> dict[str, float | None]:
    """The last value of each metric; None when it has no data point in the window.

    Bedrock publishes a model's batch metrics while it has jobs pending and stops when none
    is left, so a last point older than `stale_after` is stale: nothing is pending or flowing
    now, and the latest value is 0 rather than whatever the last job left behind.
    """
    fresh_after = now - stale_after(period_seconds) if now else None
    latest: dict[str, float | None] = {}
    for key, points in series.items():
        if not points:
            latest[key] = None
        elif fresh_after is not None and points[-1][0] < fresh_after:
            latest[key] = 0.0
        else:
            latest[key] = points[-1][1]
    return latest


@task
def publish_model_metrics(
    model_id: str, series: ModelSeries, window: dict[str, Any]
) -> dict[str, float | None]:
    """Emit `bedrock.batch.metrics` for one model with its latest values and the window.

    Args:
        model_id: The Bedrock model id.
        series: The model's metric series.
        window: Start, end and period of the reading.

    Returns:
        The latest value of each metric.
    """
    now = datetime.fromisoformat(window["end"])
    latest = latest_values(series, now, window["period_seconds"])
    emit_metrics(model_id, latest, window)
    return latest


@task
def check_alerts(
    model_id: str,
    series: ModelSeries,
    thresholds: AlertThresholds,
    now: datetime,
    prefix: str,
    period_seconds: int = 60,
    stat: str = "Average",
) -> tuple[list[Transition], list[str]]:
    """Evaluate every rule for one model, emit start/resolved events, and store the new state.

    Args:
        model_id: The Bedrock model id.
        series: The model's metric series.
        thresholds: Rule thresholds.
        now: Evaluation time.
        prefix: Prefix of the state Variables.
        period_seconds: Period of the data points (a series silent for two is stale).
        stat: The CloudWatch statistic the points were read with.

    Returns:
        The transitions emitted in this run, and the rules firing after it.
    """
    emitted: list[Transition] = []
    firing: list[str] = []
    reading = {"statistic": stat, "period_seconds": period_seconds}
    for condition in evaluate_rules(series, thresholds, now, period_seconds):
        previous = load_alert_state.fn(prefix, model_id, condition.rule)
        change, state = transition(model_id, condition, previous, now, reading)
        if change is not None:
            emit_alert(model_id, change.rule, change.resolved, change.payload)
            emitted.append(change)
        if state != previous:
            save_alert_state.fn(prefix, model_id, condition.rule, state)
        if state is not None:
            firing.append(condition.rule)
    return emitted, firing


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


@task
def publish_artifacts(
    series_by_model: dict[str, ModelSeries],
    latest_by_model: dict[str, dict[str, float | None]],
    firing: dict[str, list[str]],
    window: dict[str, Any],
) -> None:
    """A table of the latest values per model and a markdown chart of sparklines."""
    rows = [
        {
            "model_id": model_id,
            **{key: _fmt(value) for key, value in latest.items()},
            "alerts": ", ".join(firing.get(model_id, [])) or "none",
        }
        for model_id, latest in latest_by_model.items()
    ]
    create_table_artifact(
        key="bedrock-batch-monitor-latest",
        table=rows,
        description=f"Latest AWS/Bedrock/Batch values per model at {window['end']}",
    )
    lines = [
        f"# Bedrock batch metrics, {window['start']} → {window['end']}",
        f"Period {window['period_seconds']} s; one block per data point, scaled per row.",
        "",
        "| model | metric | trend | min | max | latest |",
        "|---|---|---|---:|---:|---:|",
    ]
    for model_id, series in series_by_model.items():
        for key, metric_name in METRIC_NAMES.items():
            values = [value for _, value in series.get(key, [])]
            lines.append(
                f"| `{model_id}` | {metric_name} | `{sparkline(values) or 'no data'}` | "
                f"{_fmt(min(values) if values else None)} | "
                f"{_fmt(max(values) if values else None)} | "
                f"{_fmt(values[-1] if values else None)} |"
            )
    create_markdown_artifact(
        key="bedrock-batch-monitor-chart",
        markdown="\n".join(lines),
        description="Sparklines of the AWS/Bedrock/Batch series per model",
    )
