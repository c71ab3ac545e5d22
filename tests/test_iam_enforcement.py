"""The printed IAM policies, enforced: a run completes with them and fails without one grant.

moto (its ``INITIAL_NO_AUTH_ACTION_COUNT`` setting, in a moto process of its own) authorizes
every S3 call against the caller's policies: the flow runs as an IAM user carrying the printed
runner policy, and the emulator's jobs read and write S3 as a role carrying the printed service
role policy, through sts:AssumeRole as Bedrock does. The Bedrock control plane (our emulator)
evaluates no IAM policy, so the runner's bedrock:* and iam:PassRole grants are not exercised.

moto does not evaluate condition keys other than StringEquals on sts:ExternalId, so the
``s3:prefix`` conditions on ListBucket are checked here instead: every ListObjectsV2 an
identity sends must match its policy's condition.
"""

from __future__ import annotations

import copy
import json
import re

import polars as pl
import pytest
from botocore.client import BaseClient

from emulator.stack import LocalStack
from flows.batch_inference import batch_inference
from flows.cli import main
from tasks.pipeline.columns import ERROR_CODE, ERROR_MESSAGE, RESPONSE_TEXT
from tasks.run.params import BatchParams

pytestmark = pytest.mark.slow

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
ROWS = 120
# The project's poll back-off in tenths of a second, as in conftest.py.
FAST_POLLS = {
    "BEDROCK_BATCH_POLL_CREATE_BACKOFF_SECONDS": "0.1",
    "BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS": "1",
}
# Where moto names an action differently from AWS, the name moto checks for each AWS action:
# HeadBucket is authorized as s3:ListBucket in AWS (S3 API reference, HeadBucket,
# "Permissions") but as s3:HeadBucket in moto; CloudWatch's IAM prefix is `cloudwatch`, moto
# checks its signing name `monitoring`.
MOTO_ALIASES = {"s3:ListBucket": ["s3:HeadBucket"]}
MOTO_PREFIXES = {"cloudwatch:": "monitoring:"}


@pytest.fixture(scope="module")
def iam_stack():
    """A local stack of its own whose moto enforces IAM; the session's stack is untouched."""
    with LocalStack(enforce_iam=True) as stack:
        yield stack


