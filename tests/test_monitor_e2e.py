"""End to end on the local stack: a stuck Bedrock job → one stalled alert → automation → resolve."""

from __future__ import annotations

import os
import uuid

import pytest
from helpers import PREFECT_SERVER_WAIT, automations_removed_after, claude_jsonl, eventually
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.events.schemas.automations import EventTrigger, Posture

from flows.monitor import MonitorParameters, bedrock_batch_monitor
from tasks.aws.clients import client
from tasks.monitoring.alerts import STALLED
from tasks.monitoring.automations import run_deployment_automation, upsert_automation
from tasks.monitoring.events import MODEL_RESOURCE_PREFIX, alert_event_name, read_events

# A model no other test runs jobs on, so its metrics are this test's job alone.
MODEL_ID = "anthropic.claude-3-opus-20240229-v1:0"
RECORDS = 120


@flow(name="stalled-alert-target")
def stalled_alert_target(model_id: str = "") -> str:
    """What the automation runs; the test only checks that a run of it was created."""
    return model_id


def _until(condition, timeout: float, interval: float = 0.3):
    """Bounded polling: the value once truthy, else the last one (the test asserts on it)."""
    return eventually(condition, timeout=timeout, interval=interval, fail=False)


def _write_input(bucket: str, prefix: str) -> str:
    key = f"{prefix}/input/records.jsonl"
    client("s3").put_object(Bucket=bucket, Key=key, Body=claude_jsonl(RECORDS))
    return f"s3://{bucket}/{key}"


def _create_job(bucket: str, model_id: str, job_name: str) -> str:
    """A real batch job through plain boto3 against the emulator; its ARN."""
    input_uri = _write_input(bucket, job_name)
    return client("bedrock").create_model_invocation_job(
        jobName=job_name,
        roleArn=os.environ["BEDROCK_BATCH_ROLE_ARN"],
        modelId=model_id,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri, "s3InputFormat": "JSONL"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/{job_name}/out/"}},
    )["jobArn"]


def _seconds_params(model_id: str, state_prefix: str, **more) -> MonitorParameters:
    """Seconds instead of minutes: 1 s points, stalled after 3 s without input tokens."""
    return MonitorParameters(
        model_ids=[model_id],
        period_seconds=1,
        lookback_minutes=1,
        stall_minutes=3 / 60,
        throughput_window_minutes=1,
        backlog_window_minutes=1,
        state_prefix=state_prefix,
        **more,
    )


def _flow_runs(deployment_id):
    with get_client(sync_client=True) as prefect_client:
        return prefect_client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def _alerts(name: str) -> list:
    return read_events(names=[name], resource_ids=[MODEL_RESOURCE_PREFIX + MODEL_ID])


@pytest.fixture(autouse=True)
def _no_automation_left():
    with automations_removed_after():
        yield


def test_stuck_job_alerts_once_fires_automation_and_resolves_once(stack):
    run_id = uuid.uuid4().hex[:8]
    job_name = f"monitor-e2e-{run_id}"
    stack.set_faults(stuck_job_names_containing=job_name, stuck_after_fraction=0.5)
    # Bedrock puts one datapoint a minute; 1-second periods show the stall in seconds.
    stack.configure(metrics_period_seconds=1)

    # An automation: stalled alert for this model → run a test deployment.
    deployment_id = stalled_alert_target.to_deployment(name=f"target-{run_id}").apply()
    upsert_automation(
        run_deployment_automation(
            f"test: stalled → target {run_id}",
            EventTrigger(
                match={"prefect.resource.id": MODEL_RESOURCE_PREFIX + MODEL_ID},
                expect={alert_event_name(STALLED)},
                posture=Posture.Reactive,
                threshold=1,
            ),
            deployment_id,
            {"model_id": "{{ event.resource['bedrock.model-id'] }}"},
        )
    )

    # A real batch job through plain boto3 against the emulator; it sticks at half way.
    job_arn = _create_job(stack.bucket, MODEL_ID, job_name)
    params = _seconds_params(MODEL_ID, f"e2e-{run_id}")

    def transitions(resolved: bool) -> list:
        result = bedrock_batch_monitor(params)
        return [
            t for t in result["transitions"] if t["rule"] == STALLED and t["resolved"] == resolved
        ]

    # Each try runs the monitor flow on the worker's Prefect server, which can stall ~60 s.
    started = _until(lambda: transitions(False), timeout=PREFECT_SERVER_WAIT)
    assert len(started) == 1
    # The condition goes on: more runs, no second alert.
    assert transitions(False) == []
    assert transitions(False) == []

    stalled_events = _until(lambda: _alerts(alert_event_name(STALLED)), PREFECT_SERVER_WAIT)
    assert len(stalled_events) == 1
    assert stalled_events[0].payload["pending_records"] > 0
    # Bedrock is working on the job and gets nowhere: stalled, not queued.
    assert stalled_events[0].payload["jobs_in_progress"] == 1
    assert stalled_events[0].payload["jobs_waiting"] == 0

    # The automation's action happened: a flow run of the target deployment exists.
    runs = _until(lambda: _flow_runs(deployment_id), PREFECT_SERVER_WAIT)
    assert len(runs) == 1
    assert runs[0].parameters == {"model_id": MODEL_ID}

    # The job moves again → exactly one resolved event.
    stack.set_faults(stuck_job_names_containing=None)
    resolved = _until(lambda: transitions(True), timeout=PREFECT_SERVER_WAIT)
    assert len(resolved) == 1
    assert transitions(True) == []
    resolved_events = _until(
        lambda: _alerts(alert_event_name(STALLED, resolved=True)), PREFECT_SERVER_WAIT
    )
    assert len(resolved_events) == 1
    assert len(_alerts(alert_event_name(STALLED))) == 1
    status = client("bedrock").get_model_invocation_job(jobIdentifier=job_arn)["status"]
    assert status in {"InProgress", "Completed"}


def test_a_model_whose_jobs_all_wait_to_start_is_queued_not_stalled(stack):
    """Records pending and no tokens while the only job sits Scheduled: no stalled alert."""
    model_id = "anthropic.claude-opus-4-5-20251101-v1:0"  # no other test runs jobs on it
    run_id = uuid.uuid4().hex[:8]
    stack.configure(metrics_period_seconds=1, queue_delay_seconds=3600)
    job_arn = _create_job(stack.bucket, model_id, f"monitor-queued-{run_id}")
    params = _seconds_params(model_id, f"e2e-queued-{run_id}", disabled_rules=["backlog-growing"])
    try:
        # The metrics alone say stalled (records pending, no tokens for the stall time); the
        # monitor looks at the job, finds it waiting to start, and says queued instead.
        result = _until(
            lambda: bedrock_batch_monitor(params)["queued"], timeout=PREFECT_SERVER_WAIT
        )
        assert result == {model_id: 1}
        assert client("bedrock").get_model_invocation_job(jobIdentifier=job_arn)["status"] == (
            "Scheduled"
        )
        again = bedrock_batch_monitor(params)
        assert again["transitions"] == [] and again["queued"] == {model_id: 1}
        assert again["latest"][model_id]["pending_records"] == RECORDS
    finally:
        client("bedrock").stop_model_invocation_job(jobIdentifier=job_arn)
    assert (
        read_events(
            names=[alert_event_name(STALLED)], resource_ids=[MODEL_RESOURCE_PREFIX + model_id]
        )
        == []
    )
