"""Automations of the project, versioned in code and applied by name (create or update)."""

from __future__ import annotations

import logging
from datetime import timedelta
from urllib.parse import urlparse
from uuid import UUID

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound

from tasks.errors import RunSettingsError
from tasks.monitoring.alerts import STALLED
from tasks.monitoring.defaults import NOTIFICATION_BLOCK, SUMMARIZE_DEPLOYMENT
from tasks.monitoring.events import (
    MODEL_RESOURCE_PREFIX,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_RESOURCE_PREFIX,
    alert_event_name,
)

log = logging.getLogger(__name__)


STALLED_AUTOMATION = "bedrock-batch: notify when a batch model stalls"
SUMMARIZE_AUTOMATION = "bedrock-batch: summarize finished runs"
ZOMBIE_AUTOMATION = "bedrock-batch: crash zombie flow runs"
RUN_FINISHED_NOTIFY_AUTOMATION = "bedrock-batch: notify when a run finishes"
RUN_FAILED_NOTIFY_AUTOMATION = "bedrock-batch: notify when a run fails"
SUMMARIZE_DEPLOYMENT_TRIGGER = "summarize-run: on bedrock.batch.run.finished"

# Rendered by Prefect's actions service from the triggering event.
SUMMARIZE_PARAMETERS = {
    "output_uri": "{{ event.payload.output_uri }}",
    "run_name": "{{ event.payload.run_name }}",
}
STALLED_SUBJECT = "Bedrock batch stalled: {{ event.resource['bedrock.model-id'] }}"
STALLED_BODY = (
    "Model {{ event.resource['bedrock.model-id'] }} has had "
    "{{ event.payload.pending_records }} records pending and no input tokens processed "
    "since {{ event.payload.started_at }} ({{ event.payload.stalled_minutes }} minutes)"
    "{% if event.payload.jobs_in_progress is not none %}, with "
    "{{ event.payload.jobs_in_progress }} of its jobs in progress and "
    "{{ event.payload.jobs_waiting }} waiting to start{% endif %}.\n"
    "Check the model's batch jobs in the Bedrock console or with "
    "`aws bedrock list-model-invocation-jobs --status-equals InProgress`."
)


RUN_FINISHED_SUBJECT = "Bedrock batch run finished: {{ event.payload.run_name }}"
RUN_FINISHED_BODY = (
    "Run {{ event.payload.run_name }} on {{ event.payload.model_id }} finished.\n"
    "Records: {{ event.payload.counts.records }} (ok {{ event.payload.counts.succeeded }}, "
    "failed {{ event.payload.counts.failed }}).\n"
    "Tokens: {{ event.payload.tokens.input }} in, {{ event.payload.tokens.output }} out.\n"
    # The totals only: the cost payload lists every job, thousands of lines at scale.
    # cost_text is formatted by the flow; runs older than it have the floats only.
    "{% if event.payload.cost_text %}Cost: {{ event.payload.cost_text }}\n"
    "{% elif event.payload.cost and event.payload.cost.total_usd is not none %}"
    "Cost: ${{ event.payload.cost.total_usd }} (batch ${{ event.payload.cost.batch_usd }}, "
    "on demand ${{ event.payload.cost.on_demand_usd }})\n{% endif %}"
    "Output: {{ event.payload.output_uri }}"
)
RUN_FAILED_SUBJECT = "Bedrock batch run failed: {{ event.payload.run_name }}"
RUN_FAILED_BODY = (
    "Run {{ event.payload.run_name }} on {{ event.payload.model_id }} failed: "
    "{{ event.payload.reason }}\n"
    "Re-run it with the same run_name to resume; nothing already answered is paid again."
)


