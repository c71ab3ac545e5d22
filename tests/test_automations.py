"""Automations applied from code: idempotent by name, and the run-finished one really fires."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from helpers import PREFECT_SERVER_WAIT, automations_removed_after, eventually
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import StateType
from prefect.events.schemas.automations import Posture

from flows.summarize import summarize_run
from tasks.monitoring.automations import (
    RUN_FAILED_NOTIFY_AUTOMATION,
    RUN_FINISHED_NOTIFY_AUTOMATION,
    STALLED_AUTOMATION,
    SUMMARIZE_AUTOMATION,
    ZOMBIE_AUTOMATION,
    apply_automations,
    zombie_automation,
)
from tasks.monitoring.events import emit_run_failed, emit_run_finished

SUMMARIZE_TEST_DEPLOYMENT = "summarize-run-automations-test"


@pytest.fixture(scope="module")
def applied():
    """A summarize-run deployment of its own, then apply_automations twice (removed after)."""
    deployment_id = summarize_run.to_deployment(name=SUMMARIZE_TEST_DEPLOYMENT).apply()
    kwargs = {
        "notification_block": "bedrock-batch-alerts-test",
        "webhook_url": "http://127.0.0.1:9/alerts",
        "summarize_deployment": f"summarize-run/{SUMMARIZE_TEST_DEPLOYMENT}",
    }
    with automations_removed_after():
        first = apply_automations(**kwargs)
        second = apply_automations(**kwargs)
        yield deployment_id, first, second


def _flow_runs(deployment_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_apply_automations_creates_each_automation_once(applied):
    _, first, second = applied
    assert set(first.values()) == {"applied"}
    assert second == first
    with get_client(sync_client=True) as client:
        for name in (
            STALLED_AUTOMATION,
            SUMMARIZE_AUTOMATION,
            ZOMBIE_AUTOMATION,
            RUN_FINISHED_NOTIFY_AUTOMATION,
            RUN_FAILED_NOTIFY_AUTOMATION,
        ):
            assert len(client.read_automations_by_name(name)) == 1, name


def test_apply_automations_without_block_says_how_to_make_one(applied):
    result = apply_automations(notification_block=f"missing-{uuid.uuid4().hex[:6]}")
    assert "no notification block" in result[STALLED_AUTOMATION]
    assert "--webhook-url" in result[STALLED_AUTOMATION]


def test_run_finished_event_runs_summarize_with_the_output_uri(applied):
    deployment_id, _, _ = applied
    output_uri = f"s3://bucket/out/run-{uuid.uuid4().hex[:6]}"
    emit_run_finished("nightly-x", "m", {"records": 3}, {"input": 1}, output_uri)
    runs = eventually(
        lambda: [
            r for r in _flow_runs(deployment_id) if r.parameters.get("output_uri") == output_uri
        ],
        timeout=PREFECT_SERVER_WAIT,
        interval=0.25,
        fail=False,
    )
    assert len(runs) == 1
    assert runs[0].parameters["run_name"] == "nightly-x"


def test_zombie_automation_is_the_documented_proactive_heartbeat_trigger():
    automation = zombie_automation(heartbeat_seconds=120)
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.Crashed" in trigger.expect
    assert trigger.within == timedelta(seconds=120)
    assert automation.actions[0].state == StateType.CRASHED


def test_summarize_run_counts_rows_errors_and_tokens(tmp_path):
    import polars as pl

    part = tmp_path / "out" / "part-0.parquet"
    part.parent.mkdir()
    pl.DataFrame(
        {
            "record_id": ["a", "b", "c"],
            "response_text": ["hi", "hello", None],
            "input_tokens": [3, 4, None],
            "output_tokens": [5, 6, None],
            "error_code": [None, None, 400],
        }
    ).write_parquet(part)
    summary = summarize_run(str(tmp_path / "out"), run_name="r")
    assert summary["rows"] == 3
    assert summary["errors"] == 1
    assert summary["input_tokens"] == 7
    assert summary["output_tokens"] == 11


def test_summarize_run_markdown_keeps_paths_literal_and_money_readable(tmp_path):
    import json

    import polars as pl
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter

    # Underscores and stars in a folder name rendered as italics (`_scratch_` showed
    # "scratch"), and the cost as Python reprs (0.06638749999999999).
    out = tmp_path / "_scratch_" / "nightly_*v1*_" / "output"
    out.mkdir(parents=True)
    pl.DataFrame(
        {
            "record_id": ["a", "b"],
            "input_tokens": [1500, 20],
            "output_tokens": [700, 10],
            "error_code": [None, None],
            "served_by": ["batch", "on_demand"],
        }
    ).write_parquet(out / "part-00000.parquet")
    cost = {"batch_usd": 0.06638749999999999, "on_demand_usd": 0.0054612, "total_usd": 0.0718487}
    (out.parent / "summary.json").write_text(json.dumps({"cost": {**cost, "held_back_rows": 0}}))

    state = summarize_run(str(out), return_state=True)

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id={"any_": [state.state_details.flow_run_id]})
        )
    text = artifact.data
    assert f"`{out}`" in text
    assert f"Summary of `{out}`" in text
    assert "0.06638749999999999" not in text and "$0.0664" in text
    assert "$0.0718" in text
    assert "{" not in text  # no dict reprs
    assert "1,520" in text  # input tokens, with separators
    assert artifact.description == f"Summary of `{out}`"  # rendered as markdown too


@pytest.fixture
def webhook():
    """A local HTTP endpoint that keeps every JSON body POSTed to it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server hook name
            length = int(self.headers.get("Content-Length", 0))
            received.append(json.loads(self.rfile.read(length) or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()


def test_run_finished_and_failed_events_send_notifications(webhook):
    url, received = webhook
    block = f"bedrock-batch-notify-{uuid.uuid4().hex[:6]}"
    run = f"notify-{uuid.uuid4().hex[:6]}"
    output_uri = f"s3://bucket/out/{run}/output"

    def both() -> list[dict]:
        texts = [m.get("text", "") for m in received]
        done = [t for t in texts if output_uri in t] and [
            t for t in texts if "gate was closed" in t
        ]
        return received if done else []

    # Removed after: left behind, they notified a dead webhook for every later run (helpers).
    with automations_removed_after():
        result = apply_automations(notification_block=block, webhook_url=url)
        assert result[RUN_FINISHED_NOTIFY_AUTOMATION] == "applied"
        assert result[RUN_FAILED_NOTIFY_AUTOMATION] == "applied"
        counts = {"records": 250, "succeeded": 249, "failed": 1}
        emit_run_finished(run, "m", counts, {"input": 10, "output": 5}, output_uri)
        emit_run_failed(run + "-x", "m", "the gate was closed")
        # Through the server's triggers and actions services, which a busy test server (four
        # workers on two cores) has held back for more than 45 s.
        messages = eventually(both, timeout=PREFECT_SERVER_WAIT, what="both notifications")
    finished = next(m for m in messages if output_uri in m.get("text", ""))
    assert run in finished["subject"] and "Records: 250 (ok 249, failed 1)" in finished["text"]
    failed = next(m for m in messages if "gate was closed" in m.get("text", ""))
    assert "failed" in failed["subject"] and "resume" in failed["text"]


def test_the_run_finished_message_gives_the_cost_totals_not_every_job():
    # It printed the whole cost payload, one entry per job: thousands of lines at scale.
    import asyncio
    from types import SimpleNamespace

    from prefect.server.utilities.user_templates import (
        render_user_template,
        validate_user_template,
    )

    from tasks.monitoring.automations import RUN_FINISHED_BODY

    validate_user_template(RUN_FINISHED_BODY)
    payload = {
        "run_name": "r",
        "model_id": "m",
        "counts": {"records": 3, "succeeded": 3, "failed": 0},
        "tokens": {"input": 10, "output": 5},
        "output_uri": "out/r/output",
        "cost": {
            "total_usd": 0.0069,
            "batch_usd": 0.0069,
            "on_demand_usd": 0.0,
            "jobs": [{"job_id": f"job-{i}"} for i in range(2000)],
        },
    }
    event = SimpleNamespace(payload=payload)
    text = asyncio.run(render_user_template(RUN_FINISHED_BODY, {"event": event}))
    assert "Cost: $0.0069 (batch $0.0069, on demand $0.0)" in text
    assert "job-" not in text and len(text) < 400
    payload["cost"] = {"total_usd": None, "jobs": []}  # no price known
    text = asyncio.run(render_user_template(RUN_FINISHED_BODY, {"event": event}))
    assert "Cost" not in text and text.endswith("Output: out/r/output")


def test_the_run_finished_message_gives_the_cost_in_dollars_and_cents(monkeypatch):
    # A real run's sums are floats: the message read "Cost: $0.07184874999999999 (batch
    # $0.06638749999999999, on demand $0.005461249999999999)".
    import asyncio
    from types import SimpleNamespace

    from prefect.server.utilities.user_templates import render_user_template

    from tasks.monitoring import events
    from tasks.monitoring.automations import RUN_FINISHED_BODY

    sent: list[dict] = []
    monkeypatch.setattr(
        events, "_emit", lambda name, resource, payload, related: sent.append(payload)
    )
    cost = {
        "total_usd": 0.07184874999999999,
        "batch_usd": 0.06638749999999999,
        "on_demand_usd": 0.005461249999999999,
    }
    counts = {"records": 3000, "succeeded": 2500, "failed": 500}
    events.emit_run_finished("r", "m", counts, {"input": 1, "output": 2}, "out/r/output", cost)

    event = SimpleNamespace(payload=sent[0])
    text = asyncio.run(render_user_template(RUN_FINISHED_BODY, {"event": event}))

    assert "Cost: $0.0718 (batch $0.0664, on demand $0.0055)" in text
    assert "999" not in text


def test_a_summarize_deployment_that_is_not_flow_slash_name_is_one_line(capsys):
    from flows.cli import main

    code = main(["automations", "apply", "--summarize-deployment", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "--summarize-deployment 'nosuch' is not <flow name>/<deployment name>" in err


def test_the_stalled_message_says_how_many_jobs_run_and_wait():
    import asyncio
    from types import SimpleNamespace

    from prefect.server.utilities.user_templates import (
        render_user_template,
        validate_user_template,
    )

    from tasks.monitoring.automations import STALLED_BODY

    validate_user_template(STALLED_BODY)
    payload = {
        "pending_records": 120,
        "started_at": "2026-12-07T10:00:00+00:00",
        "stalled_minutes": 31.5,
        "jobs_in_progress": 1,
        "jobs_waiting": 2,
    }
    event = SimpleNamespace(payload=payload, resource={"bedrock.model-id": "m"})
    text = asyncio.run(render_user_template(STALLED_BODY, {"event": event}))
    assert "(31.5 minutes), with 1 of its jobs in progress and 2 waiting to start.\n" in text
    payload.update(jobs_in_progress=None, jobs_waiting=None)  # the jobs could not be listed
    text = asyncio.run(render_user_template(STALLED_BODY, {"event": event}))
    assert "(31.5 minutes).\n" in text and "None" not in text
