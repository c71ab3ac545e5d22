"""Prefect events of the batch flow and of the monitor: names, resources and emit helpers."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.events import Event, emit_event

from tasks.aws.submit import run_key_of
from tasks.bedrock.jobs import job_id_from_arn
from tasks.bedrock.model_ids import strip_arn
from tasks.bedrock.prices import format_usd

# Lifecycle of a batch run (emitted by flows/batch_inference.py).
JOB_SUBMITTED = "bedrock.batch.job.submitted"
JOB_STATUS_CHANGED = "bedrock.batch.job.status-changed"
JOB_MERGED = "bedrock.batch.job.merged"
RUN_FINISHED = "bedrock.batch.run.finished"
RUN_FAILED = "bedrock.batch.run.failed"

# Bedrock's own "Batch Inference Job State Change" EventBridge event, relayed from SQS
# (tasks/aws/job_events.py); related to the run through the run key its job name starts with.
JOB_STATE_CHANGED = "bedrock.batch.job.state-changed"

# Emitted by the monitor (flows/monitor.py).
METRICS = "bedrock.batch.metrics"
ALERT_PREFIX = "bedrock.batch.alert."
RESOLVED_SUFFIX = ".resolved"

RUN_RESOURCE_PREFIX = "bedrock.batch.run."
JOB_RESOURCE_PREFIX = "bedrock.batch.job."
MODEL_RESOURCE_PREFIX = "bedrock.model."
RUN_KEY_RESOURCE_PREFIX = "bedrock.batch.run-key."
# The fields of the event's detail a JOB_STATE_CHANGED payload carries (AWS's names).
STATE_CHANGE_FIELDS = ("status", "failureMessage", "batchJobName", "batchJobArn", "batchModelId")


def alert_event_name(rule: str, resolved: bool = False) -> str:
    """`bedrock.batch.alert.<rule>`, or `...<rule>.resolved` when the condition ended."""
    return ALERT_PREFIX + rule + (RESOLVED_SUFFIX if resolved else "")


def run_resource(run_name: str, model_id: str | None = None) -> dict[str, str]:
    """The primary resource of every run event: `bedrock.batch.run.<run_name>`."""
    resource = {
        "prefect.resource.id": RUN_RESOURCE_PREFIX + run_name,
        "prefect.resource.name": run_name,
    }
    if model_id:
        resource["bedrock.model-id"] = model_id
    return resource


def model_resource(model_id: str) -> dict[str, str]:
    """The primary resource of monitor events: `bedrock.model.<modelId>`."""
    return {
        "prefect.resource.id": MODEL_RESOURCE_PREFIX + model_id,
        "prefect.resource.name": model_id,
        "bedrock.model-id": model_id,
    }


def _model_related(model_id: str | None) -> list[dict[str, str]]:
    if not model_id:
        return []
    return [
        {
            "prefect.resource.id": MODEL_RESOURCE_PREFIX + model_id,
            "prefect.resource.role": "bedrock-model",
            "prefect.resource.name": model_id,
        }
    ]


def _job_related(job_arn: str | None, shard: str) -> list[dict[str, str]]:
    if not job_arn:  # a shard served on demand only: no job, and no `bedrock.batch.job.`
        return []
    job_id = job_id_from_arn(job_arn)
    return [
        {
            "prefect.resource.id": JOB_RESOURCE_PREFIX + job_id,
            "prefect.resource.role": "bedrock-batch-job",
            "prefect.resource.name": shard or job_id,
            "bedrock.job-arn": job_arn,
        }
    ]


def _emit(
    event: str,
    resource: dict[str, str],
    payload: dict[str, Any],
    related: list[dict[str, str]],
) -> None:
    emit_event(event=event, resource=resource, related=related, payload=payload)


def emit_job_submitted(
    run_name: str, job_arn: str, shard: str, model_id: str, records: int
) -> None:
    """A shard became a Bedrock batch job."""
    _emit(
        JOB_SUBMITTED,
        run_resource(run_name, model_id),
        {"job_arn": job_arn, "shard": shard, "model_id": model_id, "records": records},
        _job_related(job_arn, shard) + _model_related(model_id),
    )


def emit_job_status(
    run_name: str,
    job_arn: str,
    shard: str,
    model_id: str,
    status: str,
    previous: str | None,
    counters: dict,
) -> None:
    """A job's status changed; `counters` holds the progress counters of GetModelInvocationJob."""
    _emit(
        JOB_STATUS_CHANGED,
        run_resource(run_name, model_id),
        {
            "job_arn": job_arn,
            "shard": shard,
            "model_id": model_id,
            "status": status,
            "previous": previous,
            "counters": dict(counters),
        },
        _job_related(job_arn, shard) + _model_related(model_id),
    )


def emit_job_merged(
    run_name: str,
    job_arn: str | None,
    shard: str,
    model_id: str,
    stats: dict,
    part_uri: str,
) -> None:
    """A finished job's output was merged into a Parquet part.

    ``job_arn`` is the shard's latest batch job (None when it was served on demand only); the
    model is on it like on the other job events, so automations can filter merges by model.
    """
    _emit(
        JOB_MERGED,
        run_resource(run_name, model_id),
        {
            "job_arn": job_arn or "",
            "shard": shard,
            "model_id": model_id,
            "stats": dict(stats),
            "part_uri": part_uri,
        },
        _job_related(job_arn, shard) + _model_related(model_id),
    )


