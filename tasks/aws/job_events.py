"""Bedrock job state change events: EventBridge → SQS → Prefect events → the run waiting on them.

Bedrock puts a "Batch Inference Job State Change" event on the default EventBridge bus at every
status change of a batch job (Bedrock user guide, monitoring-eventbridge-how-it-works.html).
``setup_job_events`` routes them to an SQS queue; a **relay** in any running process turns each
queued message into one Prefect event; a run's **listener** subscribes to the Prefect events of
its own jobs (by the run key their names start with) and hands each status to ``deliver``.
Delivery is best effort: EventBridge may drop or reorder events and SQS standard queues may
repeat them, so polling stays the fallback and a status from an event is a hint to look now.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoRegionError

from tasks.aws.clients import client
from tasks.errors import RunSettingsError
from tasks.monitoring.events import JOB_STATE_CHANGED, job_state_changed_event, run_key_resource_id
from tasks.settings import get_settings

# What a run calls for each status an event tells: (job ARN, status, failure message or None).
Deliver = Callable[[str, str, "str | None"], None]
# What a run is told when events stop reaching it (False) and when they do again (True).
Flowing = Callable[[bool], None]

DEFAULT_QUEUE_NAME = "bedrock-batch-job-events"
DEFAULT_RULE_NAME = "bedrock-batch-job-events"
# Where setup leaves the queue URL for runs that have no BEDROCK_BATCH_EVENTS_QUEUE_URL.
QUEUE_URL_VARIABLE = "bedrock-batch-events-queue-url"
TARGET_ID = "bedrock-batch-job-events-queue"
# Bedrock user guide, monitoring-eventbridge-how-it-works.html: source and detail-type of the
# events Bedrock sends for batch inference jobs.
EVENT_PATTERN = {"source": ["aws.bedrock"], "detail-type": ["Batch Inference Job State Change"]}
# SQS API reference, ReceiveMessage: MaxNumberOfMessages is 1 to 10.
RECEIVE_BATCH = 10
# EventBridge ids already turned into Prefect event ids by a listener (dedup after reconnects).
_SEEN_LIMIT = 10_000
# Prefect event ids are uuid5 of EventBridge's id in this namespace: the same message relayed
# twice, by one process or two, is the same event on the Prefect server.
_EVENT_NAMESPACE = uuid.UUID("6f1c2a52-5d0e-4a43-9a0c-2b7f64a1d3e9")

log = logging.getLogger("bedrock_batch.job_events")


def _queue_arn(queue_url: str) -> str:
    """The queue's ARN; the call also proves the queue is there and readable by us."""
    attributes = client("sqs").get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    return attributes["Attributes"]["QueueArn"]


# -- setup -------------------------------------------------------------------------------------


