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


def build_deployments(monitor_interval_minutes: float = 5.0) -> list:
    """The runner deployments `serve_all` serves: batch-inference, the monitor, summarize-run."""
    from flows.batch_inference import batch_inference
    from flows.monitor import bedrock_batch_monitor
    from flows.summarize import summarize_run
    from tasks.monitoring.automations import summarize_deployment_trigger

    return [
        batch_inference.to_deployment(name="batch-inference", parameters=BATCH_DEFAULTS),
        bedrock_batch_monitor.to_deployment(
            name="bedrock-batch-monitor", interval=timedelta(minutes=monitor_interval_minutes)
        ),
        summarize_run.to_deployment(
            name="summarize-run", triggers=[summarize_deployment_trigger()]
        ),
    ]


def serve_all(monitor_interval_minutes: float = 5.0) -> None:
    """Serve every deployment from this process until interrupted (Ctrl-C).

    Flow-run heartbeats are switched on so the zombie-run automation can see runs that die.
    """
    from prefect import serve

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    serve(*build_deployments(monitor_interval_minutes))