def stalled_trigger() -> EventTrigger:
    """Fires once per model when the monitor emits `bedrock.batch.alert.stalled`."""
    return EventTrigger(
        match={"prefect.resource.id": MODEL_RESOURCE_PREFIX + "*"},
        expect={alert_event_name(STALLED)},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def run_finished_trigger_kwargs() -> dict:
    """The run-finished trigger's fields, shared by the automation and the deployment trigger."""
    return {
        "match": {"prefect.resource.id": RUN_RESOURCE_PREFIX + "*"},
        "expect": {RUN_FINISHED},
        "for_each": {"prefect.resource.id"},
        "posture": Posture.Reactive,
        "threshold": 1,
        "within": timedelta(0),
    }


def summarize_deployment_trigger() -> DeploymentEventTrigger:
    """The same trigger attached to the summarize-run deployment itself (serve, prefect.yaml)."""
    return DeploymentEventTrigger(
        name=SUMMARIZE_DEPLOYMENT_TRIGGER,
        parameters=SUMMARIZE_PARAMETERS,
        **run_finished_trigger_kwargs(),
    )


def stalled_notification_automation(block_document_id: UUID) -> Automation:
    """On a stalled alert, send a notification through the given notification block."""
    return Automation(
        name=STALLED_AUTOMATION,
        description="Monitor alert bedrock.batch.alert.stalled → notification block.",
        trigger=stalled_trigger(),
        actions=[
            SendNotification(
                block_document_id=block_document_id, subject=STALLED_SUBJECT, body=STALLED_BODY
            )
        ],
    )


def run_notification_automation(
    name: str, event: str, block_document_id: UUID, subject: str, body: str
) -> Automation:
    """On each run event `event`, send a notification through the given block."""
    return Automation(
        name=name,
        description=f"{event} → notification block.",
        trigger=EventTrigger(
            match={"prefect.resource.id": RUN_RESOURCE_PREFIX + "*"},
            expect={event},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=subject, body=body)],
    )


def run_deployment_automation(
    name: str, trigger: EventTrigger, deployment_id: UUID, parameters: dict | None = None
) -> Automation:
    """An automation that runs a deployment when its trigger fires."""
    return Automation(
        name=name,
        trigger=trigger,
        actions=[
            RunDeployment(source="selected", deployment_id=deployment_id, parameters=parameters)
        ],
    )


def summarize_automation(deployment_id: UUID) -> Automation:
    """On `bedrock.batch.run.finished`, run summarize-run on the event's output uri."""
    automation = run_deployment_automation(
        SUMMARIZE_AUTOMATION,
        EventTrigger(**run_finished_trigger_kwargs()),
        deployment_id,
        SUMMARIZE_PARAMETERS,
    )
    automation.description = "bedrock.batch.run.finished → summarize-run(output_uri)."
    return automation


def zombie_automation(heartbeat_seconds: int = 90) -> Automation:
    """Prefect's documented zombie-run automation: no heartbeat for N seconds → Crashed.

    Flow runs send heartbeats only when PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set (e.g. 30);
    the deployments in prefect.yaml set it.
    """
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Flow runs whose heartbeats stop are marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="Flow run marked as crashed due to missing heartbeats.",
            )
        ],
    )


def upsert_automation(automation: Automation) -> Automation:
    """Create the automation, or update the one with the same name; never a duplicate."""
    try:
        existing = Automation.read(name=automation.name)
    except (ValueError, ObjectNotFound):
        existing = None
    if existing is None:
        return automation.create()
    automation.id = existing.id
    automation.update()
    return automation


def _deployment_id(name: str) -> UUID | None:
    if name.count("/") != 1 or not all(name.split("/")):
        # Prefect's own ValueError came out of the CLI as a traceback.
        msg = (
            f"--summarize-deployment {name!r} is not <flow name>/<deployment name> "
            f"(e.g. {SUMMARIZE_DEPLOYMENT!r}); `prefect deployment ls` lists them."
        )
        raise RunSettingsError(msg)
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            return None


def _deployment_has_own_trigger(deployment_id: UUID, event: str) -> bool:
    """True when another automation already runs the deployment on `event` (prefect.yaml/serve)."""
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
    for automation in automations:
        if automation.name == SUMMARIZE_AUTOMATION:
            continue
        runs_it = any(
            getattr(action, "deployment_id", None) == deployment_id for action in automation.actions
        )
        if runs_it and event in getattr(automation.trigger, "expect", ()):
            return True
    return False


def summarize_trigger_owner() -> str | None:
    """`flow/deployment` of the summarize-run deployment that carries the run-finished trigger."""
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
        for automation in automations:
            if RUN_FINISHED not in getattr(automation.trigger, "expect", ()):
                continue
            for action in automation.actions:
                deployment_id = getattr(action, "deployment_id", None)
                if deployment_id is None or not automation.name.startswith("summarize-run"):
                    continue
                try:
                    deployment = client.read_deployment(deployment_id)
                except ObjectNotFound:
                    continue
                return f"summarize-run/{deployment.name}"
    return None


