"""Faults on demand, set at run time through the admin endpoint (LocalStack.set_faults)."""

from __future__ import annotations

import json
import time
from collections import Counter

import polars as pl
import pytest
from botocore.config import Config
from emu_helpers import (
    create_job,
    output_records,
    put_jsonl,
    read_output,
    records,
    unique,
    wait_for,
)

from emulator import Faults

NO_RETRY = Config(retries={"max_attempts": 1, "mode": "standard"})


def _job(stack, name, n=200):
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(n))
    return create_job(stack, name, uri)


def _lines(stack, arn, name):
    return output_records(read_output(stack, arn, f"out/{name}/")[f"{name}.jsonl.out"])


def test_record_error_rate_writes_retryable_errors(stack):
    # A fixed name and seed fix the draw (a hash of seed, job name and record id): exactly
    # these errors on every run.
    name = "recerr-seed7"
    stack.set_faults(record_error_rate=0.3, record_error_job_names_containing=name, seed=7)
    arn = _job(stack, name)
    job = wait_for(stack, arn)
    assert job["status"] == "Completed"
    errors = [r["error"] for r in _lines(stack, arn, name) if "error" in r]
    assert job["errorRecordCount"] == len(errors) == 66
    codes = Counter(e["errorCode"] for e in errors)
    assert codes == {429: 26, 500: 17, 408: 18, 503: 5}
    assert any(e["errorMessage"].startswith("ThrottlingException") for e in errors)
    manifest = json.loads(read_output(stack, arn, f"out/{name}/")["manifest.json.out"])
    assert manifest["errorRecordCount"] == len(errors)


def test_record_error_rate_is_deterministic_by_seed(stack):
    name = unique("recseed")
    stack.set_faults(record_error_rate=0.2, seed=11, record_error_job_names_containing=name)
    arn = _job(stack, name)
    wait_for(stack, arn)
    got = sorted(r["recordId"] for r in _lines(stack, arn, name) if "error" in r)
    ids = pl.Series([r["recordId"] for r in records(200)])
    drawn = Faults(record_error_rate=0.2, seed=11).record_errors(name, ids)
    assert got == sorted(ids.filter(drawn["errorCode"].is_not_null()).to_list())


def test_record_error_mix_picks_the_error_codes(stack):
    name = unique("mix")
    stack.set_faults(
        record_error_rate=0.5,
        record_error_mix={"ModelTimeoutException": 1.0},
        record_error_job_names_containing=name,
    )
    arn = _job(stack, name)
    wait_for(stack, arn)
    codes = {r["error"]["errorCode"] for r in _lines(stack, arn, name) if "error" in r}
    assert codes == {408}


def test_fail_jobs_by_name_fails_with_message(stack):
    name = unique("shard-00001")
    stack.set_faults(fail_job_names_containing="shard-00001", fail_message="boom (emulated)")
    job = wait_for(stack, _job(stack, name))
    assert job["status"] == "Failed" and job["message"] == "boom (emulated)"
    assert "endTime" in job


def test_fail_jobs_rate_is_deterministic_by_seed(stack):
    base = unique("failrate")
    names = [f"{base}-{i}" for i in range(6)]
    stack.set_faults(fail_jobs=0.5, seed=3)
    arns = {n: _job(stack, n, 100) for n in names}
    statuses = {n: wait_for(stack, a)["status"] for n, a in arns.items()}
    faults = Faults(fail_jobs=0.5, seed=3)
    assert statuses == {n: "Failed" if faults.hits_job("fail", n) else "Completed" for n in names}


def test_partial_jobs_end_partially_completed_with_missing_lines(stack):
    name = unique("partial")
    stack.set_faults(partial_job_names_containing=name, partial_fraction=0.25)
    arn = _job(stack, name)
    job = wait_for(stack, arn)
    assert job["status"] == "PartiallyCompleted"
    assert job["processedRecordCount"] == 150 and job["totalRecordCount"] == 200
    assert "50 of 200 records were not processed" in job["message"]
    assert len(_lines(stack, arn, name)) == 150


