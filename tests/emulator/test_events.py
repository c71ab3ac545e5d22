"""Bedrock's job state change events: the emulator puts them on moto's EventBridge, a rule
made by `setup_job_events` routes them to SQS, and they arrive in the documented shape."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from emu_helpers import FINAL, HAIKU, create_job, poll, put_jsonl, records, unique, wait_for

from emulator import EmulatorConfig, EmulatorServer
from emulator.events import creation_time, model_arn
from tasks.aws.job_events import setup_job_events

# The detail of AWS's sample event (Bedrock user guide, monitoring-eventbridge-how-it-works.html).
DOCUMENTED_DETAIL = {
    "version",
    "accountId",
    "batchJobName",
    "batchJobArn",
    "batchModelId",
    "status",
    "failureMessage",
    "creationTime",
}


def _queue(stack) -> str:
    name = unique("evq")
    return setup_job_events(queue_name=name, rule_name=name)


def _events_of(stack, queue_url: str, job_arn: str) -> list[dict]:
    """The queue's events of `job_arn`, in queue order, once its final status has arrived."""
    sqs = stack.client("sqs")
    found: list[dict] = []

    def drained() -> bool:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in got.get("Messages", []):
            body = json.loads(message["Body"])
            if body["detail"]["batchJobArn"] == job_arn:
                found.append(body)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return bool(found) and found[-1]["detail"]["status"] in FINAL

    poll(drained, timeout=20)
    return found


def test_job_life_puts_every_status_change_on_the_queue_in_order(stack):
    queue_url = _queue(stack)
    name = unique("evlife")
    arn = create_job(stack, name, put_jsonl(stack, f"in/{name}.jsonl", records(100)))
    job = wait_for(stack, arn)

    events = _events_of(stack, queue_url, arn)

    walked = stack.ledger(name)[0]["statusHistory"]
    assert [e["detail"]["status"] for e in events] == walked
    assert walked[0] == "Submitted" and walked[-1] == job["status"] == "Completed"
    for event in events:
        assert event["source"] == "aws.bedrock"
        assert event["detail-type"] == "Batch Inference Job State Change"
        assert event["resources"] == [arn]
        # moto's SQS target template (moto/events/utils.py DEFAULT_EVENT_INPUT_TEMPLATE) drops
        # the envelope's "account"; the detail's accountId carries it.
        assert event["region"] == stack.region and event["version"] == "0"
        assert set(event["detail"]) == DOCUMENTED_DETAIL
        detail = event["detail"]
        assert detail["version"] == "0.0" and detail["accountId"] == "123456789012"
        assert detail["batchJobName"] == name and detail["batchJobArn"] == arn
        assert detail["batchModelId"] == f"arn:aws:bedrock:{stack.region}::foundation-model/{HAIKU}"
        assert detail["failureMessage"] == ""
        assert re.fullmatch(
            r"[A-Z][a-z]{2} \d{1,2}, \d{4}, \d{1,2}:\d{2}:\d{2} [AP]M", detail["creationTime"]
        )


def test_failed_job_event_carries_the_jobs_message(stack):
    queue_url = _queue(stack)
    name = unique("evfail")
    stack.set_faults(fail_job_names_containing=name, fail_message="Emulated failure for events")
    arn = create_job(stack, name, put_jsonl(stack, f"in/{name}.jsonl", records(100)))
    job = wait_for(stack, arn)

    events = _events_of(stack, queue_url, arn)

    assert job["status"] == "Failed"
    assert events[-1]["detail"]["status"] == "Failed"
    assert events[-1]["detail"]["failureMessage"] == job["message"] == "Emulated failure for events"
    assert [e["detail"]["status"] for e in events] == stack.ledger(name)[0]["statusHistory"]


def test_stopped_job_events_end_with_stopping_then_stopped(stack):
    queue_url = _queue(stack)
    name = unique("evstop")
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.5)
    arn = create_job(stack, name, put_jsonl(stack, f"in/{name}.jsonl", records(100)))
    wait_for(stack, arn, {"InProgress"})
    stack.client("bedrock").stop_model_invocation_job(jobIdentifier=arn)
    job = wait_for(stack, arn)

    statuses = [e["detail"]["status"] for e in _events_of(stack, queue_url, arn)]

    assert statuses[-2:] == ["Stopping", "Stopped"] and job["status"] == "Stopped"
    assert statuses == stack.ledger(name)[0]["statusHistory"]


def test_an_eventbridge_outage_does_not_break_a_job(stack):
    # Port 9 (discard) refuses connections: every PutEvents fails.
    server = EmulatorServer(
        EmulatorConfig(),
        s3_endpoint_url=stack.moto_url,
        cloudwatch_endpoint_url=stack.moto_url,
        events_endpoint_url="http://127.0.0.1:9",
    ).start()
    try:
        name = unique("evdown")
        uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
        bedrock = stack.client("bedrock", endpoint_url=server.url)
        arn = create_job(stack, name, uri, client=bedrock)

        def finished():
            found = bedrock.get_model_invocation_job(jobIdentifier=arn)
            return found if found["status"] in FINAL else None

        job = poll(finished)
        assert job["status"] == "Completed"
    finally:
        server.stop()


def test_batch_model_id_is_a_foundation_model_or_profile_arn():
    assert model_arn(HAIKU, "eu-west-1", "123456789012") == (
        f"arn:aws:bedrock:eu-west-1::foundation-model/{HAIKU}"
    )
    assert model_arn(f"eu.{HAIKU}", "eu-west-1", "123456789012") == (
        f"arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.{HAIKU}"
    )
    arn = f"arn:aws:bedrock:us-east-1::foundation-model/{HAIKU}"
    assert model_arn(arn, "us-east-1", "123456789012") == arn


def test_creation_time_is_written_like_the_aws_sample():
    # The sample's "Aug 28, 2024, 10:47:53 PM"; morning hours and days are not zero-padded.
    assert creation_time(datetime(2024, 8, 28, 22, 47, 53, tzinfo=timezone.utc)) == (
        "Aug 28, 2024, 10:47:53 PM"
    )
    assert creation_time(datetime(2024, 8, 3, 0, 5, 9, tzinfo=timezone.utc)) == (
        "Aug 3, 2024, 12:05:09 AM"
    )
