"""The fault-injection suite: under each fault the output is complete and nothing is paid twice."""

from __future__ import annotations

from collections import Counter

import boto3
import polars as pl
import pytest
from helpers import assert_each_answer_quotes_its_prompt, prompts_of

from flows.batch_inference import batch_inference
from tasks.pipeline.columns import ATTEMPTS, ERROR_CODE, RECORD_ID, RESPONSE_TEXT
from tasks.run.params import BatchParams

# Real subprocesses, SIGKILLs or a fault matrix: `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
ROWS = 400

FAULTS = {
    "record-errors-20pct": {"record_error_rate": 0.2, "seed": 11},
    "failed-jobs": {"fail_job_names_containing": "shard-00001-a1"},
    "partial-jobs": {"partial_jobs": 1.0, "partial_fraction": 0.3, "seed": 2},
    "expired-jobs": {"expire_job_names_containing": "-a1", "expire_after_fraction": 0.6},
    "throttled-create-and-get": {"throttle_create_rate": 0.5, "throttle_get_rate": 0.5, "seed": 5},
    "quota-below-gate": {"quota": 2},
}


@pytest.mark.parametrize("fault", FAULTS)
def test_batch_inference_under_fault_is_complete_and_pays_once(stack, tmp_path, fault):
    stack.set_faults(**FAULTS[fault])
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(ROWS)]}).write_csv(source)
    run_name = f"fault-{fault}"
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name=run_name,
        max_concurrent_jobs=4,
        max_records_per_job=100,
        on_demand_rps=200,
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert out.height == ROWS
    assert out[RECORD_ID].n_unique() == ROWS
    # Every fault here is transient: retries serve every record.
    assert out[ERROR_CODE].null_count() == ROWS, out[ERROR_CODE].value_counts()
    # ... each with the answer to its own prompt, whichever attempt or path served it.
    assert_each_answer_quotes_its_prompt(out[RESPONSE_TEXT], prompts_of(out, "joke_about_topic"))
    jobs = stack.ledger(name_contains=run_name)
    assert max(Counter(job["jobName"] for job in jobs).values()) == 1
    first_attempts = [job for job in jobs if job["jobName"].endswith("-a1")]
    assert sorted(job["recordCount"] for job in first_attempts) == [100] * 4
    retried = sum(job["recordCount"] for job in jobs) - ROWS
    on_demand = out.filter(pl.col("served_by") == "on_demand").height
    assert out.filter(pl.col(ATTEMPTS) > 1).height == retried + on_demand
    # No record Bedrock already answered is sent again: first-attempt successes stay put.
    stack.reset_faults()  # the test's own Gets are not the run's to survive
    bedrock = boto3.client("bedrock", endpoint_url=stack.bedrock_url)
    answered = sum(
        bedrock.get_model_invocation_job(jobIdentifier=job["jobArn"])["successRecordCount"]
        for job in first_attempts
    )
    assert out.filter(pl.col(ATTEMPTS) == 1).height == answered