def emit_run_finished(
    run_name: str,
    model_id: str,
    counts: dict,
    tokens: dict,
    output_uri: str,
    cost: dict | None = None,
) -> None:
    """Every job of the run reached a final status and its output is merged at `output_uri`.

    ``cost`` holds the actual cost in USD, batch and on demand apart, and what the ceiling
    held back (see ``tasks.run.cost``).
    """
    _emit(
        RUN_FINISHED,
        run_resource(run_name, model_id),
        {
            "run_name": run_name,
            "model_id": model_id,
            "counts": dict(counts),
            "tokens": dict(tokens),
            "output_uri": output_uri,
            "cost": dict(cost or {}),
            "cost_text": cost_text(cost),
        },
        _model_related(model_id),
    )


def cost_text(cost: dict | None) -> str | None:
    """The cost as people read it, for notifications: the sums are floats (0.07184874999999999)
    that a template would print whole; None when no price was known."""
    if not cost or cost.get("total_usd") is None:
        return None
    return (
        f"{format_usd(cost['total_usd'])} (batch {format_usd(cost.get('batch_usd'))}, "
        f"on demand {format_usd(cost.get('on_demand_usd'))})"
    )


def emit_run_failed(run_name: str, model_id: str, reason: str) -> None:
    """The run stopped without a usable result."""
    _emit(
        RUN_FAILED,
        run_resource(run_name, model_id),
        {"run_name": run_name, "model_id": model_id, "reason": reason},
        _model_related(model_id),
    )


def run_key_resource_id(run_key: str) -> str:
    """`bedrock.batch.run-key.<key>`: what a run's listener filters job state changes on."""
    return RUN_KEY_RESOURCE_PREFIX + run_key


def job_state_changed_event(event_id: UUID, detail: dict[str, Any], time: str | None) -> Event:
    """The Prefect event of one EventBridge job state change (``detail`` is AWS's detail).

    The relay sends it through its own events client, so it knows the event left before it
    deletes the SQS message; ``event_id`` is derived from EventBridge's id, so a message
    delivered twice (or to two relays) is one event on the server.
    """
    job_arn = detail["batchJobArn"]
    job_id = job_id_from_arn(job_arn)
    name = detail.get("batchJobName") or job_id
    related = _model_related(strip_arn(detail.get("batchModelId") or ""))
    key = run_key_of(name)
    if key:
        related.append(
            {
                "prefect.resource.id": run_key_resource_id(key),
                "prefect.resource.role": "bedrock-batch-run-key",
            }
        )
    return Event(
        id=event_id,
        event=JOB_STATE_CHANGED,
        resource={
            "prefect.resource.id": JOB_RESOURCE_PREFIX + job_id,
            "prefect.resource.name": name,
            "bedrock.job-arn": job_arn,
        },
        related=related,
        payload={**{f: detail.get(f) for f in STATE_CHANGE_FIELDS}, "time": time},
    )


def emit_metrics(model_id: str, latest: dict[str, float | None], window: dict[str, Any]) -> None:
    """The monitor's reading of one model: the latest value of each metric and the window."""
    _emit(METRICS, model_resource(model_id), {"model_id": model_id, **latest, **window}, [])


def emit_alert(model_id: str, rule: str, resolved: bool, detail: dict[str, Any]) -> None:
    """An alert rule started (`bedrock.batch.alert.<rule>`) or ended (`....resolved`)."""
    _emit(
        alert_event_name(rule, resolved),
        model_resource(model_id),
        {
            "model_id": model_id,
            "rule": rule,
            "state": "resolved" if resolved else "firing",
            **detail,
        },
        [],
    )


def read_events(
    names: list[str] | None = None,
    prefixes: list[str] | None = None,
    resource_ids: list[str] | None = None,
    since: datetime | None = None,
    limit: int = 500,
) -> list[Event]:
    """Events stored by the Prefect server, oldest first (for checks, the CLI and tests).

    Args:
        names: Exact event names to include.
        prefixes: Event-name prefixes to include.
        resource_ids: Primary resource ids to include.
        since: Earliest occurrence; the server's default (one day back) when None.
        limit: Most events to return (read in pages of 50, the server's page limit).

    Returns:
        The matching events.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    event_filter = EventFilter(
        event=EventNameFilter(name=names, prefix=prefixes),
        resource=EventResourceFilter(id=resource_ids) if resource_ids else None,
    )
    if since is not None:
        event_filter.occurred = EventOccurredFilter(since=since)
    events: list[Event] = []
    with get_client(sync_client=True) as prefect_client:
        page = prefect_client.read_events(filter=event_filter, limit=min(limit, 50))
        events.extend(page.events)
        while page.next_page and len(events) < limit:
            page = prefect_client.read_events_page(page.next_page)
            events.extend(page.events)
    return sorted(events[:limit], key=lambda event: event.occurred)
