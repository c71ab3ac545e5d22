"""The monitor flow against moto's CloudWatch: batched reads, events, alert state, parameters."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from helpers import eventually

from flows.monitor import MonitorParameters, bedrock_batch_monitor
from tasks.aws.clients import client, reset_clients
from tasks.monitoring.alerts import STALLED, THROUGHPUT_HIGH_INPUT
from tasks.monitoring.cloudwatch import (
    DIMENSION,
    INPUT_TOKENS_PER_MINUTE,
    MAX_QUERIES_PER_CALL,
    METRIC_NAMES,
    NAMESPACE,
    PENDING_RECORDS,
    build_queries,
    get_batch_metrics,
    list_batch_model_ids,
)
from tasks.monitoring.events import METRICS, alert_event_name, read_events
from tasks.monitoring.publish import sparkline
from tasks.settings import get_settings

NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)


@pytest.fixture(scope="module")
def cloudwatch():
    """moto's CloudWatch on a free port; the process env points boto3 at it for this module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(os.environ)
    os.environ["AWS_ENDPOINT_URL_CLOUDWATCH"] = f"http://{host}:{port}"
    # moto serves no batch jobs: listing them fails at once, so a suspected stall is judged
    # by the metrics alone (the emulator's jobs are in test_monitor_e2e.py).
    os.environ["AWS_ENDPOINT_URL_BEDROCK"] = f"http://{host}:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    get_settings.cache_clear()
    reset_clients()
    try:
        yield client("cloudwatch")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        reset_clients()
        server.stop()


def _model() -> str:
    return f"test.monitor-{uuid.uuid4().hex[:8]}-v1:0"


def _put(cw, model_id: str, key: str, values: list[float], end: datetime = NOW) -> None:
    """One point a minute, the last one at `end`."""
    n = len(values)
    data = [
        {
            "MetricName": METRIC_NAMES[key],
            "Dimensions": [{"Name": DIMENSION, "Value": model_id}],
            "Timestamp": end - timedelta(minutes=n - 1 - i),
            "Value": float(value),
        }
        for i, value in enumerate(values)
    ]
    for start in range(0, len(data), 500):
        cw.put_metric_data(Namespace=NAMESPACE, MetricData=data[start : start + 500])


def _wait_for_events(predicate, timeout: float = 20.0, **filters):
    """Poll the Prefect API until `predicate(events)` holds; the persister flushes every few s."""

    def probe():
        events = read_events(**filters)
        return events if predicate(events) else []

    return eventually(probe, timeout=timeout, fail=False) or read_events(**filters)


def test_build_queries_covers_every_metric_of_every_model():
    queries, index = build_queries(["a", "b"], 60)
    assert len(queries) == 8
    assert {index[q["Id"]] for q in queries} == {(m, k) for m in ("a", "b") for k in METRIC_NAMES}
    assert all(q["MetricStat"]["Metric"]["Namespace"] == NAMESPACE for q in queries)


