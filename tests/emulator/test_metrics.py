"""AWS/Bedrock/Batch metrics put to moto's CloudWatch, read back with get_metric_data."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from emu_helpers import (
    anthropic_body,
    create_job,
    poll,
    put_jsonl,
    read_output,
    records,
    unique,
    wait_for,
)

# Model ids no other test uses, so these series are this test's alone.
STUCK_MODEL = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA_MODEL = "us.amazon.nova-micro-v1:0"
MINUTE_MODEL = "global.anthropic.claude-3-haiku-20240307-v1:0"


def _series(stack, model_id: str, metric: str, stat: str = "Maximum") -> list[float]:
    return _points(stack, model_id, metric, stat)[1]


def _points(stack, model_id, metric, stat="Maximum", period=60) -> tuple[list, list[float]]:
    # Start on a minute so each 60 s bucket is one minute, as CloudWatch aligns them on AWS.
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    result = stack.client("cloudwatch").get_metric_data(
        MetricDataQueries=[
            {
                "Id": "m",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "AWS/Bedrock/Batch",
                        "MetricName": metric,
                        "Dimensions": [{"Name": "ModelId", "Value": model_id}],
                    },
                    "Period": period,
                    "Stat": stat,
                },
            }
        ],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=2),
        ScanBy="TimestampAscending",
    )
    return result["MetricDataResults"][0]["Timestamps"], result["MetricDataResults"][0]["Values"]


def _wait_max(stack, model_id: str, metric: str, check) -> None:
    """Poll until the series' largest value passes `check`."""
    poll(lambda: check(max(_series(stack, model_id, metric), default=0.0)))


def test_metrics_show_a_stuck_job_as_pending_with_zero_throughput(stack):
    name = unique("metricsstuck")
    # One-second periods: the minute-scale stall shows within seconds.
    stack.configure(metrics_interval_seconds=0.2, metrics_period_seconds=1)
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.5)
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(200))
    arn = create_job(stack, name, uri, model_id=STUCK_MODEL)
    wait_for(stack, arn, {"InProgress"}, predicate=lambda j: j["processedRecordCount"] == 100)
    _wait_max(stack, STUCK_MODEL, "NumberOfTokensPendingProcessing", lambda v: v > 0)
    _wait_max(stack, STUCK_MODEL, "NumberOfInputTokensProcessedPerMinute", lambda v: v > 0)

    def stalled_period():
        pending = _points(stack, STUCK_MODEL, "NumberOfRecordsPendingProcessing", "Average", 1)
        tokens = _points(stack, STUCK_MODEL, "NumberOfInputTokensProcessedPerMinute", "Average", 1)
        by_time = dict(zip(*tokens, strict=True))
        return any(p == 100 and by_time.get(t) == 0.0 for t, p in zip(*pending, strict=True))

    poll(stalled_period)
    stack.set_faults(stuck_job_names_containing=None)
    wait_for(stack, arn)


def test_metrics_put_one_datapoint_per_minute_aligned_to_the_minute(stack):
    name = unique("metricsminute")
    stack.configure(metrics_interval_seconds=0.2)
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=anthropic_body))
    arn = create_job(stack, name, uri, model_id=MINUTE_MODEL)
    wait_for(stack, arn)
    manifest = json.loads(read_output(stack, arn, f"out/{name}/")["manifest.json.out"])
    metric = "NumberOfInputTokensProcessedPerMinute"
    # The minute's datapoint is the tokens processed in it: the sum over minutes is the job's.
    poll(lambda: sum(_series(stack, MINUTE_MODEL, metric, "Sum")) == manifest["inputTokenCount"])
    # However often the loop put, each minute holds one sample...
    assert set(_series(stack, MINUTE_MODEL, metric, "SampleCount")) == {1.0}
    assert _series(stack, MINUTE_MODEL, metric, "Average") == _series(
        stack, MINUTE_MODEL, metric, "Sum"
    )
    # ...stamped on the minute: one-second buckets find data only at second 0.
    times, _ = _points(stack, MINUTE_MODEL, metric, "SampleCount", period=1)
    assert times and {t.second for t in times} == {0}


def test_metrics_publish_tokens_per_minute_for_each_model(stack):
    name = unique("metricsnova")
    stack.configure(metrics_interval_seconds=0.2)
    body = lambda i: {"messages": [{"role": "user", "content": [{"text": f"q{i}"}]}]}  # noqa: E731
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=body))
    wait_for(stack, create_job(stack, name, uri, model_id=NOVA_MODEL))
    # The first put may come while the job is still validating (zeros): wait for tokens.
    _wait_max(stack, NOVA_MODEL, "NumberOfOutputTokensProcessedPerMinute", lambda v: v > 0)
    _wait_max(stack, NOVA_MODEL, "NumberOfInputTokensProcessedPerMinute", lambda v: v > 0)
    # Token backlog is an Anthropic-only metric.
    assert _series(stack, NOVA_MODEL, "NumberOfTokensPendingProcessing") == []


def test_metrics_list_metrics_has_the_model_dimension(stack):
    name = unique("metricslist")
    stack.configure(metrics_interval_seconds=0.2)
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=anthropic_body))
    wait_for(stack, create_job(stack, name, uri))
    cloudwatch = stack.client("cloudwatch")

    def listed():
        metrics = cloudwatch.list_metrics(Namespace="AWS/Bedrock/Batch")["Metrics"]
        return {m["MetricName"] for m in metrics if m["Dimensions"][0]["Name"] == "ModelId"}

    names = poll(lambda: listed() >= {"NumberOfRecordsPendingProcessing"} and listed())
    assert "NumberOfInputTokensProcessedPerMinute" in names
