"""AWS-native alarms for batch models: CloudWatch alarms, their SNS topic and a dashboard."""

from __future__ import annotations

import json
import re
from typing import Any

from botocore.exceptions import ClientError

from tasks.aws.clients import client, error_code
from tasks.bedrock import catalog
from tasks.errors import UnknownModelError
from tasks.monitoring.cloudwatch import (
    DIMENSION,
    INPUT_TOKENS_PER_MINUTE,
    METRIC_NAMES,
    NAMESPACE,
    OUTPUT_TOKENS_PER_MINUTE,
    PENDING_RECORDS,
    PENDING_TOKENS,
)

PREFIX = "bedrock-batch"
TOPIC_NAME = f"{PREFIX}-alarms"
DASHBOARD_NAME = f"{PREFIX}-models"

# The seed's example: average input tokens per minute above 1,000,000 over 6 hours.
TOKENS_THRESHOLD = 1_000_000.0
TOKENS_PERIOD_SECONDS = 6 * 3600
# Stalled: pending > 0 and no input tokens in every 5-minute period for 30 minutes.
STALL_PERIOD_SECONDS = 300
STALL_PERIODS = 6

_NOT_FOUND = {"ResourceNotFound", "ResourceNotFoundException", "DashboardNotFoundError"}


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id)


def alarm_names(model_id: str) -> dict[str, str]:
    """The alarm names created for one model."""
    return {
        "input-tokens-high": f"{PREFIX}-{_slug(model_id)}-input-tokens-high",
        "stalled": f"{PREFIX}-{_slug(model_id)}-stalled",
    }


def _metric(key: str, model_id: str) -> dict[str, Any]:
    return {
        "Namespace": NAMESPACE,
        "MetricName": METRIC_NAMES[key],
        "Dimensions": [{"Name": DIMENSION, "Value": model_id}],
    }


def tokens_alarm(model_id: str, topic_arn: str, threshold: float = TOKENS_THRESHOLD) -> dict:
    """PutMetricAlarm arguments: average input tokens/min above `threshold` over 6 hours."""
    return {
        "AlarmName": alarm_names(model_id)["input-tokens-high"],
        "AlarmDescription": f"{model_id}: average input tokens/min over 6 h above {threshold:,.0f}",
        "ActionsEnabled": True,
        "AlarmActions": [topic_arn],
        "OKActions": [topic_arn],
        **_metric(INPUT_TOKENS_PER_MINUTE, model_id),
        "Statistic": "Average",
        "Period": TOKENS_PERIOD_SECONDS,
        "EvaluationPeriods": 1,
        "Threshold": threshold,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",
    }


def stall_alarm(model_id: str, topic_arn: str) -> dict:
    """PutMetricAlarm arguments: metric math `pending > 0 AND tokens == 0` for 30 minutes."""
    return {
        "AlarmName": alarm_names(model_id)["stalled"],
        "AlarmDescription": f"{model_id}: records pending and no input tokens processed for 30 min",
        "ActionsEnabled": True,
        "AlarmActions": [topic_arn],
        "OKActions": [topic_arn],
        "Metrics": [
            {
                "Id": "pending",
                "MetricStat": {
                    "Metric": _metric(PENDING_RECORDS, model_id),
                    "Period": STALL_PERIOD_SECONDS,
                    "Stat": "Maximum",
                },
                "ReturnData": False,
            },
            {
                "Id": "tokens",
                "MetricStat": {
                    "Metric": _metric(INPUT_TOKENS_PER_MINUTE, model_id),
                    "Period": STALL_PERIOD_SECONDS,
                    "Stat": "Maximum",
                },
                "ReturnData": False,
            },
            {
                "Id": "stalled",
                "Expression": "IF(pending > 0 AND FILL(tokens, 0) == 0, 1, 0)",
                "Label": "Stalled (1 = pending records and no input tokens)",
                "ReturnData": True,
            },
        ],
        "EvaluationPeriods": STALL_PERIODS,
        "DatapointsToAlarm": STALL_PERIODS,
        "Threshold": 0.5,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",
    }


