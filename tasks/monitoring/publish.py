"""What one monitor run publishes: metric events, alert transitions and the UI artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.monitoring.alerts import (
    STALLED,
    AlertThresholds,
    Condition,
    Transition,
    evaluate_rules,
    load_alert_state,
    save_alert_state,
    stale_after,
    transition,
)
from tasks.monitoring.cloudwatch import METRIC_NAMES, ModelSeries
from tasks.monitoring.events import emit_alert, emit_metrics
from tasks.monitoring.jobs import IN_PROGRESS, WAITING_STATUSES, JobCounts, live_job_counts

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
    job_counts: JobCounts = live_job_counts,
) -> tuple[list[Transition], list[str], int | None]:
    """Evaluate every rule for one model, emit start/resolved events, and store the new state.

    Args:
        model_id: The Bedrock model id.
        series: The model's metric series.
        thresholds: Rule thresholds.
        now: Evaluation time.
        prefix: Prefix of the state Variables.
        period_seconds: Period of the data points (a series silent for two is stale).
        stat: The CloudWatch statistic the points were read with.
        job_counts: The model's jobs per status, asked only while the metrics say stalled.

    Returns:
        The transitions emitted in this run, the rules firing after it, and the number of jobs
        waiting to start when the model is queued rather than stalled (else None).
    """
    emitted: list[Transition] = []
    firing: list[str] = []
    queued: int | None = None
    reading = {"statistic": stat, "period_seconds": period_seconds}
    for condition in evaluate_rules(series, thresholds, now, period_seconds):
        if condition.rule == STALLED and condition.active:
            queued = _tell_queued_from_stalled(model_id, condition, job_counts)
        previous = load_alert_state.fn(prefix, model_id, condition.rule)
        change, state = transition(model_id, condition, previous, now, reading)
        if change is not None:
            emit_alert(model_id, change.rule, change.resolved, change.payload)
            emitted.append(change)
        if state != previous:
            save_alert_state.fn(prefix, model_id, condition.rule, state)
        if state is not None:
            firing.append(condition.rule)
    return emitted, firing, queued


def _tell_queued_from_stalled(
    model_id: str, condition: Condition, job_counts: JobCounts
) -> int | None:
    """A model whose jobs all wait to start is queued, not stalled: the alert does not fire.

    The alert's payload says how many of the model's jobs are in progress and how many wait
    (`null` when the jobs could not be listed, and the metrics alone decide). Returns the
    number waiting when queued, else None.
    """
    counts = job_counts(model_id)
    running = counts[IN_PROGRESS] if counts is not None else None
    waiting = sum(counts[s] for s in WAITING_STATUSES) if counts is not None else None
    condition.detail.update(jobs_in_progress=running, jobs_waiting=waiting)
    if running == 0 and waiting:
        condition.active = False
        condition.since = None
        get_run_logger().info(
            "%s has had records pending and no input tokens for %s minutes, but none of its "
            "jobs has started: %d wait to start (Submitted, Validating or Scheduled). Queued, "
            "not stalled; no alert",
            model_id,
            condition.value,
            waiting,
        )
        return waiting
    return None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


@task
def publish_artifacts(
    series_by_model: dict[str, ModelSeries],
    latest_by_model: dict[str, dict[str, float | None]],
    firing: dict[str, list[str]],
    window: dict[str, Any],
    queued: dict[str, int] | None = None,
) -> None:
    """A table of the latest values per model and a markdown chart of sparklines."""
    queued = queued or {}

    def alerts(model_id: str) -> str:
        shown = list(firing.get(model_id, []))
        if model_id in queued:
            shown.append(f"none: queued, {queued[model_id]} job(s) waiting to start")
        return ", ".join(shown) or "none"

    rows = [
        {
            "model_id": model_id,
            **{key: _fmt(value) for key, value in latest.items()},
            "alerts": alerts(model_id),
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
