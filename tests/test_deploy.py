"""`prefect deploy --all` reads prefect.yaml and creates every deployment on a Prefect server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import automations_removed_after
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_URL

from tasks.monitoring.automations import SUMMARIZE_DEPLOYMENT_TRIGGER

# Real subprocesses, SIGKILLs or a fault matrix: `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deployed():
    """A `process` work pool, then `prefect deploy --all` in a subprocess against the harness."""
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name="bedrock-batch", type="process"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(ROOT)}
    with automations_removed_after():  # the deployments' triggers are automations
        completed = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        yield completed


def test_deploy_all_creates_every_deployment(deployed):
    with get_client(sync_client=True) as client:
        names = {
            name: client.read_deployment_by_name(name)
            for name in (
                "batch-inference/batch-inference",
                "batch-inference/batch-inference-nightly",
                "batch-pipeline/batch-pipeline",
                "bedrock_batch_monitor/bedrock-batch-monitor",
                "summarize-run/summarize-run",
            )
        }
    batch = names["batch-inference/batch-inference"]
    assert batch.parameters["params"]["source"] == "data/topics.csv"
    assert batch.work_pool_name == "bedrock-batch"
    nightly = names["batch-inference/batch-inference-nightly"]
    assert [s.active for s in nightly.schedules] == [False]
    # The pipeline's defaults are a valid form: the UI's Run starts the bundled pipeline.
    from flows.pipeline import PipelineParams

    pipeline = names["batch-pipeline/batch-pipeline"]
    params = PipelineParams(**pipeline.parameters["params"])
    assert [s.name for s in params.resolved_stages()] == ["answer", "grade"]
    assert Path(ROOT, params.source).exists()
    assert pipeline.work_pool_name == "bedrock-batch"
    monitor = names["bedrock_batch_monitor/bedrock-batch-monitor"]
    assert monitor.schedules[0].active
    assert monitor.schedules[0].schedule.interval.total_seconds() == 300


def test_the_monitors_schedule_makes_runs(deployed):
    # The server's scheduler inserts a schedule's runs in bulk; under SQLAlchemy 2.1 (allowed by
    # prefect 3.8.8's own range) it failed on every pass ("Can't evaluate bulk DML statement")
    # and no scheduled deployment ever ran. The same insert, through the API's schedule call.
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        monitor = client.read_deployment_by_name("bedrock_batch_monitor/bedrock-batch-monitor")
        response = client._client.post(f"/deployments/{monitor.id}/schedule", json={})
        assert response.is_success, response.text
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[monitor.id]))
        )
    scheduled = [r for r in runs if r.state is not None and r.state.is_scheduled()]
    assert len(scheduled) >= 2, [r.state for r in runs]


def test_deploy_all_attaches_the_run_finished_trigger_to_summarize_run(deployed):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("summarize-run/summarize-run")
        automations = client.read_automations_by_name(SUMMARIZE_DEPLOYMENT_TRIGGER)
    owned = [a for a in automations if a.actions[0].deployment_id == deployment.id]
    assert len(owned) == 1
    assert owned[0].trigger.expect == {"bedrock.batch.run.finished"}
    assert owned[0].actions[0].parameters == {
        "output_uri": "{{ event.payload.output_uri }}",
        "run_name": "{{ event.payload.run_name }}",
    }


def test_serve_beside_deploy_keeps_both_and_served_runs_complete(deployed, tmp_path):
    """`bedrock-batch serve` after `prefect deploy --all`: the deployed ones keep their pull
    steps, the served ones run (they used to fail with FileNotFoundError '.../None')."""
    import asyncio

    import polars as pl
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from flows.serve import SUMMARIZE_DEPLOYMENT, build_deployments

    served = build_deployments()
    for deployment in served:
        deployment.apply()
    with get_client(sync_client=True) as client:
        deployed_batch = client.read_deployment_by_name("batch-inference/batch-inference")
        assert deployed_batch.pull_steps and deployed_batch.work_pool_name == "bedrock-batch"
        served_summarize = client.read_deployment_by_name(f"summarize-run/{SUMMARIZE_DEPLOYMENT}")
        owners = [
            a.actions[0].deployment_id
            for a in client.read_automations_by_name(SUMMARIZE_DEPLOYMENT_TRIGGER)
        ]
    # The deployed summarize-run carries the trigger, so the served one does not: one summary.
    assert served_summarize.id not in owners

    out = tmp_path / "run" / "output"
    out.mkdir(parents=True)
    pl.DataFrame(
        {"record_id": ["R1"], "error_code": [None]}, schema_overrides={"error_code": pl.String}
    ).write_parquet(out / "part-00000.parquet")
    flow_run = run_deployment(
        f"summarize-run/{SUMMARIZE_DEPLOYMENT}",
        parameters={"output_uri": str(out), "run_name": "served"},
        timeout=0,
    )
    runner = Runner(name="served-test", query_seconds=1)
    runner.add_deployment(next(d for d in served if d.name == SUMMARIZE_DEPLOYMENT))
    asyncio.run(runner.start(run_once=True))
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), state