def dashboard_body(model_ids: list[str], region: str | None) -> dict:
    """A CloudWatch dashboard: one graph per batch metric, one line per model."""
    widgets = []
    for i, key in enumerate(
        (PENDING_RECORDS, PENDING_TOKENS, INPUT_TOKENS_PER_MINUTE, OUTPUT_TOKENS_PER_MINUTE)
    ):
        properties: dict[str, Any] = {
            "title": METRIC_NAMES[key],
            "view": "timeSeries",
            "stat": "Average",
            "period": 300,
            "metrics": [[NAMESPACE, METRIC_NAMES[key], DIMENSION, m] for m in model_ids],
        }
        if region:
            properties["region"] = region
        widgets.append(
            {
                "type": "metric",
                "x": (i % 2) * 12,
                "y": (i // 2) * 6,
                "width": 12,
                "height": 6,
                "properties": properties,
            }
        )
    return {"widgets": widgets}


def alarmed_models(cloudwatch) -> list[str]:
    """Every model id the project's alarms watch now, read back from CloudWatch."""
    models: set[str] = set()
    paginator = cloudwatch.get_paginator("describe_alarms")
    for page in paginator.paginate(AlarmNamePrefix=f"{PREFIX}-"):
        for alarm in page.get("MetricAlarms", []):
            dimensions = list(alarm.get("Dimensions") or [])
            for query in alarm.get("Metrics") or []:
                dimensions += query.get("MetricStat", {}).get("Metric", {}).get("Dimensions", [])
            models.update(d["Value"] for d in dimensions if d.get("Name") == DIMENSION)
    return sorted(models)


def _put_dashboard(cloudwatch, model_ids: list[str]) -> None:
    body = dashboard_body(model_ids, cloudwatch.meta.region_name)
    cloudwatch.put_dashboard(DashboardName=DASHBOARD_NAME, DashboardBody=json.dumps(body))


def check_model_ids(model_ids: list[str], command: str = "cloudwatch setup") -> None:
    """Refuse, in one line, the ids the batch model catalog does not know, with close matches.

    CloudWatch takes an alarm on any dimension value, and one whose ModelId Bedrock never
    publishes stays quiet for ever: a typo would leave the user believing the model watched.
    """
    unknown = [m for m in model_ids if catalog.find(m) is None]
    if not unknown:
        return
    problems = []
    for model_id in unknown:
        near = catalog.closest_ids(model_id, n=3)
        hint = f"closest: {', '.join(near)}" if near else "no close match"
        problems.append(f"model id {model_id!r} is not in the batch model catalog ({hint})")
    msg = (
        f"{command}: {'; '.join(problems)}. Bedrock publishes no ModelId metric for such an "
        "id, so it is never seen: fix the id, or pass --allow-unknown-model for a "
        "model the catalog does not know yet (`python -m tasks.bedrock.catalog --markdown` "
        "lists the known ones)."
    )
    raise UnknownModelError(msg)


def setup(
    model_ids: list[str],
    sns_email: str | None = None,
    threshold: float = TOKENS_THRESHOLD,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """Create the SNS topic, both alarms per model and the dashboard; safe to run again.

    Args:
        model_ids: Bedrock model ids to alarm on.
        sns_email: Subscribe this address to the topic (AWS sends a confirmation mail).
        threshold: Input tokens per minute for the throughput alarm.
        allow_unknown: Alarm on ids the batch model catalog does not know (else refused
            before anything is created).

    Returns:
        The topic ARN, the alarm names and the dashboard name.
    """
    if not model_ids:
        msg = "cloudwatch setup needs at least one model id (--model-id MODEL_ID)"
        raise ValueError(msg)
    if not allow_unknown:
        check_model_ids(model_ids)
    sns = client("sns")
    cloudwatch = client("cloudwatch")
    topic_arn = sns.create_topic(Name=TOPIC_NAME)["TopicArn"]
    if sns_email:
        sns.subscribe(TopicArn=topic_arn, Protocol="email", Endpoint=sns_email)
    alarms: list[str] = []
    for model_id in model_ids:
        for arguments in (
            tokens_alarm(model_id, topic_arn, threshold),
            stall_alarm(model_id, topic_arn),
        ):
            cloudwatch.put_metric_alarm(**arguments)
            alarms.append(arguments["AlarmName"])
    # The dashboard shows every model alarmed on, not only the ones named this time.
    dashboard_models = sorted(set(alarmed_models(cloudwatch)) | set(model_ids))
    _put_dashboard(cloudwatch, dashboard_models)
    return {
        "topic_arn": topic_arn,
        "alarms": alarms,
        "dashboard": DASHBOARD_NAME,
        "dashboard_models": dashboard_models,
    }


def teardown(model_ids: list[str]) -> dict[str, Any]:
    """Delete the models' alarms; the dashboard and topic go once no project alarm is left.

    Args:
        model_ids: Bedrock model ids whose alarms to delete.

    Returns:
        What was deleted.
    """
    cloudwatch = client("cloudwatch")
    names = [name for m in model_ids for name in alarm_names(m).values()]
    if names:
        cloudwatch.delete_alarms(AlarmNames=names)
    remaining = cloudwatch.describe_alarms(AlarmNamePrefix=f"{PREFIX}-").get("MetricAlarms", [])
    deleted: dict[str, Any] = {"alarms": names, "dashboard": None, "topic_arn": None}
    if not remaining:
        try:
            cloudwatch.delete_dashboards(DashboardNames=[DASHBOARD_NAME])
            deleted["dashboard"] = DASHBOARD_NAME
        except ClientError as exc:
            if error_code(exc) not in _NOT_FOUND:
                raise
        sns = client("sns")
        for topic in sns.list_topics().get("Topics", []):
            if topic["TopicArn"].rsplit(":", 1)[-1] == TOPIC_NAME:
                sns.delete_topic(TopicArn=topic["TopicArn"])
                deleted["topic_arn"] = topic["TopicArn"]
    else:
        # The dashboard keeps showing the models still alarmed on, and only those.
        kept = sorted({a["AlarmName"] for a in remaining})
        deleted["remaining_alarms"] = kept
        _put_dashboard(cloudwatch, alarmed_models(cloudwatch))
    return deleted