def queue_policy(queue_arn: str, rule_arn: str) -> dict[str, Any]:
    """Let EventBridge send this rule's events to the queue, and nothing else.

    EventBridge user guide, "Permissions for Amazon SQS" (eb-use-resource-based.html#eb-sqs-
    permissions): principal events.amazonaws.com, sqs:SendMessage, aws:SourceArn = the rule.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "BedrockJobEventsFromEventBridge",
                "Effect": "Allow",
                "Principal": {"Service": "events.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}},
            }
        ],
    }


def setup_job_events(
    queue_name: str = DEFAULT_QUEUE_NAME, rule_name: str = DEFAULT_RULE_NAME
) -> str:
    """Create (or update) the queue, its policy, the rule and its target; store the queue URL.

    Idempotent: running it again changes nothing. Runs find the queue through the Prefect
    Variable ``bedrock-batch-events-queue-url`` (or BEDROCK_BATCH_EVENTS_QUEUE_URL).

    Args:
        queue_name: The SQS queue the events go to.
        rule_name: The EventBridge rule on the default bus that matches Bedrock's events.

    Returns:
        The queue URL.
    """
    try:
        sqs, events = client("sqs"), client("events")
        queue_url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
        queue_arn = _queue_arn(queue_url)
        rule_arn = events.put_rule(
            Name=rule_name,
            EventPattern=json.dumps(EVENT_PATTERN),
            State="ENABLED",
            Description="Amazon Bedrock batch job state changes, to the bedrock-batch queue",
        )["RuleArn"]
        sqs.set_queue_attributes(
            QueueUrl=queue_url,
            Attributes={"Policy": json.dumps(queue_policy(queue_arn, rule_arn))},
        )
        # A target with the same Id is replaced, so the rule keeps one target.
        result = events.put_targets(Rule=rule_name, Targets=[{"Id": TARGET_ID, "Arn": queue_arn}])
    except (NoRegionError, EndpointConnectionError) as exc:
        msg = (
            f"Cannot reach SQS and EventBridge ({exc}): set AWS_DEFAULT_REGION (or "
            "BEDROCK_BATCH_REGION) and credentials for the account whose Bedrock jobs to follow."
        )
        raise RunSettingsError(msg) from None
    if result.get("FailedEntryCount"):
        entry = result["FailedEntries"][0]
        msg = (
            f"EventBridge refused queue {queue_arn} as a target of rule {rule_name}: "
            f"{entry.get('ErrorCode')}: {entry.get('ErrorMessage')}"
        )
        raise RunSettingsError(msg)
    _store_queue_url(queue_url)
    return queue_url


def _store_queue_url(queue_url: str) -> None:
    from prefect.variables import Variable

    try:
        Variable.set(QUEUE_URL_VARIABLE, queue_url, overwrite=True)
    except Exception as exc:
        msg = (
            f"The queue {queue_url} and its rule are ready, but the Prefect Variable "
            f"{QUEUE_URL_VARIABLE} could not be stored ({exc}): set "
            f"BEDROCK_BATCH_EVENTS_QUEUE_URL={queue_url} for the runs, or run setup again once "
            "the Prefect server is reachable."
        )
        raise RunSettingsError(msg) from None


def configured_queue_url() -> str | None:
    """The queue to relay: BEDROCK_BATCH_EVENTS_QUEUE_URL, else the Variable setup stored."""
    url = get_settings().events.queue_url
    if url:
        return url
    from prefect.variables import Variable

    try:
        found = Variable.get(QUEUE_URL_VARIABLE, default=None)
    except Exception as exc:  # noqa: BLE001 - no Prefect Variable means no events, not a failure
        log.warning("Could not read the Prefect Variable %s: %s", QUEUE_URL_VARIABLE, exc)
        return None
    return found if isinstance(found, str) and found else None


# -- relay: SQS → Prefect events ---------------------------------------------------------------


def prefect_event_id(eventbridge_id: str) -> uuid.UUID:
    """The Prefect event id of an EventBridge event: the same for every copy of it."""
    return uuid.uuid5(_EVENT_NAMESPACE, eventbridge_id)


def _is_job_state_change(envelope: Any) -> bool:
    """Whether an EventBridge event is Bedrock's batch job state change, whole enough to use.

    Source and detail-type as the rule matches them; the detail names the job and its status
    as strings (``batchJobArn``, ``status``: the Bedrock user guide's sample event,
    monitoring-eventbridge-how-it-works.html). Anything else on the queue (a wider rule, a
    hand-sent test message) must be dropped, never raise: a message that fails the relay
    comes back after every visibility timeout and takes the events received with it along.
    """
    if not isinstance(envelope, dict):
        return False
    detail = envelope.get("detail")
    return (
        envelope.get("source") == EVENT_PATTERN["source"][0]
        and envelope.get("detail-type") == EVENT_PATTERN["detail-type"][0]
        and isinstance(detail, dict)
        and all(isinstance(detail.get(k), str) and detail[k] for k in ("batchJobArn", "status"))
    )


def event_from_message(body: str):
    """The Prefect event of one SQS message body (an EventBridge event), or None if not ours."""
    try:
        envelope = json.loads(body)
        if not _is_job_state_change(envelope):
            return None
        return job_state_changed_event(
            prefect_event_id(str(envelope["id"])), envelope["detail"], envelope.get("time")
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class _Backoff:
    """Doubling waits up to the settings' maximum, reset after a success."""

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self.next = 1.0

    def take(self) -> float:
        wait, self.next = self.next, min(self.next * 2, self.maximum)
        return min(wait, self.maximum)

    def reset(self) -> None:
        self.next = 1.0


