"""Where a run's files live: the one owner of every key and file name a run reads or writes.

    <output_uri>/<run_name>/run.json, owner.json, plan.json, state.json, summary.json
    <output_uri>/<run_name>/state/shard-NNNNN.json          each shard's state, as it changes
    <output_uri>/<run_name>/rows/shard-NNNNN.parquet, rows/skipped.parquet
    <output_uri>/<run_name>/output/part-NNNNN.parquet, output/skipped.parquet
    <output_uri>/<run_name>/on-demand/<jobName>/<first recordId>.jsonl.out
    <job_prefix>/input/shard-NNNNN.jsonl, input/shard-NNNNN-aN.jsonl   what Bedrock reads
    <job_prefix>/bedrock-output/shard-NNNNN/<jobId>/...                  what Bedrock writes

The job prefix is the run folder when output_uri is on S3, else
``<staging_uri>/<run_name>/<digest of the local run folder>``, so two local folders that use the
same run name never share job files. Everything else (preprocess, merge, the IAM policies) asks
this module for names instead of spelling them.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from tasks.aws import storage
from tasks.aws.clients import client, error_code
from tasks.errors import OutputUriError, RunSettingsError
from tasks.settings import get_settings

ROLE_ARN = re.compile(r"^arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Every file and folder name of a run, defined here once.
IDENTITY_FILE = "run.json"
OWNER_FILE = "owner.json"
PLAN_FILE = "plan.json"
STATE_FILE = "state.json"
STATE_DIR = "state"
SUMMARY_FILE = "summary.json"
INPUT_DIR = "input"
ROWS_DIR = "rows"
OUTPUT_DIR = "output"
BEDROCK_OUTPUT_DIR = "bedrock-output"
ON_DEMAND_DIR = "on-demand"
SKIPPED = "skipped"
JSONL = ".jsonl"
OUT_SUFFIX = ".out"  # Bedrock appends it to each input file name
PARQUET = ".parquet"
SKIPPED_FILE = SKIPPED + PARQUET
SKIPPED_ROWS_FILE = f"{ROWS_DIR}/{SKIPPED_FILE}"
REPLACED_MARK = ".replaced-"


def replaced_stamp() -> str:
    """When a restart moved something aside, as the ``REPLACED_MARK`` names show it (UTC)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


# The run segment of a layout that stands for every run under a prefix (IAM policies).
ANY_RUN = "*"


def state_file_in(run_dir: str) -> str:
    """The run's compacted state (written at the end of a run and by ``stop``)."""
    return storage.join(run_dir, STATE_FILE)


def shard_state_prefix(run_dir: str) -> str:
    """Where each shard's own state object lives, rewritten only when that shard changes."""
    return storage.join(run_dir, STATE_DIR)


def shard_state_file(run_dir: str, shard: str) -> str:
    return storage.join(run_dir, STATE_DIR, shard + ".json")


def shard_name(index: int) -> str:
    """Stem of a shard's files; Bedrock names its output `<jobId>/<stem>.jsonl.out`."""
    return f"shard-{index:05d}"


def part_name(index: int) -> str:
    """File name of a shard's merged output."""
    return f"part-{index:05d}{PARQUET}"


def input_file(shard: str, attempt: int = 1) -> str:
    """A shard's JSONL relative to the job prefix: the whole shard, or a retry's remainder."""
    stem = shard if attempt == 1 else f"{shard}-a{attempt}"
    return f"{INPUT_DIR}/{stem}{JSONL}"


def rows_file(shard: str) -> str:
    """A shard's input rows (kept for the merge) relative to the run folder."""
    return f"{ROWS_DIR}/{shard}{PARQUET}"


def output_file_name(input_name: str) -> str:
    """The name Bedrock gives the output of an input file."""
    return input_name.rsplit("/", 1)[-1] + OUT_SUFFIX


