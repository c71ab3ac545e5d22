"""Reading the AWS/Bedrock/Batch CloudWatch metrics: model discovery and batched GetMetricData."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task

from tasks.aws.clients import client, retry_on_error_codes
from tasks.bedrock.error_codes import RETRYABLE_CLOUDWATCH

NAMESPACE = "AWS/Bedrock/Batch"
DIMENSION = "ModelId"

# Short keys used everywhere in the monitor, and the CloudWatch metric each one reads.
PENDING_RECORDS = "pending_records"
INPUT_TOKENS_PER_MINUTE = "input_tokens_per_minute"
OUTPUT_TOKENS_PER_MINUTE = "output_tokens_per_minute"
PENDING_TOKENS = "pending_tokens"
METRIC_NAMES: dict[str, str] = {
    PENDING_RECORDS: "NumberOfRecordsPendingProcessing",
    INPUT_TOKENS_PER_MINUTE: "NumberOfInputTokensProcessedPerMinute",
    OUTPUT_TOKENS_PER_MINUTE: "NumberOfOutputTokensProcessedPerMinute",
    PENDING_TOKENS: "NumberOfTokensPendingProcessing",
}

# GetMetricData takes at most 500 queries per call.
MAX_QUERIES_PER_CALL = 500


Series = list[tuple[datetime, float]]
ModelSeries = dict[str, Series]


# Retry only when CloudWatch throttled us; other errors are not going to heal on their own.
_throttled = retry_on_error_codes(RETRYABLE_CLOUDWATCH)


def build_queries(
    model_ids: list[str], period_seconds: int, stat: str = "Average"
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """MetricDataQueries for every metric of every model, and a map from query id to the pair.

    Args:
        model_ids: Bedrock model ids (the `ModelId` dimension).
        period_seconds: Aggregation period of each returned data point.
        stat: CloudWatch statistic of each data point.

    Returns:
        The queries, and `{query_id: (model_id, metric_key)}` to read the answer back.
    """
    queries: list[dict[str, Any]] = []
    index: dict[str, tuple[str, str]] = {}
    for i, model_id in enumerate(model_ids):
        for j, (key, metric_name) in enumerate(METRIC_NAMES.items()):
            query_id = f"m{i}_{j}"
            index[query_id] = (model_id, key)
            queries.append(
                {
                    "Id": query_id,
                    "Label": f"{model_id} {metric_name}",
                    "ReturnData": True,
                    "MetricStat": {
                        "Metric": {
                            "Namespace": NAMESPACE,
                            "MetricName": metric_name,
                            "Dimensions": [{"Name": DIMENSION, "Value": model_id}],
                        },
                        "Period": period_seconds,
                        "Stat": stat,
                    },
                }
            )
    return queries, index


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_throttled)
def list_batch_model_ids() -> list[str]:
    """Every ModelId that has published metrics in AWS/Bedrock/Batch (ListMetrics).

    Returns:
        Sorted unique model ids.
    """
    found: set[str] = set()
    paginator = client("cloudwatch").get_paginator("list_metrics")
    for page in paginator.paginate(Namespace=NAMESPACE):
        for metric in page.get("Metrics", []):
            for dimension in metric.get("Dimensions", []):
                if dimension["Name"] == DIMENSION:
                    found.add(dimension["Value"])
    return sorted(found)


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_throttled)
def get_batch_metrics(
    model_ids: list[str],
    start: datetime,
    end: datetime,
    period_seconds: int,
    stat: str = "Average",
) -> dict[str, ModelSeries]:
    """All four batch metrics of every model, with as few GetMetricData calls as the limit allows.

    Args:
        model_ids: Bedrock model ids to read.
        start: Start of the window (inclusive).
        end: End of the window (exclusive).
        period_seconds: Aggregation period (1, 5, 10, 30 or a multiple of 60 on AWS).
        stat: CloudWatch statistic of each data point.

    Returns:
        `{model_id: {metric_key: [(timestamp, value), ...]}}`, oldest first; a metric with
        no data has an empty list.
    """
    queries, index = build_queries(model_ids, period_seconds, stat)
    result: dict[str, ModelSeries] = {m: {k: [] for k in METRIC_NAMES} for m in model_ids}
    cloudwatch = client("cloudwatch")
    for batch in _batches(queries, MAX_QUERIES_PER_CALL):
        kwargs: dict[str, Any] = {
            "MetricDataQueries": batch,
            "StartTime": start,
            "EndTime": end,
            "ScanBy": "TimestampAscending",
        }
        while True:
            response = cloudwatch.get_metric_data(**kwargs)
            for item in response.get("MetricDataResults", []):
                model_id, key = index[item["Id"]]
                result[model_id][key].extend(zip(item["Timestamps"], item["Values"], strict=True))
            token = response.get("NextToken")
            if not token:
                break
            kwargs["NextToken"] = token
    for series in result.values():
        for key, points in series.items():
            series[key] = sorted(points, key=lambda point: point[0])
    return result
