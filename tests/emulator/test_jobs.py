"""Job lifecycle over plain boto3: create, get, list, stop, outputs and the ledger."""

from __future__ import annotations

import json

from emu_helpers import (
    HAIKU,
    create_job,
    output_records,
    put_jsonl,
    read_output,
    records,
    unique,
    wait_for,
)


def test_create_model_invocation_job_completes_with_outputs_and_manifest(stack):
    name = unique("complete")
    uri = put_jsonl(stack, f"in/{name}/input.jsonl", records(150))
    arn = create_job(stack, name, uri)
    job = wait_for(stack, arn)
    assert job["status"] == "Completed"
    assert job["totalRecordCount"] == job["processedRecordCount"] == 150
    assert job["successRecordCount"] == 150 and job["errorRecordCount"] == 0
    files = read_output(stack, arn, f"out/{name}/")
    assert set(files) == {"input.jsonl.out", "manifest.json.out"}
    lines = output_records(files["input.jsonl.out"])
    assert sorted(r["recordId"] for r in lines) == [f"r{i:05d}" for i in range(150)]
    manifest = json.loads(files["manifest.json.out"])
    assert manifest["totalRecordCount"] == manifest["successRecordCount"] == 150
    usage = [r["modelOutput"]["usage"] for r in lines]
    assert manifest["inputTokenCount"] == sum(u["input_tokens"] for u in usage)
    assert manifest["outputTokenCount"] == sum(u["output_tokens"] for u in usage)
    history = stack.ledger(name)[0]["statusHistory"]
    assert history == ["Submitted", "Validating", "Scheduled", "InProgress", "Completed"]
    assert arn.startswith("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/")
    assert job["modelId"] == HAIKU
