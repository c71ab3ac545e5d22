"""Serve the batch flow, the monitor and the summariser without a worker (the quick start)."""

from __future__ import annotations

import os
from datetime import timedelta

BATCH_DEFAULTS = {
    "params": {
        "source": "data/topics.csv",
        "prompt_id": "joke_about_topic",
        "model_id": "anthropic.claude-3-haiku-20240307-v1:0",
        "output_uri": "out",
    }
}

PIPELINE_DEFAULTS = {
    "params": {
        "pipeline_id": "answer_and_grade",
        "source": "data/simplecot.jsonl",
        "output_uri": "out",
        "run_name": "simplecot-answer-and-grade",
    }
}


# Served deployments carry their own names: updating the deployments `prefect deploy` made
# (same names) would drop their pull steps and keep path=None, and every served run then
# failed with FileNotFoundError '.../None'. Both kinds live side by side.
SERVED_SUFFIX = "-served"
BATCH_DEPLOYMENT = "batch-inference" + SERVED_SUFFIX
PIPELINE_DEPLOYMENT = "batch-pipeline" + SERVED_SUFFIX
MONITOR_DEPLOYMENT = "bedrock-batch-monitor" + SERVED_SUFFIX
SUMMARIZE_DEPLOYMENT = "summarize-run" + SERVED_SUFFIX


def build_deployments(monitor_interval_minutes: float = 5.0) -> list:
    """The runner deployments `serve_all` serves: batch-inference, batch-pipeline, the monitor
    and summarize-run.

    The served summarize-run gets the run-finished trigger only when no deployed summarize-run
    already carries one, so a finished run is summarised once, not once per path.
    """
    from flows.batch_inference import batch_inference
    from flows.monitor import bedrock_batch_monitor
    from flows.pipeline import batch_pipeline
    from flows.summarize import summarize_run
    from tasks.monitoring.automations import (
        summarize_deployment_trigger,
        summarize_trigger_owner,
    )

    owner = summarize_trigger_owner()
    own_trigger = owner is None or owner.endswith(SERVED_SUFFIX)
    return [
        batch_inference.to_deployment(name=BATCH_DEPLOYMENT, parameters=BATCH_DEFAULTS),
        batch_pipeline.to_deployment(name=PIPELINE_DEPLOYMENT, parameters=PIPELINE_DEFAULTS),
        bedrock_batch_monitor.to_deployment(
            name=MONITOR_DEPLOYMENT, interval=timedelta(minutes=monitor_interval_minutes)
        ),
        summarize_run.to_deployment(
            name=SUMMARIZE_DEPLOYMENT,
            triggers=[summarize_deployment_trigger()] if own_trigger else [],
        ),
    ]


def serve_all(monitor_interval_minutes: float = 5.0) -> None:
    """Serve every deployment from this process until interrupted (Ctrl-C).

    Flow-run heartbeats are switched on so the zombie-run automation can see runs that die.
    Project automations left pointing at deleted deployments are removed first.
    """
    from prefect import serve

    from tasks.monitoring.automations import prune_stale_automations

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    prune_stale_automations()
    serve(*build_deployments(monitor_interval_minutes))
