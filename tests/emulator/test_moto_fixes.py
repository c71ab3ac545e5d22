"""moto as the local stack runs it (`emulator.moto_fixes`): still SQS's behaviour, made cheap."""

from __future__ import annotations

from emu_helpers import unique
from helpers import eventually
from moto.sqs.models import sqs_backends

from emulator import moto_fixes

ACCOUNT = "123456789012"


def test_every_fix_fits_the_installed_moto():
    # A moto release that changed a patched place leaves moto as it is, and this says so.
    assert moto_fixes.apply() == [
        "sqs-retention-check",
        "sqs-clock",
        "events-jsonpath-cache",
        "sqs-batch-authorization",
    ]


def test_the_retention_check_reads_the_period_get_queue_attributes_answers(stack):
    sqs = stack.client("sqs")
    name = unique("retained")
    url = sqs.create_queue(QueueName=name, Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
    for body in ("old", "new"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    backend = sqs_backends[ACCOUNT][stack.region]
    messages = {m.body: m for m in backend.queues[name]._messages}
    messages["old"].sent_timestamp -= 61_000  # sent longer ago than the queue keeps messages

    assert backend.get_queue_attributes(name, ["MessageRetentionPeriod"]) == {
        "MessageRetentionPeriod": 60
    }
    valid = backend.is_message_valid_based_on_retention_period
    assert (valid(name, messages["old"]), valid(name, messages["new"])) == (False, True)
    sqs.delete_queue(QueueUrl=url)


def test_a_received_message_stays_hidden_for_its_visibility_timeout(stack):
    # Message.visible reads moto's SQS clock, which moto_fixes makes time.time().
    sqs = stack.client("sqs")
    url = sqs.create_queue(QueueName=unique("hidden"))["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="one")

    def receive(visibility: int) -> list[str]:
        got = sqs.receive_message(QueueUrl=url, VisibilityTimeout=visibility)
        return [m["Body"] for m in got.get("Messages", [])]

    assert receive(2) == ["one"]
    assert receive(2) == []  # in flight for 2 s
    assert eventually(lambda: receive(2), what="the message visible again") == ["one"]
    sqs.delete_queue(QueueUrl=url)
