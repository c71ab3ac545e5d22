"""moto as the local stack runs it (`emulator.moto_fixes`): still SQS's behaviour, made cheap."""

from __future__ import annotations

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from emu_helpers import unique
from helpers import eventually
from moto.s3.models import FakeKey
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
        "s3-ranged-get",
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


def test_a_ranged_get_reads_only_its_range_and_answers_as_s3_does(stack, monkeypatch, tmp_path):
    s3 = stack.client("s3")
    key = unique("ranged")
    data = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object(Bucket=stack.bucket, Key=key, Body=data)
    whole_reads: list[str] = []  # keys whose whole value moto read
    moto_value = FakeKey.value

    def value(fake_key):
        whole_reads.append(fake_key.name)
        return moto_value.fget(fake_key)

    monkeypatch.setattr(FakeKey, "value", property(value, moto_value.fset))

    def get(asked: str) -> tuple[bytes, str]:
        got = s3.get_object(Bucket=stack.bucket, Key=key, Range=asked)
        return got["Body"].read(), got["ContentRange"]

    size = len(data)
    assert get("bytes=10-19") == (data[10:20], f"bytes 10-19/{size}")
    assert get(f"bytes={size - 6}-") == (data[-6:], f"bytes {size - 6}-{size - 1}/{size}")
    assert get("bytes=-5") == (data[-5:], f"bytes {size - 5}-{size - 1}/{size}")
    assert get(f"bytes=100-{size + 50}") == (data[100:], f"bytes 100-{size - 1}/{size}")
    with pytest.raises(ClientError, match="InvalidRange"):
        s3.get_object(Bucket=stack.bucket, Key=key, Range=f"bytes={size}-{size + 9}")
    # boto3's managed download, in 64 kB ranges here (8 MB in the project's downloads).
    dest = tmp_path / "copy"
    small = TransferConfig(multipart_threshold=64 * 1024, multipart_chunksize=64 * 1024)
    s3.download_file(stack.bucket, key, str(dest), Config=small)
    assert dest.read_bytes() == data
    assert whole_reads == []
    assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == data
    assert whole_reads == [key]  # a GET without a range still reads the object whole