@dataclass(frozen=True)
class RunLayout:
    """The run folder and the S3 prefix Bedrock reads and writes, and every key under them."""

    run_name: str
    run_dir: str
    job_prefix: str
    kms_key_id: str | None = None  # encrypts what the run writes to S3

    # -- run files (the runner reads and writes them) --------------------------------------

    def run_file(self, relative: str) -> str:
        """A file of the run folder from its relative name (as the plan keeps it)."""
        return storage.join(self.run_dir, relative)

    @property
    def identity_uri(self) -> str:
        return self.run_file(IDENTITY_FILE)

    @property
    def owner_uri(self) -> str:
        return self.run_file(OWNER_FILE)

    @property
    def plan_uri(self) -> str:
        return self.run_file(PLAN_FILE)

    @property
    def state_uri(self) -> str:
        return self.run_file(STATE_FILE)

    @property
    def summary_uri(self) -> str:
        return self.run_file(SUMMARY_FILE)

    @property
    def rows_dir(self) -> str:
        return self.run_file(ROWS_DIR)

    @property
    def output_dir(self) -> str:
        return self.run_file(OUTPUT_DIR)

    def rows_uri(self, shard: str) -> str:
        return self.run_file(rows_file(shard))

    def part_uri(self, index: int) -> str:
        return storage.join(self.output_dir, part_name(index))

    @property
    def skipped_part_uri(self) -> str:
        return storage.join(self.output_dir, SKIPPED_FILE)

    def on_demand_prefix(self, job_name: str) -> str:
        """Where one on-demand attempt keeps its answers, one small file per batch."""
        return self.run_file(f"{ON_DEMAND_DIR}/{job_name}") + "/"

    def on_demand_batch_uri(self, job_name: str, first_record_id: str) -> str:
        return self.on_demand_prefix(job_name) + output_file_name(first_record_id + JSONL)

    # -- job files (Bedrock reads and writes them) -----------------------------------------

    def input_uri(self, shard: str, attempt: int = 1) -> str:
        """The JSONL a job reads."""
        return storage.join(self.job_prefix, input_file(shard, attempt))

    def job_file(self, relative: str) -> str:
        """A file under the job prefix from its relative name (as plan and state keep it)."""
        return storage.join(self.job_prefix, relative)

    @property
    def input_prefix(self) -> str:
        return storage.join(self.job_prefix, INPUT_DIR) + "/"

    @property
    def bedrock_output_root(self) -> str:
        return storage.join(self.job_prefix, BEDROCK_OUTPUT_DIR) + "/"

    def bedrock_output_prefix(self, shard: str) -> str:
        """The outputDataConfig of a shard's jobs: Bedrock writes ``<jobId>/`` under it."""
        return storage.join(self.job_prefix, BEDROCK_OUTPUT_DIR, shard) + "/"

    def aside(self, stamp: str) -> RunLayout:
        """Where ``restart`` moves this run: a sibling folder (and job prefix) marked replaced."""
        mark = REPLACED_MARK + stamp
        return RunLayout(
            self.run_name + mark, self.run_dir + mark, self.job_prefix + mark, self.kms_key_id
        )


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
    except Exception as exc:
        code = error_code(exc)
        if code is None:
            raise  # not an AWS refusal (botocore is imported lazily, see tasks.aws.clients)
        reason = "does not exist" if code in ("404", "NoSuchBucket") else f"is not usable ({code})"
        msg = (
            f"The bucket {bucket!r} of {setting} {uri!r} {reason}. Create it, or point "
            f"{setting} at a bucket this identity can write to."
        )
        raise OutputUriError(msg) from exc


def _staging_prefix(staging: str, run_name: str, run_dir: str) -> str:
    if run_name == ANY_RUN:
        return storage.join(staging, ANY_RUN)
    folder = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return storage.join(staging, run_name, folder)


# A scheme with one slash ("s3:/bucket/runs"): read as a local path, the run went to a folder
# named "s3:". Two letters at least, so that a Windows drive ("C:/runs") stays a path.
_ONE_SLASH_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def check_output_uri_form(output_uri: str) -> None:
    """Refuse an output_uri that is a URI missing a slash, before it becomes a folder."""
    typo = _ONE_SLASH_URI.match(output_uri or "")
    if typo:
        fixed = f"{typo[1]}://{output_uri[typo.end() :]}"
        msg = (
            f"output_uri {output_uri!r} has one slash after '{typo[1]}:', and would be read as "
            f"a local folder named '{typo[1]}:'. Write {fixed!r}."
        )
        raise OutputUriError(msg)


def layout_for(
    output_uri: str, run_name: str, kms_key_id: str | None = None, *, check: bool = False
) -> RunLayout:
    """The layout of ``run_name`` (or ANY_RUN) under ``output_uri``; ``check`` asks S3 too."""
    check_output_uri_form(output_uri)
    if not output_uri or "://" in output_uri and not storage.is_s3(output_uri):
        msg = (
            f"output_uri {output_uri!r} is not supported: give s3://<bucket>/<prefix> "
            "or a local folder."
        )
        raise OutputUriError(msg)
    run_dir = storage.join(output_uri, run_name)
    if storage.is_s3(output_uri):
        check_s3_uri(output_uri, "output_uri")
        if check:
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
    if check:
        check_bucket(staging, "BEDROCK_BATCH_STAGING_URI")
    return RunLayout(run_name, run_dir, _staging_prefix(staging, run_name, run_dir), kms_key_id)


def resolve_layout(output_uri: str, run_name: str, kms_key_id: str | None = None) -> RunLayout:
    """Check ``output_uri`` and the staging setting and say where the run's files go."""
    return layout_for(output_uri, run_name, kms_key_id, check=True)


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