async def _in_daemon_thread(call: Callable[[], Any]) -> Any:
    """``call()`` in a daemon thread of its own, awaited.

    Not ``asyncio.to_thread``: its executor's threads are joined at interpreter exit, so a
    process ending during a 20-second long poll would hang until the poll returned.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        result, error = None, None
        try:
            result = context.run(call)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="job-event-relay-call", daemon=True).start()
    return await future


class JobEventRelay:
    """Turns every message of the queue into one Prefect event, then deletes the message.

    Any number of relays may share a queue (competing consumers): SQS hides a received
    message from the others for the visibility timeout, and a message that comes twice
    becomes the same Prefect event (its id derives from EventBridge's). Errors are logged and
    retried with backoff; ``stop`` returns at once and the thread ends after its current
    long poll, relaying what that poll brought.
    """

    def __init__(self, queue_url: str, flowing: Flowing | None = None) -> None:
        self.queue_url = queue_url
        self.flowing = flowing  # told when relaying fails and when it works again
        self.relayed = 0  # messages turned into Prefect events (copies included)
        self.polls = 0  # ReceiveMessage calls started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> JobEventRelay:
        """Relay in a daemon thread (with this context's Prefect settings)."""
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(asyncio.run, self._main()), name="job-event-relay"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the relay to end; wait at most ``timeout`` seconds for it."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the relay's thread is still alive."""
        return bool(self._thread and self._thread.is_alive())

    async def _main(self) -> None:
        from prefect.events.clients import get_events_client

        settings = get_settings().events
        backoff = _Backoff(settings.retry_max_seconds)
        while not self._stop.is_set():
            try:
                # checkpoint_every=1: each emit waits for the server's pong, so a message is
                # deleted only once its event reached the server.
                async with get_events_client(checkpoint_every=1) as prefect_events:
                    # Up once both ends answer: a queue gone or denied would otherwise flap
                    # up and down with every retry.
                    await _in_daemon_thread(functools.partial(_queue_arn, self.queue_url))
                    self._report(True)
                    await self._pumps(prefect_events, settings.receivers, backoff)
            except Exception as exc:  # noqa: BLE001 - never fatal: log, wait, try again
                self._report(False)
                wait = backoff.take()
                log.warning(
                    "Relaying job events from %s to the Prefect server failed (%s); retrying "
                    "in %.0f s",
                    self.queue_url,
                    _describe(exc),
                    wait,
                )
                await _in_daemon_thread(functools.partial(self._stop.wait, wait))

    def _report(self, flowing: bool) -> None:
        if self.flowing is not None and not self._stop.is_set():
            self.flowing(flowing)

    async def _pumps(self, prefect_events, count: int, backoff: _Backoff) -> None:
        """``count`` receive → emit → delete loops side by side, until one fails or stop.

        One loop relayed ~75 events a second at best (a receive, ten emits each confirmed by
        the server, a delete: ~135 ms a batch on the local stack), so the hundreds of jobs of a
        gate of 100 changing state together queued their events for 5-10 s. Several receivers
        of one queue are SQS's own way to more throughput; each waits on its own long poll.
        """

        async def pump() -> None:
            while not self._stop.is_set():
                messages = await _in_daemon_thread(self._receive)
                if messages:
                    await self._relay(prefect_events, messages)
                backoff.reset()

        pumps = [asyncio.ensure_future(pump()) for _ in range(count)]
        try:
            await asyncio.gather(*pumps)
        finally:
            for running in pumps:
                running.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def _receive(self) -> list[dict]:
        settings = get_settings().events
        self.polls += 1
        return (
            client("sqs")
            .receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=RECEIVE_BATCH,
                WaitTimeSeconds=settings.wait_seconds,
                VisibilityTimeout=settings.visibility_timeout_seconds,
            )
            .get("Messages", [])
        )

    async def _relay(self, prefect_events, messages: list[dict]) -> None:
        done = []
        for message in messages:
            event = event_from_message(message["Body"])
            if event is None:
                # Not a Bedrock job event (a wider rule, a test message): nobody can use it,
                # and left in the queue it would come back forever.
                log.warning("Dropping SQS message %s: not a job state change", message["MessageId"])
            else:
                await prefect_events.emit(event)
                self.relayed += 1
            done.append(message)
        await _in_daemon_thread(functools.partial(self._delete, done))

    def _delete(self, messages: list[dict]) -> None:
        # One DeleteMessageBatch for what one receive brought (at most ten, as the batch
        # allows): AWS authorizes it as sqs:DeleteMessage (SQS developer guide,
        # sqs-batch-api.html, "Permissions"), the action the printed policy grants.
        if not messages:
            return
        entries = [
            {"Id": str(n), "ReceiptHandle": message["ReceiptHandle"]}
            for n, message in enumerate(messages)
        ]
        try:
            result = client("sqs").delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except ClientError as exc:
            # Their events are on the server; the copies that come back are the same events.
            log.warning("Could not delete %d relayed job events: %s", len(entries), _describe(exc))
            return
        for failed in result.get("Failed", []):
            log.warning(
                "Could not delete a relayed job event: %s: %s",
                failed.get("Code"),
                failed.get("Message"),
            )


# -- listener: Prefect events → deliver ----------------------------------------------------------


class JobEventListener:
    """Calls ``deliver`` for each job state change event related to ``run_key``.

    A subscription that drops is opened again after a backoff, by this class rather than
    inside Prefect's subscriber, so that ``flowing`` hears of the gap: the events of a Prefect
    server restart can be lost (see ``job_events``). An error of ``deliver`` is logged and the
    next event still comes.
    """

    def __init__(self, run_key: str, deliver: Deliver, flowing: Flowing | None = None) -> None:
        self.run_key = run_key
        self.deliver = deliver
        self.flowing = flowing  # told when the subscription drops and when it is back
        self.connected = threading.Event()
        self._down_since: float | None = None  # time.monotonic() of a drop not mended yet
        self._stopping = threading.Event()
        self._seen: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> JobEventListener:
        """Listen in a daemon thread (with this context's Prefect settings)."""
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"job-event-listener-{self.run_key}"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the subscription and the thread."""
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(task.cancel)
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._main())
            if self._stopping.is_set():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        finally:
            loop.close()

    def _filter(self):
        from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

        # any_resource, not related: Prefect 3.8.8's server applies a related filter to stored
        # events only, and streams every event to a subscriber whatever its related filter
        # (prefect/server/events/filters.py EventRelatedFilter has no `includes`).
        return EventFilter(
            event=EventNameFilter(name=[JOB_STATE_CHANGED]),
            any_resource=EventAnyResourceFilter(id=[run_key_resource_id(self.run_key)]),
        )

    async def _main(self) -> None:
        from prefect.events.clients import get_events_subscriber

        backoff = _Backoff(get_settings().events.retry_max_seconds)
        while not self._stopping.is_set():
            try:
                # reconnection_attempts=0: a drop ends the iteration here instead of being
                # mended silently inside the subscriber, which would hide the gap.
                async with get_events_subscriber(
                    filter=self._filter(), reconnection_attempts=0
                ) as subscriber:
                    self._connected(True)
                    backoff.reset()
                    async for event in subscriber:
                        self._handle(event)
                problem = "the server closed the stream"
            except Exception as exc:  # noqa: BLE001 - never fatal: log, wait, subscribe again
                problem = _describe(exc)
            if self._stopping.is_set():
                return
            self._connected(False)
            wait = backoff.take()
            log.warning(
                "Listening for job events of run key %s stopped (%s); polling Bedrock at the "
                "poll interval, subscribing again in %.0f s",
                self.run_key,
                problem,
                wait,
            )
            await asyncio.sleep(wait)

    def _connected(self, up: bool) -> None:
        if up:
            self.connected.set()
            if self._down_since is not None:
                # The bookend of the warnings above, so an operator sees the gap closed.
                log.warning(
                    "Listening for job events of run key %s again after %.0f s",
                    self.run_key,
                    time.monotonic() - self._down_since,
                )
            self._down_since = None
        else:
            self.connected.clear()
            if self._down_since is None:
                self._down_since = time.monotonic()
        if self.flowing is not None:
            self.flowing(up)

    def _handle(self, event) -> None:
        mine = run_key_resource_id(self.run_key)
        if event.id in self._seen or not any(r.id == mine for r in event.related):
            return
        self._seen[event.id] = None
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        payload = event.payload
        try:
            self.deliver(
                payload["batchJobArn"], payload["status"], payload.get("failureMessage") or None
            )
        except Exception:  # noqa: BLE001 - a failing callback must not end the subscription
            log.exception("deliver failed for a job event of %s", payload.get("batchJobArn"))


# -- the entry point of a run ----------------------------------------------------------------


class _Feed:
    """Whether job events reach the run: its relay and its listener both working.

    Tells ``flowing`` of each change, from either thread, once the feed has started. Both
    parts start up: ``_start`` only returns them once the listener is subscribed.
    """

    def __init__(self, flowing: Flowing | None) -> None:
        self.flowing = flowing
        self.started = False
        self._up = {"relay": True, "listener": True}
        self._lock = threading.Lock()

    def part(self, name: str) -> Flowing:
        return functools.partial(self._set, name)

    def start(self) -> None:
        """From now on changes are told; a part already down is told at once."""
        with self._lock:
            self.started = True
            down = not all(self._up.values()) and self.flowing is not None
        if down:
            self.flowing(False)

    def _set(self, name: str, up: bool) -> None:
        with self._lock:
            before = all(self._up.values())
            self._up[name] = up
            after = all(self._up.values())
            tell = self.started and before != after and self.flowing is not None
        if tell:
            self.flowing(after)


@contextlib.contextmanager
def job_events(run_key: str, deliver: Deliver, flowing: Flowing | None = None) -> Iterator[bool]:
    """Relay the queue and listen for this run's job events while the block runs.

    Yields True when events are flowing to ``deliver``, False when the run must rely on
    polling alone (no queue configured, the queue is gone, or Prefect's event stream is
    unreachable); never raises for that. Both threads stop when the block ends.

    Events can go missing while the run listens: a Prefect server that restarts loses the
    events it had confirmed but not yet stored, and a message whose relay failed stays hidden
    in the queue for its visibility timeout. Measured on the local stack (200 jobs of 2 s,
    the server restarted mid-run): jobs that ended in the restart were seen 60 s and 285 s
    late, by the queue's redelivery and by the slow fallback poll. So ``flowing`` hears when
    either part stops (False) and when both work again (True), for the run to poll Bedrock
    meanwhile and once more at the end of the gap.

    Args:
        run_key: The run key every job name of the run starts with (``run_key``).
        deliver: Called with (job ARN, status, failure message or None) for each event.
        flowing: Called with False when events stop reaching the run, True when they do again.
    """
    feed = _Feed(flowing)
    relay: JobEventRelay | None = None
    listener: JobEventListener | None = None
    try:
        relay, listener = _start(run_key, deliver, feed)
    except Exception as exc:  # noqa: BLE001 - events are an optimisation; polling remains
        log.warning("Job events unavailable for run key %s, polling only: %s", run_key, exc)
    try:
        yield relay is not None
    finally:
        feed.flowing = None  # the run is past listening
        if relay is not None:
            relay.stop()
        if listener is not None:
            listener.stop()


def _start(
    run_key: str, deliver: Deliver, feed: _Feed
) -> tuple[JobEventRelay | None, JobEventListener | None]:
    queue_url = configured_queue_url()
    if not queue_url:
        log.info(
            "No job events queue (BEDROCK_BATCH_EVENTS_QUEUE_URL or the Prefect Variable %s; "
            "`bedrock-batch events setup` creates one): polling only",
            QUEUE_URL_VARIABLE,
        )
        return None, None
    try:
        _queue_arn(queue_url)
    except (ClientError, BotoCoreError) as exc:
        msg = f"the queue {queue_url} cannot be read ({_describe(exc)})"
        raise RuntimeError(msg) from None
    listener = JobEventListener(run_key, deliver, feed.part("listener")).start()
    if not listener.connected.wait(get_settings().events.listen_timeout_seconds):
        listener.stop()
        msg = "the Prefect event stream (websocket /events/out) did not accept a subscription"
        raise RuntimeError(msg)
    relay = JobEventRelay(queue_url, feed.part("relay")).start()
    feed.start()
    log.info("Job events on for run key %s from %s", run_key, queue_url)
    return relay, listener


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code')}: {error.get('Message')}"
    if not str(exc):
        # Prefect's events client asserts it has a websocket after a failed reconnect: a bare
        # "AssertionError: " said nothing; where it was raised says which connection failed.
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = ""
        if frame:
            path = frame.filename.replace("\\", "/")
            module = path.rsplit("site-packages/", 1)[-1] if "site-packages/" in path else path
            where = f" at {module}:{frame.lineno}"
        return f"{type(exc).__name__}{where}, no message"
    return f"{type(exc).__name__}: {exc}"