def test_expire_jobs_go_from_scheduled_to_expired_with_nothing_processed(stack):
    name = unique("expire")
    stack.set_faults(expire_job_names_containing=name)
    arn = _job(stack, name)
    job = wait_for(stack, arn)
    assert job["status"] == "Expired"
    assert job["totalRecordCount"] == 200
    assert job["processedRecordCount"] == job["successRecordCount"] == 0
    assert job["message"] == (
        "The job expired: it was scheduled but did not start within timeoutDurationInHours=168; "
        "none of its 200 records were processed. Submit a new job."
    )
    assert stack.ledger(name)[0]["statusHistory"] == [
        "Submitted",
        "Validating",
        "Scheduled",
        "Expired",
    ]
    outputs = read_output(stack, arn, f"out/{name}/")
    assert output_records(outputs[f"{name}.jsonl.out"]) == []
    manifest = json.loads(outputs["manifest.json.out"])
    assert manifest["totalRecordCount"] == 200 and manifest["processedRecordCount"] == 0


def test_partial_jobs_message_names_the_timeout(stack):
    name = unique("partialtimeout")
    stack.set_faults(partial_job_names_containing=name, partial_fraction=0.5)
    job = wait_for(stack, _job(stack, name))
    assert job["status"] == "PartiallyCompleted"
    assert job["message"] == (
        "100 of 200 records were not processed within timeoutDurationInHours=168; "
        "retry them in a new job"
    )


def test_stuck_jobs_hold_until_cleared_then_complete(stack):
    name = unique("stuck")
    stack.set_faults(stuck_job_names_containing=name, stuck_after_fraction=0.5)
    arn = _job(stack, name)
    job = wait_for(stack, arn, {"InProgress"}, predicate=lambda j: j["processedRecordCount"] == 100)
    assert job["totalRecordCount"] - job["processedRecordCount"] == 100
    stack.set_faults(stuck_job_names_containing=None)
    assert wait_for(stack, arn)["status"] == "Completed"


def test_throttle_create_rate_raises_throttling(stack):
    name = unique("throttle")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    stack.set_faults(throttle_create_rate=1.0)
    client = stack.client("bedrock", config=NO_RETRY)
    with pytest.raises(client.exceptions.ThrottlingException) as err:
        create_job(stack, name, uri, client=client)
    assert err.value.response["Error"]["Code"] == "ThrottlingException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert stack.ledger(name) == []


def test_throttle_get_rate_raises_throttling(stack):
    arn = _job(stack, unique("throttleget"), 100)
    stack.set_faults(throttle_get_rate=1.0)
    client = stack.client("bedrock", config=NO_RETRY)
    with pytest.raises(client.exceptions.ThrottlingException):
        client.get_model_invocation_job(jobIdentifier=arn)


THROTTLED_OF_20_SEED_5 = 6


def test_throttle_get_rate_partial_throttles_some_calls(stack):
    arn = _job(stack, unique("throttlehalf"), 100)
    stack.set_faults(throttle_get_rate=0.5, seed=5)
    client = stack.client("bedrock", config=NO_RETRY)
    outcomes = []
    for _ in range(20):
        try:
            client.get_model_invocation_job(jobIdentifier=arn)
            outcomes.append("ok")
        except client.exceptions.ThrottlingException:
            outcomes.append("throttled")
    # Seed 5 draws the same sequence for the first 20 calls after a reset.
    assert outcomes.count("throttled") == THROTTLED_OF_20_SEED_5


def test_quota_fault_lowers_the_per_model_quota(stack):
    name = unique("lowquota")
    model = "meta.llama3-3-70b-instruct-v1:0"
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100, body=lambda i: {"prompt": "x"}))
    stack.set_faults(quota=1, stuck_job_names_containing=name, stuck_after_fraction=0.0)
    create_job(stack, f"{name}-0", uri, model_id=model)
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ServiceQuotaExceededException) as err:
        create_job(stack, f"{name}-1", uri, model_id=model, client=client)
    assert "quota of 1" in err.value.response["Error"]["Message"]


def test_latency_ms_slows_every_call(stack):
    client = stack.client("bedrock")
    stack.set_faults(latency_ms=300)
    start = time.monotonic()
    client.list_model_invocation_jobs(maxResults=1)
    assert time.monotonic() - start >= 0.3


def test_set_faults_unknown_name_is_refused(stack):
    with pytest.raises(ValueError, match="unknown fault"):
        stack.set_faults(explode=True)


def test_reset_faults_restores_the_start_config(stack):
    stack.set_faults(fail_jobs=1.0)
    stack.configure(records_per_second=5)
    stack.reset_faults()
    state = stack.current_config()
    assert state["faults"]["fail_jobs"] == 0.0 and state["records_per_second"] is None
