"""The printed IAM policies cover every S3 key a real run creates, and the service role no more."""

from __future__ import annotations

import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import polars as pl
import pytest

from flows.batch_inference import batch_inference
from flows.cli import main
from tasks.aws import storage
from tasks.pipeline.columns import SERVED_BY
from tasks.run.params import BatchParams

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
ROLE = "arn:aws:iam::123456789012:role/BedrockBatchEmulatorRole"


def _allows(policy: dict, action: str, bucket: str, key: str) -> list[str]:
    """The Sids of statements that allow ``action`` on the object ``key``."""
    arn = f"arn:aws:s3:::{bucket}/{key}"
    return [
        s["Sid"]
        for s in policy["Statement"]
        if action in s["Action"] and any(fnmatchcase(arn, r) for r in s["Resource"])
    ]


def _policies(capsys, output_uri: str, run_name: str | None) -> dict:
    args = ["iam-policy", "--role-arn", ROLE, "--model-id", CLAUDE, "--output-uri", output_uri]
    assert main(args + (["--run-name", run_name] if run_name else [])) == 0
    return json.loads(capsys.readouterr().out)


def _common_prefix(keys: list[str]) -> str:
    prefix = os.path.commonprefix(keys)
    return prefix[: prefix.rfind("/") + 1]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_iam_policies_cover_every_key_a_run_creates(stack, tmp_path, capsys, where):
    # One shard retried as a batch job, the other partly on demand: every kind of key appears.
    stack.set_faults(
        partial_job_names_containing="shard-00000-a1",
        partial_fraction=0.6,
        record_error_rate=0.1,
        record_error_job_names_containing="shard-00001-a1",
        seed=5,
    )
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(350)]}).write_csv(source)
    output_uri = f"s3://{stack.bucket}/iam-runs" if where == "s3" else str(tmp_path / "out")
    run_name = f"iam-{where}"
    summary = batch_inference(
        BatchParams(
            source=str(source),
            prompt_id="joke_about_topic",
            model_id=CLAUDE,
            output_uri=output_uri,
            run_name=run_name,
            max_records_per_job=250,
            on_demand_rps=100,
        )
    )
    served = pl.read_parquet(summary["parts"]) if where == "local" else None
    if served is not None:
        assert set(served[SERVED_BY]) == {"batch", "on_demand"}

    # What Bedrock read and wrote, from the emulator's ledger: not from the layout.
    jobs = stack.ledger(name_contains=run_name)
    assert len(jobs) == 3  # two first attempts and one batch retry
    inputs = {storage.split_s3(j["inputUri"])[1] for j in jobs}
    outputs = [storage.split_s3(j["outputUri"])[1] for j in jobs]
    input_dirs = {k.rsplit("/", 1)[0] for k in inputs}
    job_prefix = _common_prefix([*inputs, *outputs])
    s3 = stack.client("s3")
    prefix = "iam-runs/" if where == "s3" else "staging/"
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
        if run_name in obj["Key"]
    ]
    written_by_bedrock = [k for k in keys if any(k.startswith(o) for o in outputs)]
    assert written_by_bedrock and inputs <= set(keys)
    if where == "s3":
        assert any("/on-demand/" in k for k in keys)  # on-demand answers are run files

    for run in (run_name, None):  # this run's policy, and the one for every run
        policies = _policies(capsys, output_uri, run)
        service, runner = policies["service_role_policy"], policies["runner_policy"]
        for key in keys:
            if key in inputs:
                assert _allows(service, "s3:GetObject", stack.bucket, key), key
                assert _allows(runner, "s3:PutObject", stack.bucket, key), key
            elif key in written_by_bedrock:
                assert _allows(service, "s3:PutObject", stack.bucket, key), key
                assert _allows(runner, "s3:GetObject", stack.bucket, key), key
            else:
                # Run files are the runner's; an on-demand remainder's input may sit with the
                # job inputs, where the service role can read it.
                if key.rsplit("/", 1)[0] not in input_dirs:
                    assert not _allows(service, "s3:GetObject", stack.bucket, key), key
                assert not _allows(service, "s3:PutObject", stack.bucket, key), key
            assert _allows(runner, "s3:GetObject", stack.bucket, key), key
            assert _allows(runner, "s3:PutObject", stack.bucket, key), key
        if run is None:
            continue
        # The service role gets nothing outside this run's job prefix.
        for statement in service["Statement"]:
            s3_resources = [r for r in statement["Resource"] if r.startswith("arn:aws:s3:::")]
            for resource in s3_resources:
                if statement["Action"] == ["s3:ListBucket"]:
                    assert resource == f"arn:aws:s3:::{stack.bucket}"
                    prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
                    assert all(p.startswith(job_prefix.rstrip("/")) for p in prefixes)
                else:
                    assert resource.startswith(f"arn:aws:s3:::{stack.bucket}/{job_prefix}")
        assert "<region>" not in json.dumps(policies)


def test_iam_policy_local_output_without_staging_names_the_setting(capsys, monkeypatch, tmp_path):
    from tasks.settings import get_settings

    monkeypatch.delenv("BEDROCK_BATCH_STAGING_URI", raising=False)
    get_settings.cache_clear()
    try:
        code = main(["iam-policy", "--role-arn", ROLE, "--model-id", CLAUDE,
                     "--output-uri", str(Path(tmp_path)), "--region", "us-east-1"])  # fmt: skip
    finally:
        get_settings.cache_clear()

    assert code == 2
    assert "BEDROCK_BATCH_STAGING_URI" in capsys.readouterr().err


def _policy_strings(document) -> list[str]:
    if isinstance(document, dict):
        return [s for v in document.values() for s in _policy_strings(v)]
    if isinstance(document, list):
        return [s for v in document for s in _policy_strings(v)]
    return [document] if isinstance(document, str) else []


def test_iam_policy_arns_are_in_the_roles_partition(capsys):
    # Every ARN was written arn:aws:..., which in GovCloud (or China) matches nothing.
    argv = ["iam-policy", "--model-id", "anthropic.claude-3-haiku-20240307-v1:0",
            "--output-uri", "s3://my-bucket/runs"]  # fmt: skip
    role = "arn:aws-us-gov:iam::123456789012:role/BedrockBatch"
    assert main([*argv, "--role-arn", role, "--region", "us-gov-west-1"]) == 0
    arns = [s for s in _policy_strings(json.loads(capsys.readouterr().out)) if s.startswith("arn:")]
    assert arns and all(a.startswith("arn:aws-us-gov:") for a in arns), arns
    assert {a.split(":")[2] for a in arns} >= {"s3", "bedrock", "iam", "sqs"}

    assert main([*argv, "--role-arn", role, "--region", "us-east-1"]) == 2
    assert "is in the aws partition, but --role-arn" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--kms-key-id", "notakey"], "--kms-key-id 'notakey' is not a KMS key ARN"),
        (["--model-id", "foo.bar"], "foo.bar"),
    ],
)
def test_iam_policy_refuses_what_no_policy_can_name(extra, words, capsys):
    # Printed before: "Resource": ["notakey"] (malformed for IAM), a model id a run refuses.
    argv = ["iam-policy", "--model-id", "anthropic.claude-3-haiku-20240307-v1:0",
            "--output-uri", "s3://my-bucket/runs", "--region", "us-east-1",
            "--role-arn", "arn:aws:iam::123456789012:role/R", *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
