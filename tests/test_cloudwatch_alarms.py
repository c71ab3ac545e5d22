"""CloudWatch alarms, SNS topic and dashboard setup/teardown against moto."""

from __future__ import annotations

import json
import os

import pytest

from flows.cli import main
from tasks.aws.clients import client, reset_clients
from tasks.errors import UnknownModelError
from tasks.monitoring import alarms as cloudwatch_alarms
from tasks.settings import get_settings

# moto keeps state per process, account and region: one region per test keeps tests apart.
REGIONS = iter(
    [
        "eu-west-3",
        "eu-north-1",
        "ap-south-1",
        "sa-east-1",
        "ca-central-1",
        "ap-east-1",
        "eu-west-2",
        "eu-central-2",
        "ap-southeast-3",
        "me-south-1",
        "af-south-1",
        "il-central-1",
        "eu-south-2",
        "ap-northeast-3",
    ]
)
MODELS = ["anthropic.claude-3-haiku-20240307-v1:0", "amazon.nova-lite-v1:0"]


@pytest.fixture
def aws():
    """moto (CloudWatch and SNS) on a free port; the process env points boto3 at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(os.environ)
    url = f"http://{host}:{port}"
    os.environ.pop("BEDROCK_BATCH_REGION", None)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_CLOUDWATCH": url,
            "AWS_ENDPOINT_URL_SNS": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": next(REGIONS),
        }
    )
    get_settings.cache_clear()
    reset_clients()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        reset_clients()
        server.stop()


def test_setup_creates_topic_alarms_and_dashboard(aws):
    result = cloudwatch_alarms.setup(MODELS, sns_email="ops@example.com")
    alarms = client("cloudwatch").describe_alarms(AlarmNamePrefix="bedrock-batch-")["MetricAlarms"]
    by_name = {a["AlarmName"]: a for a in alarms}
    assert sorted(by_name) == sorted(result["alarms"])
    tokens = by_name[cloudwatch_alarms.alarm_names(MODELS[0])["input-tokens-high"]]
    assert tokens["Threshold"] == 1_000_000
    assert tokens["Period"] == 6 * 3600
    assert tokens["AlarmActions"] == [result["topic_arn"]]
    stalled = by_name[cloudwatch_alarms.alarm_names(MODELS[0])["stalled"]]
    expressions = [m.get("Expression") for m in stalled["Metrics"]]
    assert "IF(pending > 0 AND FILL(tokens, 0) == 0, 1, 0)" in expressions
    subs = client("sns").list_subscriptions_by_topic(TopicArn=result["topic_arn"])
    assert [s["Endpoint"] for s in subs["Subscriptions"]] == ["ops@example.com"]
    body = json.loads(
        client("cloudwatch").get_dashboard(DashboardName=result["dashboard"])["DashboardBody"]
    )
    assert len(body["widgets"]) == 4
    assert {row[3] for row in body["widgets"][0]["properties"]["metrics"]} == set(MODELS)


def test_setup_twice_keeps_one_alarm_each(aws):
    cloudwatch_alarms.setup(MODELS[:1])
    cloudwatch_alarms.setup(MODELS[:1])
    alarms = client("cloudwatch").describe_alarms(AlarmNamePrefix="bedrock-batch-")["MetricAlarms"]
    assert len(alarms) == 2


def test_setup_without_models_names_the_flag(aws):
    with pytest.raises(ValueError, match="--model-id"):
        cloudwatch_alarms.setup([])


def _nothing_created() -> bool:
    cw = client("cloudwatch")
    return (
        cw.describe_alarms(AlarmNamePrefix="bedrock-batch-")["MetricAlarms"] == []
        and cw.list_dashboards()["DashboardEntries"] == []
        and client("sns").list_topics()["Topics"] == []
    )


# ":0" left off: Bedrock never publishes this ModelId, so its alarms would watch nothing.
TYPO = "anthropic.claude-3-haiku-20240307-v1"


def test_setup_refuses_a_model_id_the_catalog_does_not_know(aws):
    with pytest.raises(UnknownModelError) as raised:
        cloudwatch_alarms.setup([MODELS[1], TYPO])

    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert f"{TYPO!r} is not in the batch model catalog" in message
    assert "closest: anthropic.claude-3-haiku-20240307-v1:0" in message
    assert "--allow-unknown-model" in message
    assert MODELS[1] not in message  # the known one is not named as a problem
    assert _nothing_created()


def test_setup_with_the_override_alarms_on_a_model_id_the_catalog_does_not_know(aws):
    result = cloudwatch_alarms.setup([TYPO], allow_unknown=True)
    assert result["alarms"] == list(cloudwatch_alarms.alarm_names(TYPO).values())
    assert result["dashboard_models"] == [TYPO]


def test_setup_takes_catalog_models_through_an_inference_profile_or_an_arn(aws):
    profile = "us.anthropic.claude-3-haiku-20240307-v1:0"
    arn = "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-lite-v1:0"
    result = cloudwatch_alarms.setup([profile, arn])
    assert result["dashboard_models"] == sorted([profile, arn])


def test_cloudwatch_setup_with_an_unknown_model_id_prints_one_line_and_creates_nothing(aws, capsys):
    assert main(["cloudwatch", "setup", "--model-id", TYPO]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: cloudwatch setup: model id {TYPO!r}")
    assert len(captured.err.splitlines()) == 1
    assert _nothing_created()


def test_cloudwatch_setup_with_allow_unknown_model_creates_its_alarms(aws, capsys):
    assert main(["cloudwatch", "setup", "--model-id", TYPO, "--allow-unknown-model"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["alarms"] == list(cloudwatch_alarms.alarm_names(TYPO).values())


def test_monitor_with_an_unknown_model_id_prints_one_line_and_reads_nothing(aws, capsys):
    # The monitor read no metric for a mistyped id, every run, and said nothing of it.
    assert main(["monitor", "--model-id", TYPO]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: monitor: model id {TYPO!r}")
    assert "--allow-unknown-model" in captured.err
    assert len(captured.err.splitlines()) == 1


def test_teardown_removes_alarms_then_dashboard_and_topic(aws):
    cloudwatch_alarms.setup(MODELS)
    partial = cloudwatch_alarms.teardown(MODELS[:1])
    assert partial["dashboard"] is None
    assert len(partial["remaining_alarms"]) == 2

    final = cloudwatch_alarms.teardown(MODELS[1:])
    cw = client("cloudwatch")
    assert cw.describe_alarms(AlarmNamePrefix="bedrock-batch-")["MetricAlarms"] == []
    assert final["dashboard"] == cloudwatch_alarms.DASHBOARD_NAME
    assert cw.list_dashboards()["DashboardEntries"] == []
    assert client("sns").list_topics()["Topics"] == []


def _dashboard_models() -> set[str]:
    body = json.loads(
        client("cloudwatch").get_dashboard(DashboardName=cloudwatch_alarms.DASHBOARD_NAME)[
            "DashboardBody"
        ]
    )
    return {line[3] for widget in body["widgets"] for line in widget["properties"]["metrics"]}


def test_setup_of_one_model_keeps_the_others_on_the_dashboard(aws):
    cloudwatch_alarms.setup(MODELS)
    result = cloudwatch_alarms.setup(MODELS[:1])
    assert _dashboard_models() == set(MODELS)
    assert result["dashboard_models"] == sorted(MODELS)


def test_teardown_of_one_model_leaves_the_others_on_the_dashboard(aws):
    cloudwatch_alarms.setup(MODELS)
    cloudwatch_alarms.teardown(MODELS[:1])
    assert _dashboard_models() == {MODELS[1]}