def prune_stale_automations() -> list[str]:
    """Delete the project's automations that run a deployment which no longer exists."""
    removed = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if not automation.name.startswith(("bedrock-batch:", "summarize-run:")):
                continue
            targets = [getattr(a, "deployment_id", None) for a in automation.actions]
            for deployment_id in filter(None, targets):
                try:
                    client.read_deployment(deployment_id)
                except ObjectNotFound:
                    client.delete_automation(automation.id)
                    removed.append(automation.name)
                    log.info(
                        "Removed %s: its deployment %s is gone", automation.name, deployment_id
                    )
                    break
    return removed


def notification_block_id(block_name: str, webhook_url: str | None = None) -> UUID | None:
    """The id of notification block `block_name`; created from `webhook_url` if it is missing.

    A hooks.slack.com URL makes a `slack-webhook` block; any other URL a
    `custom-webhook` block that POSTs the subject and body as JSON.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

    with get_client(sync_client=True) as client:
        for document in client.read_block_documents():
            if document.name == block_name and document.block_type is not None:
                if webhook_url is None:
                    return document.id
                break
    if webhook_url is None:
        return None
    if urlparse(webhook_url).hostname == "hooks.slack.com":
        block = SlackWebhook(url=webhook_url)
    else:
        block = CustomWebhookNotificationBlock(
            name=block_name,
            url=webhook_url,
            json_data={"subject": "{{subject}}", "text": "{{body}}"},
        )
    return block.save(block_name, overwrite=True)


def apply_automations(
    notification_block: str = NOTIFICATION_BLOCK,
    webhook_url: str | None = None,
    summarize_deployment: str = SUMMARIZE_DEPLOYMENT,
    heartbeat_seconds: int = 90,
) -> dict[str, str]:
    """Create or update the project's automations by name; safe to run again.

    Args:
        notification_block: Name of the notification block the stalled alert and the run
            finished / failed notifications go through.
        webhook_url: Creates (or replaces) that block as a Slack or custom webhook first.
        summarize_deployment: `flow/deployment` run when a batch run finishes.
        heartbeat_seconds: Missing-heartbeat time after which a flow run is crashed.

    Returns:
        `{automation name: "applied" or the reason it was skipped}`.
    """
    result: dict[str, str] = {}
    for name in prune_stale_automations():
        result[name] = "removed: its deployment no longer exists"

    block_id = notification_block_id(notification_block, webhook_url)
    notifications = {
        STALLED_AUTOMATION: lambda: stalled_notification_automation(block_id),
        RUN_FINISHED_NOTIFY_AUTOMATION: lambda: run_notification_automation(
            RUN_FINISHED_NOTIFY_AUTOMATION,
            RUN_FINISHED,
            block_id,
            RUN_FINISHED_SUBJECT,
            RUN_FINISHED_BODY,
        ),
        RUN_FAILED_NOTIFY_AUTOMATION: lambda: run_notification_automation(
            RUN_FAILED_NOTIFY_AUTOMATION, RUN_FAILED, block_id, RUN_FAILED_SUBJECT, RUN_FAILED_BODY
        ),
    }
    for name, build in notifications.items():
        if block_id is None:
            result[name] = (
                f"skipped: no notification block named {notification_block!r}; create one in "
                "the UI (Blocks → Slack Webhook / Custom Webhook / Email) or pass --webhook-url"
            )
        else:
            upsert_automation(build())
            result[name] = "applied"

    deployment_id = _deployment_id(summarize_deployment)
    if deployment_id is None and summarize_deployment == SUMMARIZE_DEPLOYMENT:
        # `bedrock-batch serve` names its deployment apart from the one prefect.yaml deploys.
        deployment_id = _deployment_id(SUMMARIZE_DEPLOYMENT + "-served")
    if deployment_id is None:
        result[SUMMARIZE_AUTOMATION] = (
            f"skipped: no deployment {summarize_deployment!r}; run `prefect deploy --all` "
            f"or `bedrock-batch serve` first"
        )
    elif _deployment_has_own_trigger(deployment_id, RUN_FINISHED):
        result[SUMMARIZE_AUTOMATION] = "skipped: the deployment carries its own trigger"
    else:
        upsert_automation(summarize_automation(deployment_id))
        result[SUMMARIZE_AUTOMATION] = "applied"

    upsert_automation(zombie_automation(heartbeat_seconds))
    result[ZOMBIE_AUTOMATION] = "applied"
    for name, outcome in result.items():
        log.info("%s: %s", name, outcome)
    return result
