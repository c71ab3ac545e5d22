"""Shared helpers for the emulator tests: input files, job creation and bounded polling."""

from __future__ import annotations

import json
import time
import uuid

# One job-creating helper for every test; re-exported here for the emulator's tests.
from helpers import HAIKU, create_job  # noqa: F401

FINAL = {"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"}


def anthropic_body(i: int, max_tokens: int = 200) -> dict:
    return {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Question {i}: what is {i} times two?"}],
    }


def put_jsonl(stack, key: str, records: list[dict]) -> str:
    """Write records as JSONL at `key` in the stack's bucket; return the s3:// URI."""
    body = "\n".join(json.dumps(r) for r in records) + "\n"
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=body.encode())
    return f"s3://{stack.bucket}/{key}"


def records(n: int, body=anthropic_body, prefix: str = "r") -> list[dict]:
    return [{"recordId": f"{prefix}{i:05d}", "modelInput": body(i)} for i in range(n)]


def unique(name: str) -> str:
    """A job name no other test uses, so ledger and list filters stay per test."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_for(stack, arn: str, statuses=FINAL, timeout: float = 20.0, predicate=None) -> dict:
    """Poll GetModelInvocationJob until the status is in `statuses` (and `predicate` holds)."""
    client = stack.client("bedrock")
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_model_invocation_job(jobIdentifier=arn)
        if job["status"] in statuses and (predicate is None or predicate(job)):
            return job
        if time.monotonic() > deadline:
            msg = f"job {arn} still {job['status']} after {timeout}s (wanted {statuses})"
            raise AssertionError(msg)
        time.sleep(0.02)  # poll interval, not synchronisation: the loop checks the condition


def poll(check, timeout: float = 20.0, interval: float = 0.05):
    """Call `check` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout}s"
            raise AssertionError(msg)
        time.sleep(interval)


def read_output(stack, arn: str, output_prefix: str) -> dict[str, str]:
    """Every object under <output>/<jobId>/, keyed by its name after the job id."""
    s3 = stack.client("s3")
    job_id = arn.rsplit("/", 1)[-1]
    prefix = f"{output_prefix.rstrip('/')}/{job_id}/"
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix).get("Contents", [])
    return {
        obj["Key"][len(prefix) :]: s3.get_object(Bucket=stack.bucket, Key=obj["Key"])["Body"]
        .read()
        .decode()
        for obj in listed
    }


def output_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