def test_get_batch_metrics_batches_queries_at_the_api_limit(cloudwatch):
    models = [_model() for _ in range(MAX_QUERIES_PER_CALL // len(METRIC_NAMES) + 1)]
    _put(cloudwatch, models[-1], PENDING_RECORDS, [1, 2, 3])
    calls = []
    cloudwatch.meta.events.register(
        "before-call.monitoring.GetMetricData", lambda **kw: calls.append(1)
    )
    try:
        series = get_batch_metrics.fn(
            models, NOW - timedelta(minutes=10), NOW + timedelta(seconds=1), 60
        )
    finally:
        cloudwatch.meta.events.unregister("before-call.monitoring.GetMetricData")
    assert len(calls) == 2
    assert [v for _, v in series[models[-1]][PENDING_RECORDS]] == [1, 2, 3]
    assert series[models[0]][PENDING_RECORDS] == []


def test_list_batch_model_ids_finds_models_publishing_metrics(cloudwatch):
    model_id = _model()
    _put(cloudwatch, model_id, PENDING_RECORDS, [4])
    assert model_id in list_batch_model_ids.fn()


def test_monitor_alerts_once_while_stalled_and_resolves_once(cloudwatch):
    model_id = _model()
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    _put(cloudwatch, model_id, PENDING_RECORDS, [50] * 40)
    _put(cloudwatch, model_id, INPUT_TOKENS_PER_MINUTE, [0] * 40)
    params = MonitorParameters(model_ids=[model_id], now=NOW, state_prefix=prefix)

    first = bedrock_batch_monitor(params)
    second = bedrock_batch_monitor(params.model_copy(update={"now": NOW + timedelta(seconds=30)}))
    assert [(t["rule"], t["resolved"]) for t in first["transitions"]] == [(STALLED, False)]
    assert second["transitions"] == []

    # Tokens flow again one minute later.
    later = NOW + timedelta(minutes=1)
    _put(cloudwatch, model_id, INPUT_TOKENS_PER_MINUTE, [1200], end=later)
    _put(cloudwatch, model_id, PENDING_RECORDS, [40], end=later)
    third = bedrock_batch_monitor(params.model_copy(update={"now": later}))
    assert [(t["rule"], t["resolved"]) for t in third["transitions"]] == [(STALLED, True)]

    names = [alert_event_name(STALLED), alert_event_name(STALLED, resolved=True)]
    events = _wait_for_events(
        lambda evs: len(evs) >= 2, names=names, resource_ids=[f"bedrock.model.{model_id}"]
    )
    assert [e.event for e in events] == names
    assert events[0].payload["pending_records"] == 50
    # A value is read with a statistic over a period; the alert says which, as CloudWatch does.
    assert events[0].payload["statistic"] == "Average"
    assert events[0].payload["period_seconds"] == 60
    # The model's jobs could not be listed: the alert still fires, their counts unknown.
    assert events[0].payload["jobs_in_progress"] is None
    assert events[0].payload["jobs_waiting"] is None
    assert events[1].payload["started_at"] == events[0].payload["started_at"]


def test_monitor_emits_one_metrics_event_per_model(cloudwatch):
    models = [_model(), _model()]
    for model_id in models:
        _put(cloudwatch, model_id, PENDING_RECORDS, [7, 8])
    bedrock_batch_monitor(MonitorParameters(model_ids=models, now=NOW, state_prefix="t-metrics"))
    events = _wait_for_events(
        lambda evs: len(evs) >= 2,
        names=[METRICS],
        resource_ids=[f"bedrock.model.{m}" for m in models],
    )
    assert sorted(e.resource.id for e in events) == sorted(f"bedrock.model.{m}" for m in models)
    assert all(e.payload[PENDING_RECORDS] == 8 for e in events)
    assert all(e.payload["period_seconds"] == 60 for e in events)
    assert all(e.payload["statistic"] == "Average" for e in events)


def test_monitor_latest_pending_is_zero_once_the_model_stops_publishing(cloudwatch):
    model_id = _model()
    _put(cloudwatch, model_id, PENDING_RECORDS, [30, 12], end=NOW - timedelta(minutes=10))
    result = bedrock_batch_monitor(
        MonitorParameters(model_ids=[model_id], now=NOW, state_prefix="t-stale")
    )
    assert result["latest"][model_id][PENDING_RECORDS] == 0.0
    assert result["transitions"] == []


def test_monitor_thresholds_come_from_parameters(cloudwatch):
    model_id = _model()
    _put(cloudwatch, model_id, INPUT_TOKENS_PER_MINUTE, [5_000] * 10)
    base = MonitorParameters(model_ids=[model_id], now=NOW)

    default = bedrock_batch_monitor(base.model_copy(update={"state_prefix": "t-default"}))
    low = bedrock_batch_monitor(
        base.model_copy(update={"state_prefix": "t-low", "input_tokens_per_minute": 4_000})
    )
    assert default["transitions"] == []
    assert [t["rule"] for t in low["transitions"]] == [THROUGHPUT_HIGH_INPUT]
    assert low["transitions"][0]["payload"]["threshold"] == 4_000
    maximum = bedrock_batch_monitor(
        base.model_copy(
            update={"state_prefix": "t-max", "input_tokens_per_minute": 4_000, "stat": "Maximum"}
        )
    )
    assert maximum["transitions"][0]["payload"]["statistic"] == "Maximum"


def test_monitor_without_models_reads_every_model_from_list_metrics(cloudwatch):
    model_id = _model()
    _put(cloudwatch, model_id, PENDING_RECORDS, [3])
    result = bedrock_batch_monitor(MonitorParameters(now=NOW, state_prefix="t-list"))
    assert model_id in result["models"]


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0, 7, 14]) == "▁▅█"
    assert sparkline([]) == ""
    assert sparkline([3, 3]) == "██"
