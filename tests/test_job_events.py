"""Job events end to end on the local stack: emulator → moto EventBridge → SQS → relay →
Prefect event → listener → deliver; the fallbacks when events are unavailable; `events setup`."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from helpers import assert_answers_match_rows, create_job, eventually
from prefect.variables import Variable

from emulator import LocalStack
from emulator.events import state_change_entry
from flows.cli import main
from tasks.aws import iam
from tasks.aws.job_events import (
    QUEUE_URL_VARIABLE,
    TARGET_ID,
    JobEventRelay,
    event_from_message,
    job_events,
    prefect_event_id,
    setup_job_events,
)
from tasks.aws.submit import job_name_for, run_key
from tasks.aws.watcher import JobWatcher
from tasks.monitoring.events import JOB_RESOURCE_PREFIX, JOB_STATE_CHANGED, read_events
from tasks.run.layout import layout_for
from tasks.settings import get_settings

LOGGER = "bedrock_batch.job_events"
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
FINAL = {"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _settings(monkeypatch, **env: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


@pytest.fixture
def events_queue(stack, monkeypatch):
    """A queue and rule of this test's own, named by BEDROCK_BATCH_EVENTS_QUEUE_URL."""
    name = _unique("jobev")
    queue_url = setup_job_events(queue_name=name, rule_name=name)
    # One-second long polls: a stopped relay's thread ends within a second in tests.
    _settings(
        monkeypatch,
        BEDROCK_BATCH_EVENTS_QUEUE_URL=queue_url,
        BEDROCK_BATCH_EVENTS_WAIT_SECONDS="1",
    )
    yield queue_url
    monkeypatch.undo()
    get_settings.cache_clear()
    Variable.unset(QUEUE_URL_VARIABLE)  # setup stored it: later runs must not find this queue
    # Rule first: moto's PutEvents fails whole (QueueDoesNotExist) while any rule targets a
    # deleted queue, which would silence the emulator's events for the rest of the session.
    events = stack.client("events")
    events.remove_targets(Rule=name, Ids=[TARGET_ID])
    events.delete_rule(Name=name)
    with contextlib.suppress(stack.client("sqs").exceptions.QueueDoesNotExist):
        stack.client("sqs").delete_queue(QueueUrl=queue_url)


