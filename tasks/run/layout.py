"""Where a run's files live: the run folder, the S3 prefix Bedrock reads and writes, and checks.

    <output_uri>/<run_name>/plan.json, state.json, rows/, output/part-NNNNN.parquet
    <job_prefix>/input/shard-NNNNN.jsonl              what Bedrock reads
    <job_prefix>/bedrock-output/shard-NNNNN/<jobId>/  what Bedrock writes

The job prefix is the run folder when output_uri is on S3, else ``<staging_uri>/<run_name>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from tasks.aws import storage
from tasks.aws.clients import client, error_code
from tasks.errors import OutputUriError, RunSettingsError
from tasks.settings import get_settings

ROLE_ARN = re.compile(r"^arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class RunLayout:
    """The two places a run uses."""

    run_name: str
    run_dir: str
    job_prefix: str
    kms_key_id: str | None = None  # encrypts what the run writes to S3


def expand_run_name(run_name: str, today: datetime | None = None) -> str:
    """Fill ``{date}`` (YYYYMMDD, UTC) so a scheduled deployment gets one run per day."""
    day = (today or datetime.now(timezone.utc)).strftime("%Y%m%d")
    name = run_name.replace("{date}", day)
    if not RUN_NAME.match(name):
        msg = (
            f"run_name {name!r} is not usable: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the run folder and the Bedrock jobs)."
        )
        raise RunSettingsError(msg)
    return name


def check_s3_uri(uri: str, setting: str) -> None:
    """A well-formed ``s3://bucket[/prefix]`` or a clear error naming the setting."""
    if not S3_URI.match(uri):
        msg = (
            f"{setting} {uri!r} is not a valid S3 URI: expected s3://<bucket>/<prefix> "
            "with a lowercase bucket name."
        )
        raise OutputUriError(msg)


def check_bucket(uri: str, setting: str) -> None:
    """Fail early, before any job, when the bucket is missing or unreachable."""
    bucket, _ = storage.split_s3(uri)
    try:
        client("s3").head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = error_code(exc)
        reason = "does not exist" if code in ("404", "NoSuchBucket") else f"is not usable ({code})"
        msg = (
            f"The bucket {bucket!r} of {setting} {uri!r} {reason}. Create it, or point "
            f"{setting} at a bucket this identity can write to."
        )
        raise OutputUriError(msg) from exc


def resolve_layout(output_uri: str, run_name: str, kms_key_id: str | None = None) -> RunLayout:
    """Check ``output_uri`` and the staging setting and say where the run's files go."""
    if not output_uri or "://" in output_uri and not storage.is_s3(output_uri):
        msg = (
            f"output_uri {output_uri!r} is not supported: give s3://<bucket>/<prefix> "
            "or a local folder."
        )
        raise OutputUriError(msg)
    run_dir = storage.join(output_uri, run_name)
    if storage.is_s3(output_uri):
        check_s3_uri(output_uri, "output_uri")
        check_bucket(output_uri, "output_uri")
        return RunLayout(run_name, run_dir, run_dir, kms_key_id)
    staging = get_settings().aws.staging_uri
    if not staging:
        msg = (
            f"output_uri {output_uri!r} is a local folder, but Bedrock reads and writes S3: "
            "set BEDROCK_BATCH_STAGING_URI=s3://<bucket>/<prefix> for the job files, "
            "or give an s3:// output_uri."
        )
        raise RunSettingsError(msg)
    check_s3_uri(staging, "BEDROCK_BATCH_STAGING_URI")
    check_bucket(staging, "BEDROCK_BATCH_STAGING_URI")
    return RunLayout(run_name, run_dir, storage.join(staging, run_name), kms_key_id)


def resolve_role_arn(role_arn: str | None) -> str:
    """The run's service role, or the BEDROCK_BATCH_ROLE_ARN default, checked for shape."""
    role = role_arn or get_settings().aws.role_arn
    if not role:
        msg = (
            "No service role: pass role_arn (the IAM role Bedrock assumes to read and write "
            "your S3 prefixes) or set BEDROCK_BATCH_ROLE_ARN. `bedrock-batch iam-policy` "
            "prints the policy it needs."
        )
        raise RunSettingsError(msg)
    if not ROLE_ARN.match(role):
        msg = (
            f"role_arn {role!r} is not an IAM role ARN: expected "
            "arn:aws:iam::<12-digit account>:role/<name>."
        )
        raise RunSettingsError(msg)
    return role