@pytest.fixture
def list_calls(monkeypatch):
    """(access key, bucket, prefix) of every ListObjectsV2 boto3 sends in this process."""
    calls: list[tuple[str, str, str]] = []
    original = BaseClient._make_api_call

    def record(self, operation_name, api_params):
        if operation_name == "ListObjectsV2":
            key = self._request_signer._credentials.access_key
            calls.append((key, api_params["Bucket"], api_params.get("Prefix", "")))
        return original(self, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", record)
    return calls


def _printed_policies(capsys, role_arn: str, output_uri: str, run_name: str) -> dict:
    """`bedrock-batch iam-policy`'s output for this run, parsed."""
    args = ["iam-policy", "--role-arn", role_arn, "--model-id", CLAUDE, "--output-uri", output_uri,
            "--run-name", run_name, "--region", "us-east-1"]  # fmt: skip
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _as_moto_checks(policy: dict) -> dict:
    """The same policy with each action also under the name moto authorizes it by."""
    translated = copy.deepcopy(policy)
    for statement in translated["Statement"]:
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        extra = [alias for action in actions for alias in MOTO_ALIASES.get(action, [])]
        for aws, moto in MOTO_PREFIXES.items():
            extra += [moto + a[len(aws) :] for a in actions if a.startswith(aws)]
        statement["Action"] = actions + extra
    return translated


def _without(policy: dict, sid: str, action: str) -> dict:
    """The policy minus one action of one statement (the statement goes when it empties)."""
    trimmed = copy.deepcopy(policy)
    for statement in trimmed["Statement"]:
        if statement["Sid"] == sid:
            assert action in statement["Action"], (sid, action)
            statement["Action"] = [a for a in statement["Action"] if a != action]
    trimmed["Statement"] = [s for s in trimmed["Statement"] if s["Action"]]
    return trimmed


def _string_like(pattern: str, value: str) -> bool:
    """IAM's StringLike: `*` any run of characters, `?` one character, case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value) is not None


def _check_list_conditions(policy: dict, calls: list[tuple[str, str]]) -> None:
    """Each (bucket, prefix) listed is allowed by a ListBucket statement, condition included."""
    statements = [s for s in policy["Statement"] if "s3:ListBucket" in s["Action"]]
    for bucket, prefix in calls:
        allowed = [
            s
            for s in statements
            if f"arn:aws:s3:::{bucket}" in s["Resource"]
            and any(
                _string_like(p, prefix)
                for p in s.get("Condition", {}).get("StringLike", {}).get("s3:prefix", ["*"])
            )
        ]
        assert allowed, f"ListObjectsV2 of s3://{bucket}/{prefix} is outside the s3:prefix grant"


def _identities(stack, capsys, name: str, output_uri: str, drop=None):
    """The service role and the runner user, with the printed policies (one grant dropped)."""
    role_arn = f"arn:aws:iam::123456789012:role/{name}-role"
    policies = _printed_policies(capsys, role_arn, output_uri, name)
    service, runner = policies["service_role_policy"], policies["runner_policy"]
    if drop:
        which, sid, action = drop
        service = _without(service, sid, action) if which == "service" else service
        runner = _without(runner, sid, action) if which == "runner" else runner
    assert stack.create_role(f"{name}-role", _as_moto_checks(service)) == role_arn
    keys = stack.create_user(f"{name}-runner", _as_moto_checks(runner))
    stack.assume_job_role(role_arn)
    return role_arn, keys, policies


def _params(tmp_path, output_uri: str, run_name: str, role_arn: str, **extra) -> BatchParams:
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(ROWS)]}).write_csv(source)
    return BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=output_uri,
        run_name=run_name,
        role_arn=role_arn,
        **extra,
    )


def _runner_env(stack, keys: dict[str, str]) -> dict[str, str]:
    return {**stack.env, **FAST_POLLS, **keys}


def _read_parts(stack, parts: list[str]) -> pl.DataFrame:
    """The run's Parquet parts, read with the admin's keys (local paths as they are)."""
    s3 = stack.client("s3")
    frames = []
    for part in parts:
        if part.startswith("s3://"):
            bucket, key = part[5:].split("/", 1)
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            frames.append(pl.read_parquet(body))
        else:
            frames.append(pl.read_parquet(part))
    return pl.concat(frames)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_run_with_printed_policies_completes_under_enforcement(
    iam_stack, environment, list_calls, capsys, tmp_path, where
):
    name = f"enforced-{where}"
    environment({**iam_stack.env, **FAST_POLLS})
    output_uri = f"s3://{iam_stack.bucket}/runs" if where == "s3" else str(tmp_path / "out")
    role_arn, keys, policies = _identities(iam_stack, capsys, name, output_uri)
    environment(_runner_env(iam_stack, keys))
    # Enforcement is on: the runner may not write outside its run.
    denied = iam_stack.client(
        "s3",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    )
    with pytest.raises(denied.exceptions.ClientError, match="AccessDenied"):
        denied.put_object(Bucket=iam_stack.bucket, Key="elsewhere/file", Body=b"")

    summary = batch_inference(_params(tmp_path, output_uri, name, role_arn))

    jobs = iam_stack.ledger(name_contains=name)
    assert [j["status"] for j in jobs] == ["Completed"]
    assert summary["counts"]["succeeded"] == ROWS
    output = _read_parts(iam_stack, summary["parts"])
    assert output.height == ROWS and output[ERROR_CODE].null_count() == ROWS
    assert output[RESPONSE_TEXT].null_count() == 0
    runner_lists = [(b, p) for k, b, p in list_calls if k == keys["AWS_ACCESS_KEY_ID"]]
    assert runner_lists  # the run lists its files, so the condition check below means something
    _check_list_conditions(policies["runner_policy"], runner_lists)
    service_key = iam_stack._emulator.state.s3._request_signer._credentials.access_key
    _check_list_conditions(
        policies["service_role_policy"], [(b, p) for k, b, p in list_calls if k == service_key]
    )


def test_run_without_service_role_read_fails_its_job_with_access_denied(
    iam_stack, environment, capsys, tmp_path
):
    name = "enforced-no-read"
    environment({**iam_stack.env, **FAST_POLLS})
    output_uri = f"s3://{iam_stack.bucket}/runs"
    drop = ("service", "ReadJobInputs", "s3:GetObject")
    role_arn, keys, _ = _identities(iam_stack, capsys, name, output_uri, drop)
    environment(_runner_env(iam_stack, keys))

    # One attempt, no on-demand fallback: the batch job is the only way a row gets answered.
    summary = batch_inference(
        _params(tmp_path, output_uri, name, role_arn, max_attempts=1, on_demand=False)
    )

    jobs = iam_stack.ledger(name_contains=name)
    assert [j["status"] for j in jobs] == ["Failed"]
    bedrock = iam_stack.client("bedrock")
    message = bedrock.get_model_invocation_job(jobIdentifier=jobs[0]["jobArn"])["message"]
    assert message.startswith("AccessDenied: the service role " + role_arn)
    assert "s3:GetObject" in message
    assert summary["counts"]["succeeded"] == 0 and summary["counts"]["failed"] == ROWS
    output = _read_parts(iam_stack, summary["parts"])
    assert output.height == ROWS and output[RESPONSE_TEXT].null_count() == ROWS
    assert output[ERROR_MESSAGE].str.starts_with("AccessDenied").all()


def test_run_without_runner_put_fails_with_access_denied(iam_stack, environment, capsys, tmp_path):
    name = "enforced-no-put"
    environment({**iam_stack.env, **FAST_POLLS})
    output_uri = f"s3://{iam_stack.bucket}/runs"
    drop = ("runner", "RunFiles", "s3:PutObject")
    role_arn, keys, _ = _identities(iam_stack, capsys, name, output_uri, drop)
    environment(_runner_env(iam_stack, keys))

    with pytest.raises(Exception, match="AccessDenied"):
        batch_inference(_params(tmp_path, output_uri, name, role_arn))

    assert iam_stack.ledger(name_contains=name) == []  # refused before any job was paid for


def test_runner_may_abort_a_failed_multipart_upload_of_a_run_file(iam_stack, environment, capsys):
    # boto3 aborts a multipart upload (files over 8 MB: shards, parts) that failed part-way.
    name = "enforced-multipart"
    environment({**iam_stack.env, **FAST_POLLS})
    _, keys, _ = _identities(iam_stack, capsys, name, f"s3://{iam_stack.bucket}/runs")
    s3 = iam_stack.client(
        "s3",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    )
    key = f"runs/{name}/input/shard-00000.jsonl"

    upload = s3.create_multipart_upload(Bucket=iam_stack.bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=iam_stack.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x")
    s3.abort_multipart_upload(Bucket=iam_stack.bucket, Key=key, UploadId=upload)

    left = iam_stack.client("s3").list_multipart_uploads(Bucket=iam_stack.bucket, Prefix=key)
    assert left.get("Uploads", []) == []
