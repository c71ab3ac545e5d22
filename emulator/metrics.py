"""Publisher of the AWS/Bedrock/Batch CloudWatch metrics, per ModelId, while jobs run."""

from __future__ import annotations

import logging
import threading
import time

import boto3

from .catalog import ANTHROPIC

NAMESPACE = "AWS/Bedrock/Batch"
DIMENSION = "ModelId"
RECORDS_PENDING = "NumberOfRecordsPendingProcessing"
TOKENS_PENDING = "NumberOfTokensPendingProcessing"
INPUT_TOKENS_PER_MINUTE = "NumberOfInputTokensProcessedPerMinute"
OUTPUT_TOKENS_PER_MINUTE = "NumberOfOutputTokensProcessedPerMinute"

log = logging.getLogger("emulator.metrics")


class MetricsPublisher:
    """Every interval, puts pending records/tokens and tokens per minute for each active model.

    A model stays in the series one interval after its last job ends, so the series drops to
    zero instead of stopping. A stuck job shows pending > 0 with zero tokens per minute.
    """

    def __init__(self, state, endpoint_url: str | None, region: str):
        self.state = state
        self.cloudwatch = boto3.client(
            "cloudwatch",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._last_time = time.monotonic()
        self._recent: dict[str, bool] = {}
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

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Current values per model id, as they would be put."""
        now = time.monotonic()
        minutes = max(now - self._last_time, 1e-6) / 60.0
        self._last_time = now
        per_model: dict[str, dict] = {}
        for job in self.state.all_jobs():
            seen_in, seen_out = self._seen.get(job.job_id, (0, 0))
            tokens_in, tokens_out = job.input_tokens, job.output_tokens
            self._seen[job.job_id] = (tokens_in, tokens_out)
            moved = tokens_in != seen_in or tokens_out != seen_out
            if job.status.final and not moved:
                continue
            entry = per_model.setdefault(
                job.model_id,
                {"pending": 0, "tokens_pending": 0, "in": 0, "out": 0, "spec": job.spec},
            )
            entry["in"] += tokens_in - seen_in
            entry["out"] += tokens_out - seen_out
            pending = job.pending_records
            entry["pending"] += pending
            per_record = (tokens_in + tokens_out) / job.processed if job.processed else 100.0
            entry["tokens_pending"] += int(pending * per_record)
        values: dict[str, dict[str, float]] = {}
        for model_id in set(per_model) | set(self._recent):
            entry = per_model.get(model_id)
            if entry is None:
                # One interval of zeros after a model's last job, then the series stops.
                self._recent.pop(model_id)
                spec_family = self._families[model_id]
                entry = {"pending": 0, "tokens_pending": 0, "in": 0, "out": 0}
            else:
                self._recent[model_id] = True
                spec_family = self._families[model_id] = entry["spec"].family
            metrics = {
                RECORDS_PENDING: float(entry["pending"]),
                INPUT_TOKENS_PER_MINUTE: entry["in"] / minutes,
                OUTPUT_TOKENS_PER_MINUTE: entry["out"] / minutes,
            }
            if spec_family == ANTHROPIC:
                metrics[TOKENS_PENDING] = float(entry["tokens_pending"])
            values[model_id] = metrics
        return values

    def publish_once(self) -> None:
        """Put one datapoint per metric and active model."""
        for model_id, metrics in self.snapshot().items():
            self.cloudwatch.put_metric_data(
                Namespace=NAMESPACE,
                MetricData=[
                    {
                        "MetricName": name,
                        "Dimensions": [{"Name": DIMENSION, "Value": model_id}],
                        "Value": value,
                        "Unit": "Count",
                    }
                    for name, value in metrics.items()
                ],
            )
