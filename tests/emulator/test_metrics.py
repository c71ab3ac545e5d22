"""AWS/Bedrock/Batch metrics put to moto's CloudWatch, read back with get_metric_data."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from emu_helpers import anthropic_body, create_job, poll, put_jsonl, records, unique, wait_for

# Model ids no other test uses, so these series are this test's alone.
STUCK_MODEL = "eu.anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA_MODEL = "apac.amazon.nova-micro-v1:0"


def _series(stack, model_id: str, metric: str, stat: str = "Maximum") -> list[float]:
    now = datetime.now(timezone.utc)
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
                    "Period": 60,
                    "Stat": stat,
                },
            }
        ],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=1),
    )
    return result["MetricDataResults"][0]["Values"]


def _wait_max(stack, model_id: str, metric: str, check) -> None:
    """Poll until the series' largest value passes `check`."""
    poll(lambda: check(max(_series(stack, model_id, metric), default=0.0)))


def test_metrics_show_a_stuck_job_as_pending_with_zero_throughput(stack):
    name = unique("metricsstuck")
    stack.configure(metrics_interval_seconds=0.2)
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.5)
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(200))
    arn = create_job(stack, name, uri, model_id=STUCK_MODEL)
    wait_for(stack, arn, {"InProgress"}, predicate=lambda j: j["processedRecordCount"] == 100)
    _wait_max(stack, STUCK_MODEL, "NumberOfRecordsPendingProcessing", lambda v: v == 100)
    _wait_max(stack, STUCK_MODEL, "NumberOfTokensPendingProcessing", lambda v: v > 0)
    # Once stuck, a put with zero tokens per minute arrives: the minimum drops to 0.
    poll(
        lambda: (
            0.0 in _series(stack, STUCK_MODEL, "NumberOfInputTokensProcessedPerMinute", "Minimum")
        )
    )
    _wait_max(stack, STUCK_MODEL, "NumberOfInputTokensProcessedPerMinute", lambda v: v > 0)
    stack.set_faults(stuck_job_names_containing=None)
    wait_for(stack, arn)


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
