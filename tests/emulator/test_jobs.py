"""Job lifecycle over plain boto3: create, get, list, stop, outputs and the ledger."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta

import pytest
from emu_helpers import (
    HAIKU,
    anthropic_body,
    create_job,
    output_records,
    put_jsonl,
    read_output,
    records,
    unique,
    wait_for,
)

from emulator import runner


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


def test_create_model_invocation_job_reads_every_jsonl_under_a_prefix(stack):
    name = unique("prefix")
    put_jsonl(stack, f"in/{name}/part-0.jsonl", records(60, prefix="a"))
    put_jsonl(stack, f"in/{name}/part-1.jsonl", records(60, prefix="b"))
    stack.client("s3").put_object(Bucket=stack.bucket, Key=f"in/{name}/notes.txt", Body=b"x")
    arn = create_job(stack, name, f"s3://{stack.bucket}/in/{name}/")
    job = wait_for(stack, arn)
    assert job["status"] == "Completed" and job["totalRecordCount"] == 120
    files = read_output(stack, arn, f"out/{name}/")
    assert set(files) == {"part-0.jsonl.out", "part-1.jsonl.out", "manifest.json.out"}
    assert {r["recordId"][0] for r in output_records(files["part-1.jsonl.out"])} == {"b"}


def test_create_model_invocation_job_assigns_record_ids_when_missing(stack):
    name = unique("noid")
    uri = put_jsonl(
        stack, f"in/{name}.jsonl", [{"modelInput": anthropic_body(i)} for i in range(100)]
    )
    arn = create_job(stack, name, uri)
    assert wait_for(stack, arn)["status"] == "Completed"
    ids = {
        r["recordId"]
        for r in output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])
    }
    assert len(ids) == 100
    assert all(re.fullmatch("[A-Za-z0-9]{11}", i) for i in ids)
    # Random like Bedrock's (e.g. bFBEdQuy3Gp), not a numbered sequence.
    assert not any(i.startswith("REC") and i[3:].isdigit() for i in ids)


def test_create_model_invocation_job_assigned_record_ids_unique_across_files(stack):
    name = unique("noidfiles")
    prefix = f"in/{name}/"
    given = [{"recordId": f"given{i:06d}", "modelInput": anthropic_body(i)} for i in range(20)]
    put_jsonl(stack, prefix + "a.jsonl", [{"modelInput": anthropic_body(i)} for i in range(60)])
    put_jsonl(
        stack, prefix + "b.jsonl", given + [{"modelInput": anthropic_body(i)} for i in range(40)]
    )
    arn = create_job(stack, name, f"s3://{stack.bucket}/{prefix}")
    assert wait_for(stack, arn)["status"] == "Completed"
    outputs = read_output(stack, arn, f"out/{name}/")
    ids = [
        r["recordId"]
        for key in ("a.jsonl.out", "b.jsonl.out")
        for r in output_records(outputs[key])
    ]
    assert len(ids) == len(set(ids)) == 120
    assert {f"given{i:06d}" for i in range(20)} <= set(ids)


def test_create_model_invocation_job_record_not_fitting_the_family_fails_that_record(stack):
    name = unique("badrecord")
    rows = records(100)
    rows[3]["modelInput"] = {"prompt": "llama-style body sent to claude"}
    uri = put_jsonl(stack, f"in/{name}.jsonl", rows)
    arn = create_job(stack, name, uri)
    job = wait_for(stack, arn)
    assert job["status"] == "Completed"
    assert job["errorRecordCount"] == 1 and job["successRecordCount"] == 99
    lines = output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])
    bad = next(r for r in lines if r["recordId"] == "r00003")
    assert bad["error"]["errorCode"] == 400
    assert "anthropic_version" in bad["error"]["errorMessage"]
    assert "modelOutput" not in bad and bad["modelInput"] == rows[3]["modelInput"]


@pytest.mark.parametrize(
    ("model_id", "body", "check"),
    [
        (
            "amazon.nova-lite-v1:0",
            lambda i: {"messages": [{"role": "user", "content": [{"text": f"q{i}"}]}]},
            lambda out: out["output"]["message"]["content"][0]["text"].startswith("[emulated"),
        ),
        (
            "amazon.titan-embed-text-v2:0",
            lambda i: {"inputText": f"text {i}", "dimensions": 256, "normalize": True},
            lambda out: (
                len(out["embedding"]) == 256
                and abs(sum(x * x for x in out["embedding"]) - 1) < 1e-3
            ),
        ),
        (
            "cohere.embed-english-v3",
            lambda i: {"texts": [f"a {i}", f"b {i}"], "input_type": "search_document"},
            lambda out: [len(e) for e in out["embeddings"]] == [1024, 1024],
        ),
        (
            "meta.llama3-1-8b-instruct-v1:0",
            lambda i: {"prompt": f"q{i}", "max_gen_len": 64},
            lambda out: out["generation"].startswith("[emulated meta.llama3-1-8b-instruct]"),
        ),
        (
            "mistral.mistral-small-2402-v1:0",
            lambda i: {"prompt": f"<s>[INST] q{i} [/INST]", "max_tokens": 64},
            lambda out: out["outputs"][0]["stop_reason"] in ("stop", "length"),
        ),
        (
            "global.anthropic.claude-sonnet-4-20250514-v1:0",
            anthropic_body,
            lambda out: out["content"][0]["text"].startswith(
                "[emulated anthropic.claude-sonnet-4]"
            ),
        ),
    ],
)
def test_create_model_invocation_job_answers_each_family(stack, model_id, body, check):
    name = unique("family")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=body))
    arn = create_job(stack, name, uri, model_id=model_id)
    job = wait_for(stack, arn)
    assert job["status"] == "Completed", job.get("message")
    lines = output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])
    assert len(lines) == 100 and all(check(r["modelOutput"]) for r in lines)


def test_create_model_invocation_job_converse_type_answers_converse_shape(stack):
    name = unique("converse")
    body = lambda i: {  # noqa: E731
        "messages": [{"role": "user", "content": [{"text": f"q{i}"}]}],
        "inferenceConfig": {"maxTokens": 30},
    }
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=body))
    arn = create_job(stack, name, uri, model_id=HAIKU, modelInvocationType="Converse")
    job = wait_for(stack, arn)
    assert job["status"] == "Completed" and job["modelInvocationType"] == "Converse"
    out = output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])[0]
    usage = out["modelOutput"]["usage"]
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    assert out["modelOutput"]["stopReason"] in ("end_turn", "max_tokens")


def test_create_model_invocation_job_outputs_are_deterministic(stack):
    outputs = []
    for _ in range(2):
        name = unique("determinism")
        uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
        arn = create_job(stack, name, uri)
        wait_for(stack, arn)
        lines = output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])
        outputs.append({r["recordId"]: r["modelOutput"]["content"] for r in lines})
    assert outputs[0] == outputs[1]


def test_create_model_invocation_job_output_check_in_validation_writes_nothing(stack):
    name = unique("probe")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.0)
    arn = create_job(stack, name, uri)
    wait_for(stack, arn, {"InProgress"})
    assert read_output(stack, arn, f"out/{name}/") == {}
    stack.set_faults(stuck_job_names_containing=None)
    assert wait_for(stack, arn)["status"] == "Completed"
    assert set(read_output(stack, arn, f"out/{name}/")) == {
        f"{name}.jsonl.out",
        "manifest.json.out",
    }


def test_create_model_invocation_job_same_token_returns_same_job(stack):
    name = unique("idem")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    first = create_job(stack, name, uri, clientRequestToken=f"tok-{name}")
    second = create_job(stack, name, uri, clientRequestToken=f"tok-{name}")
    assert first == second
    assert [e["jobArn"] for e in stack.ledger(name)] == [first]
    assert stack.ledger(name)[0]["clientRequestToken"] == f"tok-{name}"


def test_create_model_invocation_job_same_token_other_params_returns_the_first_job(stack):
    name = unique("idemother")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    other_uri = put_jsonl(stack, f"in/{name}-other.jsonl", records(100))
    first = create_job(stack, name, uri, clientRequestToken=f"tok-{name}")
    second = create_job(
        stack,
        name + "-b",
        other_uri,
        clientRequestToken=f"tok-{name}",
        output_uri=f"s3://{stack.bucket}/elsewhere/{name}/",
        timeoutDurationInHours=24,
    )
    assert second == first
    listed = stack.client("bedrock").list_model_invocation_jobs(nameContains=name)
    jobs = listed["invocationJobSummaries"]
    assert [(j["jobArn"], j["jobName"]) for j in jobs] == [(first, name)]
    assert jobs[0]["timeoutDurationInHours"] == 168
    assert len(stack.ledger(name)) == 1


def test_create_model_invocation_job_over_quota_raises_service_quota_exceeded(stack):
    name = unique("quota")
    model = "mistral.mistral-large-2402-v1:0"
    body = lambda i: {"prompt": f"q{i}"}  # noqa: E731
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=body))
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.0)
    arns = [create_job(stack, f"{name}-{i}", uri, model_id=model) for i in range(10)]
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ServiceQuotaExceededException) as err:
        create_job(stack, f"{name}-10", uri, model_id=model, client=client)
    message = err.value.response["Error"]["Message"]
    assert "quota of 10" in message and model in message
    assert len(stack.ledger(name)) == 10
    stack.set_faults(stuck_job_names_containing=None)
    assert all(wait_for(stack, arn)["status"] == "Completed" for arn in arns)
    create_job(stack, f"{name}-11", uri, model_id=model)


def test_get_model_invocation_job_by_id_or_arn(stack):
    name = unique("getid")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    arn = create_job(stack, name, uri)
    client = stack.client("bedrock")
    by_id = client.get_model_invocation_job(jobIdentifier=arn.rsplit("/", 1)[1])
    assert by_id["jobArn"] == arn and by_id["jobName"] == name
    assert by_id["jobExpirationTime"] > by_id["submitTime"]
    assert by_id["timeoutDurationInHours"] == 168


def test_get_model_invocation_job_not_found(stack):
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ResourceNotFoundException) as err:
        client.get_model_invocation_job(jobIdentifier="abcdef123456")
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert "abcdef123456" in err.value.response["Error"]["Message"]


def test_get_model_invocation_job_malformed_identifier(stack):
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.get_model_invocation_job(jobIdentifier="NOT-A-JOB")
    assert "'NOT-A-JOB' at 'jobIdentifier'" in err.value.response["Error"]["Message"]


def test_get_model_invocation_job_shows_live_counters(stack):
    name = unique("counters")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(200))
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.5)
    arn = create_job(stack, name, uri)
    job = wait_for(
        stack, arn, {"InProgress"}, predicate=lambda j: j.get("processedRecordCount") == 100
    )
    assert job["totalRecordCount"] == 200 and job["successRecordCount"] == 100
    stack.set_faults(stuck_job_names_containing=None)
    assert wait_for(stack, arn)["processedRecordCount"] == 200


def test_job_lasts_its_configured_pace_with_the_emulators_own_work_inside_it(stack, monkeypatch):
    """100 records at 50 records/s with instant statuses end about 2 s after submission, even
    when the fake model takes 0.6 s to answer and writing the outputs 0.3 s: the emulator's own
    work runs inside the pace, as a real job's duration holds no simulator's time. Writing
    starts at least half a second before the paced end, so even a job with no earlier write to
    go by ends on time (20 jobs ending together once ended 0.2-0.5 s late). Work on top of the
    pace would end them at 2.9 s or later. (At 100 records/s the 0.9 s of work left 0.1 s for
    the rest of the emulator's own, and a loaded CI machine overran it: 1.65 s.)"""
    answer, write = runner.answer, runner.write_outputs
    created: dict[str, float] = {}
    writes: dict[str, float] = {}  # output location: when its write began

    def slow_answer(*args, **kwargs):
        time.sleep(0.6)  # a slow fake model: work to hide, not synchronisation
        return answer(*args, **kwargs)

    def slow_write(s3, output_uri, *args, **kwargs):
        # Only this test's jobs: a job an earlier test left running writes here too.
        writes.setdefault(output_uri, time.monotonic())
        time.sleep(0.3)  # a slow S3: the same
        return write(s3, output_uri, *args, **kwargs)

    monkeypatch.setattr(runner, "answer", slow_answer)
    monkeypatch.setattr(runner, "write_outputs", slow_write)
    stack.configure(records_per_second=50)
    took = []
    for attempt in range(2):
        name = unique(f"paced{attempt}")
        uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
        created[name] = time.monotonic()
        arn = create_job(stack, name, uri)
        job = wait_for(stack, arn)
        assert job["status"] == "Completed" and job["processedRecordCount"] == 100
        files = read_output(stack, arn, f"out/{name}/")
        assert len(output_records(files[f"{name}.jsonl.out"])) == 100
        took.append((job["endTime"] - job["submitTime"]).total_seconds())
    # Each job began writing before its paced end (submitted after `created`, so 2 s after it
    # at the earliest), whatever the emulator's last write took.
    began = {
        name: [at - made for uri, at in writes.items() if f"/out/{name}/" in uri]
        for name, made in created.items()
    }
    assert [len(b) == 1 and b[0] < 2.0 for b in began.values()] == [True, True], began
    assert 2.0 <= took[0] < 2.5, took
    assert 2.0 <= took[1] < 2.5, took


def test_list_model_invocation_jobs_filters_sorts_and_paginates(stack):
    name = unique("listing")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    arns = [create_job(stack, f"{name}-{i}", uri) for i in range(3)]
    for arn in arns:
        wait_for(stack, arn)
    client = stack.client("bedrock")
    listed = client.list_model_invocation_jobs(nameContains=name, sortOrder="Ascending")
    assert [j["jobArn"] for j in listed["invocationJobSummaries"]] == arns
    descending = client.list_model_invocation_jobs(nameContains=name)["invocationJobSummaries"]
    assert [j["jobArn"] for j in descending] == arns[::-1]
    page = client.list_model_invocation_jobs(nameContains=name, maxResults=2)
    assert len(page["invocationJobSummaries"]) == 2 and page["nextToken"]
    pages = client.get_paginator("list_model_invocation_jobs").paginate(
        nameContains=name, PaginationConfig={"PageSize": 1}
    )
    assert sum(len(p["invocationJobSummaries"]) for p in pages) == 3
    completed = client.list_model_invocation_jobs(nameContains=name, statusEquals="Completed")
    assert len(completed["invocationJobSummaries"]) == 3
    failed = client.list_model_invocation_jobs(nameContains=name, statusEquals="Failed")
    assert failed["invocationJobSummaries"] == []
    first = client.get_model_invocation_job(jobIdentifier=arns[0])["submitTime"]
    after = client.list_model_invocation_jobs(nameContains=name, submitTimeAfter=first)
    assert arns[0] not in [j["jobArn"] for j in after["invocationJobSummaries"]]
    before = client.list_model_invocation_jobs(
        nameContains=name, submitTimeBefore=first + timedelta(microseconds=1000)
    )
    assert [j["jobArn"] for j in before["invocationJobSummaries"]] == [arns[0]]


def test_list_model_invocation_jobs_max_results_over_1000(stack):
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.list_model_invocation_jobs(maxResults=1001)
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert err.value.response["Error"]["Message"] == (
        "1 validation error detected: Value 1001 at 'maxResults' failed to satisfy constraint: "
        "Member must have value less than or equal to 1000"
    )


def test_stop_model_invocation_job_in_progress_goes_stopping_then_stopped(stack):
    name = unique("stop")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(200))
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.25)
    arn = create_job(stack, name, uri)
    wait_for(stack, arn, {"InProgress"}, predicate=lambda j: j.get("processedRecordCount") == 50)
    client = stack.client("bedrock")
    client.stop_model_invocation_job(jobIdentifier=arn)
    job = wait_for(stack, arn, {"Stopped"})
    assert job["processedRecordCount"] == 50 and "endTime" in job
    assert stack.ledger(name)[0]["statusHistory"][-2:] == ["Stopping", "Stopped"]
    lines = output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])
    assert len(lines) == 50


