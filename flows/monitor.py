"""The monitor sidecar: AWS/Bedrock/Batch CloudWatch metrics become Prefect events and alerts."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_run_logger
from pydantic import Field

from tasks.aws.clients import use_credentials_block
from tasks.monitoring.alerts import AlertThresholds, Transition
from tasks.monitoring.cloudwatch import get_batch_metrics, list_batch_model_ids
from tasks.monitoring.publish import check_alerts, publish_artifacts, publish_model_metrics


class MonitorParameters(AlertThresholds):
    """Everything one monitor run needs; the alert thresholds are fields of the same model."""

    aws_credentials_block: str | None = Field(
        None,
        description="Prefect AwsCredentials block to read CloudWatch with (empty: the default).",
    )
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


@flow(name="bedrock_batch_monitor", log_prints=False)
def bedrock_batch_monitor(
    params: MonitorParameters | None = None,
) -> dict[str, Any]:
    """Read the batch metrics of every model, emit metric and alert events, keep artifacts.

    Args:
        params: Models, window, period, thresholds and the optional evaluation time.

    Returns:
        The models read, their latest values, the alert transitions of this run, and the
        models whose records wait only on jobs not yet started (queued, not stalled).
    """
    params = params or MonitorParameters()
    use_credentials_block(params.aws_credentials_block)
    logger = get_run_logger()
    now = (params.now or datetime.now(timezone.utc)).astimezone(timezone.utc)

    # 1. Which models: the given ones or every one publishing batch metrics.
    model_ids = list(params.model_ids) or list_batch_model_ids()
    if not model_ids:
        logger.info("No model publishes AWS/Bedrock/Batch metrics yet; nothing to watch")
        return {"models": [], "latest": {}, "transitions": [], "queued": {}}

    # 2. One GetMetricData reading (batched by the API limit) over the widest window needed.
    start = now - timedelta(minutes=_window_minutes(params))
    end = now + timedelta(seconds=1)
    series_by_model = get_batch_metrics(model_ids, start, end, params.period_seconds, params.stat)
    window = {
        "start": start.isoformat(),
        "end": now.isoformat(),
        "period_seconds": params.period_seconds,
        "statistic": params.stat,
    }

    # 3. A metrics event per model, then the alert rules against the stored state.
    latest_by_model: dict[str, dict[str, float | None]] = {}
    transitions: list[Transition] = []
    firing: dict[str, list[str]] = {}
    queued: dict[str, int] = {}
    thresholds = AlertThresholds(**params.model_dump(include=set(AlertThresholds.model_fields)))
    for model_id in model_ids:
        series = series_by_model[model_id]
        latest_by_model[model_id] = publish_model_metrics(model_id, series, window)
        changes, firing[model_id], waiting = check_alerts(
            model_id,
            series,
            thresholds,
            now,
            params.state_prefix,
            params.period_seconds,
            params.stat,
        )
        transitions.extend(changes)
        if waiting is not None:
            queued[model_id] = waiting
        for change in changes:
            logger.warning(
                "%s %s for %s: %s",
                change.rule,
                "resolved" if change.resolved else "started",
                model_id,
                change.payload,
            )

    # 4. Something to look at in the UI.
    publish_artifacts(series_by_model, latest_by_model, firing, window, queued)
    return {
        "models": model_ids,
        "latest": latest_by_model,
        "transitions": [asdict(t) for t in transitions],
        "queued": queued,
    }
