"""Publisher of Bedrock's "Batch Inference Job State Change" events to EventBridge."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING

from tasks.bedrock.model_ids import profile_prefix

from .state import publisher_client

if TYPE_CHECKING:
    from .models import Job

# Amazon Bedrock user guide, "Monitor Amazon Bedrock job state changes using Amazon
# EventBridge" (monitoring-eventbridge-how-it-works.html): Bedrock puts these on the account's
# default event bus on every status change of a batch inference job.
SOURCE = "aws.bedrock"
DETAIL_TYPE = "Batch Inference Job State Change"
DETAIL_VERSION = "0.0"
# EventBridge API reference, PutEvents: "Entries ... Maximum number of 10 items".
MAX_ENTRIES_PER_PUT = 10
# Sends of one batch before it is dropped: EventBridge delivery is best effort, and a
# consumer (the project's poller) must not depend on every event.
PUT_ATTEMPTS = 3
# A stuck EventBridge must not make the emulator hold every event of a long session.
MAX_QUEUED = 10_000

log = logging.getLogger("emulator.events")


def model_arn(model_id: str, region: str, account_id: str) -> str:
    """batchModelId the way the event shows it: a foundation-model (or profile) ARN.

    The AWS sample shows ``arn:aws:bedrock:us-east-1::foundation-model/<id>``; an id with a
    geography prefix names a cross-Region inference profile, whose ARN carries the account.
    """
    if model_id.startswith("arn:"):
        return model_id
    if profile_prefix(model_id):
        return f"arn:aws:bedrock:{region}:{account_id}:inference-profile/{model_id}"
    return f"arn:aws:bedrock:{region}::foundation-model/{model_id}"


def creation_time(moment: datetime) -> str:
    """creationTime as the AWS sample writes it: ``Aug 28, 2024, 10:47:53 PM`` (UTC)."""
    return f"{moment:%b} {moment.day}, {moment.year}, {moment.hour % 12 or 12}:{moment:%M:%S %p}"


def state_change_entry(job: Job, region: str, account_id: str) -> dict:
    """The PutEvents entry Bedrock sends for the status `job` has now."""
    detail = {
        "version": DETAIL_VERSION,
        "accountId": account_id,
        "batchJobName": job.name,
        "batchJobArn": job.arn,
        "batchModelId": model_arn(job.model_id, region, account_id),
        "status": job.status.value,
        "failureMessage": job.message or "",
        "creationTime": creation_time(job.submit_time),
    }
    return {
        "Source": SOURCE,
        "DetailType": DETAIL_TYPE,
        "Resources": [job.arn],
        "Detail": json.dumps(detail),
        "Time": job.last_modified or job.submit_time,
    }


class JobEventPublisher:
    """Puts one event per job status change to EventBridge's default bus, in order.

    `job_changed` only queues the event (it runs under the backend's lock); a daemon thread
    sends them, so a slow or failing EventBridge never delays or breaks a job.
    """

    def __init__(self, endpoint_url: str | None, region: str, account_id: str):
        self.region = region
        self.account_id = account_id
        self.client = publisher_client("events", endpoint_url, region)
        self._queue: queue.Queue[dict | None] = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self._dropped = 0

    def start(self) -> None:
        """Send in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="bedrock-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is queued, then stop."""
        if self._thread:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def job_changed(self, job: Job) -> None:
        """Queue the event of `job`'s current status (called at every transition)."""
        try:
            self._queue.put_nowait(state_change_entry(job, self.region, self.account_id))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("EventBridge is behind: %d job events dropped", self._dropped)

    def _loop(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            batch = [entry]
            while len(batch) < MAX_ENTRIES_PER_PUT:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._put(batch)
                    return
                batch.append(more)
            self._put(batch)

    def _put(self, batch: list[dict]) -> None:
        for attempt in range(1, PUT_ATTEMPTS + 1):
            try:
                failed = self.client.put_events(Entries=batch).get("FailedEntryCount", 0)
            except Exception as exc:  # noqa: BLE001 - events must never take the emulator down
                if attempt == PUT_ATTEMPTS:
                    log.warning("dropping %d job events: PutEvents failed: %s", len(batch), exc)
                else:
                    time.sleep(0.2 * 2**attempt)  # back off from an EventBridge in trouble
                continue
            if failed:
                log.warning("EventBridge refused %d of %d job events", failed, len(batch))
            return