def _run_job(stack, key: str) -> tuple[str, str]:
    """A 100-record job on the emulator named like a run's (the key leads); (ARN, name)."""
    name = job_name_for(_unique("evrun"), "shard-00000", 1, key)
    lines = [
        {
            "recordId": f"r{i:05d}",
            "modelInput": {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": f"Question {i}"}],
            },
        }
        for i in range(100)
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\n"
    stack.client("s3").put_object(Bucket=stack.bucket, Key=f"in/{name}.jsonl", Body=body.encode())
    return create_job(stack, name, f"s3://{stack.bucket}/in/{name}.jsonl", MODEL), name


def _wait_final(stack, arn: str) -> None:
    bedrock = stack.client("bedrock")
    eventually(
        lambda: bedrock.get_model_invocation_job(jobIdentifier=arn)["status"] in FINAL,
        what=f"{arn} final",
    )


def _key() -> str:
    return run_key(_unique("run"), "s3://bucket/runs", uuid.uuid4().hex)


def _queue_empty(stack, queue_url: str) -> bool:
    attributes = stack.client("sqs").get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(int(v) == 0 for v in attributes.values())


def _prefect_events(arn: str) -> list:
    job_id = arn.rsplit("/", 1)[-1]
    return read_events(names=[JOB_STATE_CHANGED], resource_ids=[JOB_RESOURCE_PREFIX + job_id])


def test_job_events_deliver_a_completed_job_to_its_run_only(stack, events_queue):
    key, other_key = _key(), _key()
    delivered: list[tuple] = []

    with job_events(key, lambda *args: delivered.append(args)) as active:
        assert active is True
        arn, name = _run_job(stack, key)
        other_arn, _ = _run_job(stack, other_key)
        started = time.monotonic()
        eventually(lambda: (arn, "Completed", None) in delivered, timeout=10, what="Completed")
        took = time.monotonic() - started
        # The other run's job reached Prefect too, yet was not delivered to this run.
        eventually(
            lambda: any(e.payload["status"] == "Completed" for e in _prefect_events(other_arn)),
            what="the other run's Completed event in Prefect",
        )
        eventually(lambda: _queue_empty(stack, events_queue), what="every message deleted")

    assert took < 5
    assert {a for a, _, _ in delivered} == {arn}
    walked = stack.ledger(name)[0]["statusHistory"]
    assert sorted(s for _, s, _ in delivered) == sorted(walked)
    event = next(e for e in _prefect_events(arn) if e.payload["status"] == "Completed")
    assert event.resource["bedrock.job-arn"] == arn
    assert event.resource.name == name
    assert event.payload["batchJobName"] == name and event.payload["failureMessage"] == ""
    assert event.payload["time"]
    related = {r.id: r.role for r in event.related}
    assert related["bedrock.batch.run-key." + key] == "bedrock-batch-run-key"
    assert related["bedrock.model.anthropic.claude-3-haiku-20240307-v1:0"] == "bedrock-model"


def test_job_events_delivers_the_failure_message(stack, events_queue):
    key = _key()
    delivered: list[tuple] = []
    stack.set_faults(fail_job_names_containing=key, fail_message="Emulated failure (events)")

    with job_events(key, lambda *args: delivered.append(args)):
        arn, _ = _run_job(stack, key)
        eventually(lambda: (arn, "Failed", "Emulated failure (events)") in delivered, what="Failed")


def test_two_relays_on_one_queue_make_each_message_one_prefect_event(stack, events_queue):
    arn, name = _run_job(stack, _key())
    _wait_final(stack, arn)
    walked = stack.ledger(name)[0]["statusHistory"]
    sqs = stack.client("sqs")
    # SQS standard queues deliver at least once: put a second copy of one message.
    first = sqs.receive_message(QueueUrl=events_queue, VisibilityTimeout=0)["Messages"][0]
    sqs.send_message(QueueUrl=events_queue, MessageBody=first["Body"])

    relays = [JobEventRelay(events_queue).start() for _ in range(2)]
    try:
        eventually(
            lambda: (
                sum(r.relayed for r in relays) >= len(walked) + 1
                and _queue_empty(stack, events_queue)
            ),
            what="both copies relayed and every message deleted",
        )
    finally:
        for relay in relays:
            relay.stop()

    events = eventually(lambda: len(_prefect_events(arn)) >= len(walked) and _prefect_events(arn))
    assert sorted(e.payload["status"] for e in events) == sorted(walked)
    assert len({e.id for e in events}) == len(walked)
    assert sum(r.relayed for r in relays) == len(walked) + 1  # the copy was relayed, as one event


def test_job_events_without_a_queue_yields_false_and_logs(stack, monkeypatch, caplog):
    from prefect.variables import Variable

    monkeypatch.delenv("BEDROCK_BATCH_EVENTS_QUEUE_URL", raising=False)
    get_settings.cache_clear()
    Variable.unset(QUEUE_URL_VARIABLE)
    caplog.set_level(logging.INFO, logger=LOGGER)

    with job_events(_key(), lambda *args: None) as active:
        assert active is False

    assert "No job events queue" in caplog.text and "polling only" in caplog.text


def test_job_events_with_a_deleted_queue_yields_false_and_logs(stack, events_queue, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stack.client("sqs").delete_queue(QueueUrl=events_queue)
    try:
        with job_events(_key(), lambda *args: None) as active:
            assert active is False
    finally:
        # No job may run while the rule targets a deleted queue (see events_queue).
        name = events_queue.rsplit("/", 1)[-1]
        stack.client("events").remove_targets(Rule=name, Ids=[TARGET_ID])

    assert f"the queue {events_queue} cannot be read" in caplog.text
    assert "polling only" in caplog.text


def test_job_events_finds_the_queue_in_the_prefect_variable(stack, events_queue, monkeypatch):
    # setup_job_events stored the URL; without the setting a run still finds the queue.
    monkeypatch.delenv("BEDROCK_BATCH_EVENTS_QUEUE_URL")
    get_settings.cache_clear()
    key = _key()
    delivered: list[tuple] = []

    with job_events(key, lambda *args: delivered.append(args)) as active:
        assert active is True
        arn, _ = _run_job(stack, key)
        eventually(lambda: (arn, "Completed", None) in delivered, what="Completed")


def test_a_burst_of_events_is_relayed_once_through_several_long_polls(
    stack, events_queue, monkeypatch
):
    # A gate of 100 whose jobs change state together puts hundreds of events on the queue at
    # once; one receive-emit-delete loop left them waiting 5-10 s (400 jobs, gate 100).
    _settings(monkeypatch, BEDROCK_BATCH_EVENTS_RECEIVERS="3")
    receiving, most, lock = [0], [0], threading.Lock()
    real_receive = JobEventRelay._receive

    def counted_receive(self):
        with lock:  # each receive runs in a thread of its own
            receiving[0] += 1
            most[0] = max(most[0], receiving[0])
        try:
            return real_receive(self)
        finally:
            with lock:
                receiving[0] -= 1

    monkeypatch.setattr(JobEventRelay, "_receive", counted_receive)
    key = _key()
    arns = [
        f"arn:aws:bedrock:{stack.region}:123456789012:model-invocation-job/b{i:04d}"
        for i in range(60)
    ]
    delivered: list[tuple] = []
    with job_events(key, lambda *args: delivered.append(args)) as active:
        assert active is True
        eventually(lambda: most[0] == 3, what="three long polls at once")
        events = stack.client("events")
        for start in range(0, len(arns), 10):
            events.put_events(
                Entries=[_state_change(stack, key, arn) for arn in arns[start : start + 10]]
            )
        eventually(lambda: len(delivered) >= len(arns), what="every event delivered")
        eventually(lambda: _queue_empty(stack, events_queue), what="every message deleted")

    assert sorted(delivered) == [(arn, "Completed", None) for arn in arns]
    assert most[0] == 3


def _state_change(stack, key: str, arn: str) -> dict:
    """The PutEvents entry the emulator sends when a job of run ``key`` completes."""
    job = SimpleNamespace(
        name=job_name_for("burst", "shard-" + arn[-4:], 1, key),
        arn=arn,
        model_id=MODEL,
        status=SimpleNamespace(value="Completed"),
        message=None,
        submit_time=datetime.now(timezone.utc),
        last_modified=None,
    )
    return state_change_entry(job, stack.region, "123456789012")


def test_relay_retries_sqs_errors_and_stops_promptly(stack, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _settings(monkeypatch, BEDROCK_BATCH_EVENTS_WAIT_SECONDS="1")
    missing = stack.client("sqs").create_queue(QueueName=_unique("gone"))["QueueUrl"]
    stack.client("sqs").delete_queue(QueueUrl=missing)

    told: list[bool] = []
    relay = JobEventRelay(missing, told.append).start()
    eventually(lambda: caplog.text.count("retrying in") >= 2, what="two logged retries")
    assert relay.running  # an error is never fatal
    started = time.monotonic()
    relay.stop()
    assert time.monotonic() - started < 1.5
    eventually(lambda: not relay.running, timeout=5, what="the relay thread ends")
    get_settings.cache_clear()
    # The run hears that events stopped, and not "back" at every retry against a dead queue.
    assert told and set(told) == {False}


def test_a_message_twice_is_the_same_prefect_event():
    body = json.dumps(
        {
            "id": "a1b2c3d4",
            "time": "2024-08-28T22:47:53Z",
            "detail-type": "Batch Inference Job State Change",
            "source": "aws.bedrock",
            "detail": {
                "batchJobName": "0123abcd-run-shard-00000-a1",
                "batchJobArn": "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc",
                "batchModelId": "arn:aws:bedrock:us-east-1::foundation-model/m",
                "status": "Completed",
                "failureMessage": "",
            },
        }
    )
    first, second = event_from_message(body), event_from_message(body)
    assert first.id == second.id == prefect_event_id("a1b2c3d4")
    assert first.payload["time"] == "2024-08-28T22:47:53Z"
    assert event_from_message('{"detail-type": "Something else", "id": "x", "detail": {}}') is None
    assert event_from_message("not json") is None


def _envelope(**detail) -> str:
    return json.dumps(
        {
            "version": "0",
            "id": _unique("eb"),
            "detail-type": "Batch Inference Job State Change",
            "source": "aws.bedrock",
            "detail": detail,
        }
    )


ARN = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc"


@pytest.mark.parametrize(
    "body",
    [
        _envelope(batchJobArn=None, status="Completed"),
        _envelope(batchJobArn=42, status="Completed"),
        _envelope(batchJobArn=[ARN], status="Completed"),
        _envelope(batchJobArn="", status="Completed"),
        _envelope(batchJobArn=ARN),
        _envelope(batchJobArn=ARN, status=None),
        _envelope(batchJobArn=ARN, status=""),
        _envelope(batchJobArn=ARN, status={"value": "Completed"}),
        _envelope(batchJobArn=ARN, status="Completed").replace("aws.bedrock", "my.app"),
    ],
)
def test_a_message_that_is_not_a_whole_job_state_change_is_no_event(body):
    # A job state change names its job and its status (the Bedrock user guide's sample,
    # monitoring-eventbridge-how-it-works.html); one without them can tell a run nothing.
    assert event_from_message(body) is None


def test_a_malformed_message_is_dropped_and_the_event_beside_it_delivered(
    stack, events_queue, caplog
):
    # A batchJobArn that is not a string raised out of the relay: the events received with it
    # were never deleted, and the message came back after every visibility timeout to fail
    # the relay again (and tell the run that events stopped).
    caplog.set_level(logging.WARNING, logger=LOGGER)
    key = _key()
    arn = f"arn:aws:bedrock:{stack.region}:123456789012:model-invocation-job/poison0001"
    bad = _envelope(batchJobArn=None, status="Completed")
    delivered: list[tuple] = []
    told: list[bool] = []

    with job_events(key, lambda *args: delivered.append(args), told.append) as active:
        assert active is True
        # Sent once the run listens: an event relayed before its listener subscribed is
        # Prefect's to drop (the run's polls cover that), and this test is about the relay.
        stack.client("sqs").send_message(QueueUrl=events_queue, MessageBody=bad)
        stack.client("events").put_events(Entries=[_state_change(stack, key, arn)])
        eventually(lambda: delivered == [(arn, "Completed", None)], what="the good event")
        eventually(lambda: _queue_empty(stack, events_queue), what="both messages deleted")

    assert "retrying in" not in caplog.text
    assert "not a job state change" in caplog.text
    assert False not in told


def test_events_setup_twice_gives_one_queue_and_one_target(stack, capsys):
    name = _unique("clievents")
    args = ["events", "setup", "--queue-name", name, "--rule-name", name]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out

    assert first == second and len(first.splitlines()) == 1
    queue_url = stack.client("sqs").get_queue_url(QueueName=name)["QueueUrl"]
    assert queue_url in first and QUEUE_URL_VARIABLE in first
    targets = stack.client("events").list_targets_by_rule(Rule=name)["Targets"]
    assert len(targets) == 1
    attributes = stack.client("sqs").get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["Policy", "QueueArn"]
    )["Attributes"]
    assert targets[0]["Arn"] == attributes["QueueArn"]
    statement = json.loads(attributes["Policy"])["Statement"][0]
    rule_arn = stack.client("events").describe_rule(Name=name)["Arn"]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": rule_arn}}
    Variable.unset(QUEUE_URL_VARIABLE)  # later runs of the session must not find this queue


def test_events_setup_with_a_bad_queue_name_prints_one_line(stack, capsys):
    assert main(["events", "setup", "--queue-name", "no spaces allowed"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: AWS refused CreateQueue") and len(err.splitlines()) == 1


def test_runner_policy_lets_the_relay_read_the_events_queue():
    layout = layout_for("s3://bucket/runs", "run-1", None)
    role = "arn:aws:iam::123456789012:role/R"
    policy = iam.runner_policy(layout, role, ["m"], "us-east-1", "123456789012")

    statement = next(s for s in policy["Statement"] if s["Sid"] == "RelayJobEvents")
    assert statement["Resource"] == ["arn:aws:sqs:us-east-1:123456789012:bedrock-batch-job-events"]
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage"} <= set(statement["Action"])


@pytest.mark.slow
def test_relay_works_with_exactly_the_printed_runner_policy_on_an_iam_enforcing_stack(
    environment, caplog
):
    from prefect.variables import Variable

    with LocalStack(enforce_iam=True) as enforcing:
        caplog.set_level(logging.INFO, logger=LOGGER)
        environment(enforcing.env)  # the stack's admin: setup is an administrator's step
        queue_url = setup_job_events()
        Variable.unset(QUEUE_URL_VARIABLE)  # other tests must not find this stack's queue
        layout = layout_for(f"s3://{enforcing.bucket}/runs", "run-1", None)
        role = enforcing.env["BEDROCK_BATCH_ROLE_ARN"]
        policy = iam.runner_policy(layout, role, [MODEL], enforcing.region, "123456789012")
        without = copy.deepcopy(policy)
        without["Statement"] = [s for s in policy["Statement"] if s["Sid"] != "RelayJobEvents"]
        runner = enforcing.create_user("events-runner", policy)
        refused = enforcing.create_user("events-refused", without)
        settings = {"BEDROCK_BATCH_EVENTS_QUEUE_URL": queue_url}
        settings["BEDROCK_BATCH_EVENTS_WAIT_SECONDS"] = "1"
        key = _key()
        delivered: list[tuple] = []

        environment({**refused, **settings})
        with job_events(key, lambda *args: None) as active:
            assert active is False
        assert "AccessDenied" in caplog.text  # GetQueueAttributes, refused without the grant

        environment({**runner, **settings})
        with job_events(key, lambda *args: delivered.append(args)) as active:
            assert active is True
            # The emulator publishes with the stack's admin keys, as it puts its metrics.
            arn, _ = _run_job(enforcing, key)
            final = eventually(
                lambda: [s for a, s, _ in delivered if a == arn and s in FINAL],
                what="a final status delivered",
            )
            assert final == [
                enforcing.client("bedrock").get_model_invocation_job(jobIdentifier=arn)["status"]
            ]
            eventually(lambda: _queue_empty(enforcing, queue_url), what="messages deleted")


RELAY_PROCESS = """
import sys, time
from tasks.aws.job_events import JobEventRelay
relay = JobEventRelay(sys.argv[1]).start()
deadline = time.monotonic() + 60
while not relay.polls:
    assert time.monotonic() < deadline, "the relay never polled"
    time.sleep(0.05)
print("polling", flush=True)
"""


@pytest.mark.slow
def test_a_process_ends_promptly_while_its_relay_long_polls(stack, events_queue, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("BEDROCK_BATCH_EVENTS_WAIT_SECONDS", "20")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    process = subprocess.Popen(
        [sys.executable, "-c", RELAY_PROCESS, events_queue],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert process.stdout.readline().strip() == "polling"
    polling = time.monotonic()
    process.wait(timeout=30)

    # The interpreter does not wait for the 20-second long poll in flight.
    assert time.monotonic() - polling < 5 and process.returncode == 0


def _all_hidden(stack, queue_url: str) -> bool:
    """Every message of the queue taken and not deleted, hidden for an hour: as a relay that
    took them and could not send them leaves them.

    The relay takes them itself only when it learns that the server is down from a failed
    send; when it learns it first from the closed connection, it stops receiving and they
    would stay visible, for the relay to send once the server is back. The test takes
    whatever is left, so the job's end can only be seen by the poll at the events' return.
    """
    sqs = stack.client("sqs")
    sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=3600)
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]) == 0
        and int(attributes["ApproximateNumberOfMessagesNotVisible"]) > 0
    )


@pytest.mark.slow
def test_a_job_that_ends_while_the_prefect_server_is_down_is_seen_once_it_is_back(
    stack, events_queue, own_prefect_server, monkeypatch, caplog
):
    # Polls an hour apart, and a message the relay could not send hidden for an hour: only the
    # poll the run makes when its events are back can see this job end within the test.
    _settings(
        monkeypatch,
        BEDROCK_BATCH_POLL_INTERVAL_SECONDS="3600",
        BEDROCK_BATCH_POLL_INTERVAL_WITH_EVENTS_SECONDS="3600",
        BEDROCK_BATCH_EVENTS_VISIBILITY_TIMEOUT_SECONDS="3600",
    )
    stack.configure(records_per_second=20)  # 100 records: the job runs ~5 s
    caplog.set_level(logging.INFO, logger="tasks.aws.watcher")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    key = _key()
    watcher = JobWatcher(key)
    with (
        temporary_settings({PREFECT_API_URL: own_prefect_server.url}),
        job_events(key, watcher.deliver, watcher.events_flowing) as active,
    ):
        assert active is True
        watcher.events_active = True
        own_prefect_server.stop()
        eventually(lambda: "Job events stopped" in caplog.text, what="the run to hear it")

        arn, name = _run_job(stack, key)
        watch = watcher.watch(arn, name)
        eventually(lambda: watcher.calls["list"] >= 1, what="a poll while the server is down")
        _wait_final(stack, arn)
        # The job's messages were taken (by the relay, or by the test) and not sent.
        eventually(lambda: _all_hidden(stack, events_queue), what="the job's messages hidden")
        assert not watch.final  # the poll before the end saw it running; none came since
        polls_while_down = watcher.calls["list"]

        own_prefect_server.start()
        back = time.monotonic()
        eventually(lambda: watch.take(0.5) and watch.final, timeout=60, what="the job's end")
        seen_after = time.monotonic() - back

    watcher.close()
    assert watch.latest["status"] == "Completed"
    # A poll at the events' return (one more if the relay's first send after it fails and
    # reconnects), and no polling loop.
    assert polls_while_down + 1 <= watcher.calls["list"] <= polls_while_down + 2
    assert "Job events reach the run again: polling Bedrock now" in caplog.text
    assert f"Listening for job events of run key {key} again after" in caplog.text
    print(f"job end seen {seen_after:.1f} s after the Prefect server was back")
    assert seen_after < 30  # the listener subscribes again within its backoff (1-8 s)


@pytest.mark.slow
def test_a_run_ends_its_shards_by_job_events_without_polling(
    stack, events_queue, monkeypatch, tmp_path
):
    # Polls an hour apart: only the events that came through EventBridge and SQS can end the
    # jobs of this run within the test's time.
    _settings(
        monkeypatch,
        BEDROCK_BATCH_POLL_INTERVAL_SECONDS="3600",
        BEDROCK_BATCH_POLL_INTERVAL_WITH_EVENTS_SECONDS="3600",
    )
    import polars as pl

    from flows.batch_inference import batch_inference
    from tasks.run.params import BatchParams

    source = tmp_path / "topics.csv"
    pl.DataFrame({"source": [f"Q{i:03d} what is {i} + 1?" for i in range(300)]}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="question_answering",
        model_id="anthropic.claude-3-haiku-20240307-v1:0",
        output_uri=str(tmp_path / "out"),
        run_name=_unique("by-events"),
        max_records_per_job=100,
        max_concurrent_jobs=3,
    )

    summary = batch_inference(params)

    overhead = summary["overhead"]
    assert overhead["events"] is True
    assert overhead["bedrock_polls"]["list"] == 0 and overhead["bedrock_polls"]["get"] == 0
    assert overhead["bedrock_polls"]["events"] >= 3  # at least each job's final status
    assert_answers_match_rows(pl.read_parquet(summary["parts"]), 300)
