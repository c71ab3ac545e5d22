"""Publisher of the AWS/Bedrock/Batch CloudWatch metrics, per ModelId, while jobs run."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .catalog import ANTHROPIC
from .state import publisher_client

NAMESPACE = "AWS/Bedrock/Batch"
DIMENSION = "ModelId"
RECORDS_PENDING = "NumberOfRecordsPendingProcessing"
TOKENS_PENDING = "NumberOfTokensPendingProcessing"
INPUT_TOKENS_PER_MINUTE = "NumberOfInputTokensProcessedPerMinute"
OUTPUT_TOKENS_PER_MINUTE = "NumberOfOutputTokensProcessedPerMinute"

log = logging.getLogger("emulator.metrics")


def period_start(moment: datetime, period_seconds: int) -> datetime:
    """`moment` truncated to its period (to the minute for Bedrock's 60-second datapoints)."""
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % period_seconds, tz=timezone.utc)


@dataclass
class _Period:
    """One model's open period: tokens processed in it and the values already put for it."""

    start: datetime
    active: bool = True
    tokens_in: int = 0
    tokens_out: int = 0
    pending: int = 0
    tokens_pending: int = 0
    put: dict[str, float] = field(default_factory=dict)


class MetricsPublisher:
    """Puts one datapoint per model, metric and period (a minute, as Bedrock does).

    Bedrock's batch metrics are one datapoint per minute per ModelId; the per-minute token
    metrics count the tokens processed in that minute (AWS ML blog "Monitor Amazon Bedrock
    batch inference using Amazon CloudWatch metrics", 2025-09-18). The loop still runs every
    `metrics_interval_seconds` so tests need not wait a minute: each put carries the period's
    Timestamp (truncated to the period) and StatisticValues that update the period's single
    sample to the latest value (the first put has SampleCount 1, later ones SampleCount 0 and
    the change in Sum). Any read with Period = the period sees SampleCount 1 and Sum =
    Average = the latest value; Minimum and Maximum span the values the period showed while
    open. A model gets one period of zeros after its last job ends, then its series stops.
    A stuck job shows pending > 0 with zero tokens per minute.
    """

    def __init__(self, state, endpoint_url: str | None, region: str):
        self.state = state
        self.cloudwatch = publisher_client("cloudwatch", endpoint_url, region)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._periods: dict[str, _Period] = {}
        self._families: dict[str, str] = {}

    def start(self) -> None:
        """Run in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="bedrock-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current put."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.state.config.metrics_interval_seconds):
            try:
                self.publish_once()
            except Exception:  # noqa: BLE001 - metrics must never take the emulator down
                log.exception("publishing metrics failed")

    def _observe(self) -> dict[str, dict]:
        """Token deltas since the last tick and current backlog, per model with live jobs."""
        per_model: dict[str, dict] = {}
        for job in self.state.all_jobs():
            seen_in, seen_out = self._seen.get(job.job_id, (0, 0))
            tokens_in, tokens_out = job.input_tokens, job.output_tokens
            self._seen[job.job_id] = (tokens_in, tokens_out)
            moved = tokens_in != seen_in or tokens_out != seen_out
            if job.status.final and not moved:
                continue
            self._families[job.model_id] = job.spec.family
            entry = per_model.setdefault(
                job.model_id, {"pending": 0, "tokens_pending": 0, "in": 0, "out": 0}
            )
            entry["in"] += tokens_in - seen_in
            entry["out"] += tokens_out - seen_out
            pending = job.pending_records
            entry["pending"] += pending
            per_record = (tokens_in + tokens_out) / job.processed if job.processed else 100.0
            entry["tokens_pending"] += int(pending * per_record)
        return per_model

    def snapshot(self, now: datetime | None = None) -> dict[str, tuple[_Period, dict[str, float]]]:
        """Per model: its open period and the values that describe it now."""
        seconds = self.state.config.metrics_period_seconds
        start = period_start(now or datetime.now(timezone.utc), seconds)
        observed = self._observe()
        values = {}
        for model_id in set(observed) | set(self._periods):
            period = self._periods.get(model_id)
            entry = observed.get(model_id)
            if entry is not None:
                if period is None or period.start != start:
                    period = self._periods[model_id] = _Period(start)
                period.active = True
                period.tokens_in += entry["in"]
                period.tokens_out += entry["out"]
                period.pending, period.tokens_pending = entry["pending"], entry["tokens_pending"]
            elif period.start == start:
                period.pending = period.tokens_pending = 0
            elif period.active:
                # One period of zeros after a model's last job, then the series stops.
                period = self._periods[model_id] = _Period(start, active=False)
            else:
                del self._periods[model_id]
                continue
            per_minute = 60.0 / seconds
            metrics = {
                RECORDS_PENDING: float(period.pending),
                INPUT_TOKENS_PER_MINUTE: period.tokens_in * per_minute,
                OUTPUT_TOKENS_PER_MINUTE: period.tokens_out * per_minute,
            }
            if self._families.get(model_id) == ANTHROPIC:
                metrics[TOKENS_PENDING] = float(period.tokens_pending)
            values[model_id] = (period, metrics)
        return values

    def publish_once(self, now: datetime | None = None) -> None:
        """Bring every open period's datapoints up to date."""
        for model_id, (period, metrics) in self.snapshot(now).items():
            data = []
            for name, value in metrics.items():
                before = period.put.get(name)
                if before == value:
                    continue
                data.append(
                    {
                        "MetricName": name,
                        "Dimensions": [{"Name": DIMENSION, "Value": model_id}],
                        "Timestamp": period.start,
                        "StatisticValues": {
                            "SampleCount": 1.0 if before is None else 0.0,
                            "Sum": value - (before or 0.0),
                            "Minimum": value,
                            "Maximum": value,
                        },
                        "Unit": "Count",
                    }
                )
            if data:
                self.cloudwatch.put_metric_data(Namespace=NAMESPACE, MetricData=data)
                period.put.update({d["MetricName"]: metrics[d["MetricName"]] for d in data})