def test_stop_model_invocation_job_completed_is_a_validation_error(stack):
    name = unique("stopdone")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    arn = create_job(stack, name, uri)
    wait_for(stack, arn)
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.stop_model_invocation_job(jobIdentifier=arn)
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert err.value.response["Error"]["Message"] == (
        f"Job {arn} cannot be stopped: only Submitted, Validating, Scheduled and InProgress jobs "
        "can be stopped. State was: Completed"
    )
    assert client.get_model_invocation_job(jobIdentifier=arn)["status"] == "Completed"


def test_stop_model_invocation_job_failed_names_the_state(stack):
    name = unique("stopfailed")
    stack.set_faults(fail_job_names_containing=name)
    arn = create_job(stack, name, put_jsonl(stack, f"in/{name}.jsonl", records(100)))
    wait_for(stack, arn)
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.stop_model_invocation_job(jobIdentifier=arn)
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert err.value.response["Error"]["Message"].endswith("State was: Failed")


def test_stop_model_invocation_job_not_found(stack):
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ResourceNotFoundException) as err:
        client.stop_model_invocation_job(jobIdentifier="000000000000")
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert "'000000000000'" in err.value.response["Error"]["Message"]


@pytest.mark.parametrize(
    ("model_id", "body"),
    [
        ("amazon.titan-embed-text-v2:0", lambda i: {"inputText": f"text {i} " * (i % 9)}),
        (
            "cohere.embed-english-v3",
            lambda i: {"texts": [f"a {i} " * (i % 9)], "input_type": "search_document"},
        ),
    ],
)
def test_embedding_job_manifest_has_the_documented_fields_and_input_tokens_only(
    stack, model_id, body
):
    # The manifest holds totalRecordCount, processedRecordCount, successRecordCount,
    # errorRecordCount, inputTokenCount, outputTokenCount (user guide,
    # batch-inference-results.html); embeddings are charged input tokens only (aws.amazon.com/
    # bedrock/pricing: "For embeddings models, you are charged for every input token
    # processed"), so outputTokenCount is 0. Cohere's outputs carry no count: the manifest is
    # the job's only token figure, and a run reads it from there.
    from emulator.catalog import CATALOG
    from emulator.responders import count_tokens

    name = unique("embed-manifest")
    rows = records(100, body=body)
    arn = create_job(stack, name, put_jsonl(stack, f"in/{name}.jsonl", rows), model_id=model_id)
    assert wait_for(stack, arn)["status"] == "Completed"
    files = read_output(stack, arn, f"out/{name}/")
    manifest = json.loads(files["manifest.json.out"])
    assert list(manifest) == [
        "totalRecordCount", "processedRecordCount", "successRecordCount",
        "errorRecordCount", "inputTokenCount", "outputTokenCount",
    ]  # fmt: skip
    assert manifest["totalRecordCount"] == manifest["successRecordCount"] == 100
    assert manifest["outputTokenCount"] == 0
    spec = CATALOG[model_id]
    charged = sum(count_tokens(json.dumps(r["modelInput"]), spec, "InvokeModel")[0] for r in rows)
    assert manifest["inputTokenCount"] == charged > 0
    lines = output_records(files[f"{name}.jsonl.out"])
    if model_id.startswith("amazon.titan"):
        assert manifest["inputTokenCount"] == sum(
            r["modelOutput"]["inputTextTokenCount"] for r in lines
        )
    else:
        assert not any("usage" in r["modelOutput"] or "meta" in r["modelOutput"] for r in lines)
