"""`prefect deploy --all` reads prefect.yaml and creates every deployment on a Prefect server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    completed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def test_deploy_all_creates_every_deployment(deployed):
    with get_client(sync_client=True) as client:
        names = {
            name: client.read_deployment_by_name(name)
            for name in (
                "batch-inference/batch-inference",
                "batch-inference/batch-inference-nightly",
                "bedrock_batch_monitor/bedrock-batch-monitor",
                "summarize-run/summarize-run",
            )
        }
    batch = names["batch-inference/batch-inference"]
    assert batch.parameters["params"]["source"] == "data/topics.csv"
    assert batch.work_pool_name == "bedrock-batch"
    nightly = names["batch-inference/batch-inference-nightly"]
    assert [s.active for s in nightly.schedules] == [False]
    monitor = names["bedrock_batch_monitor/bedrock-batch-monitor"]
    assert monitor.schedules[0].active
    assert monitor.schedules[0].schedule.interval.total_seconds() == 300


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
