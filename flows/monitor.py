"""The monitor sidecar: AWS/Bedrock/Batch CloudWatch metrics become Prefect events and alerts."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from tasks.monitoring.alerts import (
    AlertThresholds,
    Transition,
    evaluate_rules,
    load_alert_state,
    save_alert_state,
    transition,
)
from tasks.monitoring.cloudwatch import (
    METRIC_NAMES,
    ModelSeries,
    get_batch_metrics,
    list_batch_model_ids,
)
from tasks.monitoring.events import emit_alert, emit_metrics

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


class MonitorParameters(AlertThresholds):
    """Everything one monitor run needs; the alert thresholds are fields of the same model."""

    model_ids: list[str] = Field(
        default_factory=list,
        description="Model ids to watch; empty means every ModelId found in AWS/Bedrock/Batch.",
    )
    lookback_minutes: float = Field(
        60.0,
        gt=0,
        description="Window read and charted; widened to cover the longest rule window.",
    )
    period_seconds: int = Field(
        60, gt=0, description="CloudWatch period of each data point (1, 5, 10, 30 or n×60)."
    )
    stat: str = Field("Average", description="CloudWatch statistic of each data point.")
    now: datetime | None = Field(
        None, description="Evaluation time; leave empty for the current time (tests set it)."
    )
    state_prefix: str = Field(
        "bedrock-batch-alert",
        pattern=r"^[a-z0-9_-]+$",
        description="Prefix of the Prefect Variables holding which alerts are firing.",
    )


def _window_minutes(params: MonitorParameters) -> float:
    stall = params.stall_minutes + 2 * params.period_seconds / 60.0
    return max(
        params.lookback_minutes,
        stall,
        params.throughput_window_minutes,
        params.backlog_window_minutes,
    )


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


def latest_values(series: ModelSeries) -> dict[str, float | None]:
    """The last value of each metric, None when the metric has no data point."""
    return {key: (points[-1][1] if points else None) for key, points in series.items()}


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
    latest = latest_values(series)
    emit_metrics(model_id, latest, window)
    return latest


@task
def check_alerts(
    model_id: str, series: ModelSeries, thresholds: AlertThresholds, now: datetime, prefix: str
) -> tuple[list[Transition], list[str]]:
    """Evaluate every rule for one model, emit start/resolved events, and store the new state.

    Args:
        model_id: The Bedrock model id.
        series: The model's metric series.
        thresholds: Rule thresholds.
        now: Evaluation time.
        prefix: Prefix of the state Variables.

    Returns:
        The transitions emitted in this run, and the rules firing after it.
    """
    emitted: list[Transition] = []
    firing: list[str] = []
    for condition in evaluate_rules(series, thresholds, now):
        previous = load_alert_state.fn(prefix, model_id, condition.rule)
        change, state = transition(model_id, condition, previous, now)
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


@flow(name="bedrock_batch_monitor", log_prints=False)
def bedrock_batch_monitor(
    params: MonitorParameters | None = None,
) -> dict[str, Any]:
    """Read the batch metrics of every model, emit metric and alert events, keep artifacts.

    Args:
        params: Models, window, period, thresholds and the optional evaluation time.

    Returns:
        The models read, their latest values and the alert transitions of this run.
    """
    params = params or MonitorParameters()
    logger = get_run_logger()
    now = (params.now or datetime.now(timezone.utc)).astimezone(timezone.utc)

    # 1. Which models: the given ones or every one publishing batch metrics.
    model_ids = list(params.model_ids) or list_batch_model_ids()
    if not model_ids:
        logger.info("No model publishes AWS/Bedrock/Batch metrics yet; nothing to watch")
        return {"models": [], "latest": {}, "transitions": []}

    # 2. One GetMetricData reading (batched by the API limit) over the widest window needed.
    start = now - timedelta(minutes=_window_minutes(params))
    end = now + timedelta(seconds=1)
    series_by_model = get_batch_metrics(model_ids, start, end, params.period_seconds, params.stat)
    window = {
        "start": start.isoformat(),
        "end": now.isoformat(),
        "period_seconds": params.period_seconds,
    }

    # 3. A metrics event per model, then the alert rules against the stored state.
    latest_by_model: dict[str, dict[str, float | None]] = {}
    transitions: list[Transition] = []
    firing: dict[str, list[str]] = {}
    thresholds = AlertThresholds(**params.model_dump(include=set(AlertThresholds.model_fields)))
    for model_id in model_ids:
        series = series_by_model[model_id]
        latest_by_model[model_id] = publish_model_metrics(model_id, series, window)
        changes, firing[model_id] = check_alerts(
            model_id, series, thresholds, now, params.state_prefix
        )
        transitions.extend(changes)
        for change in changes:
            logger.warning(
                "%s %s for %s: %s",
                change.rule,
                "resolved" if change.resolved else "started",
                model_id,
                change.payload,
            )

    # 4. Something to look at in the UI.
    publish_artifacts(series_by_model, latest_by_model, firing, window)
    return {
        "models": model_ids,
        "latest": latest_by_model,
        "transitions": [asdict(t) for t in transitions],
    }
