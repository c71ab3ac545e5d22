"""Creating Bedrock batch jobs: deterministic names and tokens, and the throttling-aware create."""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.aws.clients import client, error_code, job_summaries
from tasks.bedrock.error_codes import QUOTA_EXCEEDED, RETRYABLE_CREATE
from tasks.bedrock.jobs import JOB_NAME_MAX_LENGTH, is_valid_job_name

# Bedrock allows letters, digits, '-', '+' and '.' after the first character; '_' is not allowed.
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9.-]+")
DIGEST_CHARS = 8
# What job_name_for writes: the run key, the run name, the shard and -a<attempt>.
_JOB_NAME_KEY = re.compile(rf"^([0-9a-f]{{{DIGEST_CHARS}}})-.+-a[0-9]+$")


def run_key(run_name: str, location: str, run_id: str) -> str:
    """A short digest of a run's identity: its name, where it lives and its incarnation."""
    text = f"{run_name}|{location}|{run_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def job_name_for(run_name: str, shard_name: str, attempt: int, key: str) -> str:
    """A valid jobName (≤ 63 chars, Bedrock's pattern), the same on every re-run of one run.

    ``key`` (``run_key``) leads, so run names that differ only in characters Bedrock does not
    allow (``nightly.v1`` and ``nightly_v1``), or the same name in two places, never share a job
    name; the run name, shard and attempt follow for people and ``nameContains`` filters.
    """
    suffix = f"-{shard_name}-a{attempt}"
    base = _NAME_UNSAFE.sub("-", run_name).strip("-.") or "run"
    room = JOB_NAME_MAX_LENGTH - len(suffix) - len(key) - 1
    if len(base) > room:
        base = base[:room].rstrip("-.")
    name = f"{key}-{base}{suffix}"
    if not is_valid_job_name(name):
        msg = f"Internal error: job name {name!r} breaks Bedrock's jobName rules."
        raise ValueError(msg)
    return name


def run_key_of(job_name: str) -> str | None:
    """The ``run_key`` a job name of ours starts with (``job_name_for``), else None."""
    match = _JOB_NAME_KEY.match(job_name)
    return match.group(1) if match else None


_JOB_NAME_TAIL = re.compile(r"-(shard-[0-9]+)-a([0-9]+)$")


def jobs_named_for(run_name: str) -> list[str]:
    """Names of the Bedrock jobs ``job_name_for`` gave ``run_name``, under any run key."""
    probe_suffix = "-shard-00000-a1"
    probe = job_name_for(run_name, "shard-00000", 1, "0" * DIGEST_CHARS)
    base = probe[DIGEST_CHARS + 1 : -len(probe_suffix)]
    names = []
    listed = job_summaries(
        client("bedrock").list_model_invocation_jobs, nameContains=base, maxResults=1000
    )
    for summary in listed:
        name, key = summary["jobName"], run_key_of(summary["jobName"])
        tail = _JOB_NAME_TAIL.search(name)
        if key and tail and name == job_name_for(run_name, tail[1], int(tail[2]), key):
            names.append(name)
    return names


def client_token_for(run_id: str, shard_name: str, attempt: int) -> str:
    """The idempotency token: a crashed-and-resumed create returns the job it already made.

    It derives from the run's incarnation id (``run.json``), so a restarted run or another run
    of the same name can never be handed this run's job.
    """
    return hashlib.sha256(f"{run_id}|{shard_name}|{attempt}".encode()).hexdigest()[:64]


@dataclass(frozen=True)
class JobRequest:
    """Everything CreateModelInvocationJob needs for one shard."""

    job_name: str
    client_token: str
    model_id: str
    role_arn: str
    input_uri: str
    output_uri: str
    invocation_type: str = "InvokeModel"
    timeout_hours: int | None = None
    kms_key_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def to_api(self) -> dict:
        """The keyword arguments of boto3's create_model_invocation_job."""
        output: dict = {"s3Uri": self.output_uri}
        if self.kms_key_id:
            output["s3EncryptionKeyId"] = self.kms_key_id
        kwargs: dict = {
            "jobName": self.job_name,
            "clientRequestToken": self.client_token,
            "modelId": self.model_id,
            "roleArn": self.role_arn,
            "inputDataConfig": {
                "s3InputDataConfig": {"s3Uri": self.input_uri, "s3InputFormat": "JSONL"}
            },
            "outputDataConfig": {"s3OutputDataConfig": output},
            "modelInvocationType": self.invocation_type,
        }
        if self.timeout_hours:
            kwargs["timeoutDurationInHours"] = self.timeout_hours
        if self.tags:
            kwargs["tags"] = [{"key": k, "value": v} for k, v in self.tags.items()]
        return kwargs


CREATE_RETRIES = 12
MAX_BACKOFF_SECONDS = 300.0


def create_backoff(base_seconds: float) -> list[float]:
    """Doubling waits from ``base_seconds``, capped: a busy quota can take many minutes."""
    return [min(base_seconds * 2**n, MAX_BACKOFF_SECONDS) for n in range(CREATE_RETRIES)]


def create_job(
    request: JobRequest,
    backoff: Sequence[float],
    logger: logging.Logger | logging.LoggerAdapter,
    quota_held: Callable[[], bool] | None = None,
) -> str:
    """CreateModelInvocationJob, idempotent through the request's token.

    Throttling and a full job quota (RETRYABLE_CREATE) wait ``backoff`` seconds in turn (with
    up to 50 % jitter, so shards refused together do not come back together) and try again;
    the same token can never make a second job. Any other error is the shard's to handle.
    A full quota is waited out at the longest backoff for as long as ``quota_held()`` says jobs
    hold it: they end (a job lasts up to its timeout, 24-168 h), while the backoff's ~35 min
    failed the shard whenever jobs outside the gate (another tool's, a quota below the
    setting) filled the quota for longer.
    This runs inside the shard's task rather than as a task of its own: a task run per create
    cost the Prefect server a few writes per job for nothing a user reads.

    Returns:
        The job ARN.
    """
    bedrock = client("bedrock")
    delays = iter(backoff)
    tried = 0
    while True:
        try:
            return bedrock.create_model_invocation_job(**request.to_api())["jobArn"]
        except Exception as exc:
            code = error_code(exc)
            delay = next(delays, None) if code in RETRYABLE_CREATE else None
            if delay is None and code == QUOTA_EXCEEDED and backoff and quota_held is not None:
                delay = backoff[-1] if quota_held() else None
            if delay is None:
                raise
            tried += 1
            wait = delay * random.uniform(1.0, 1.5)
            logger.warning(
                "Creating %s was refused (%s); trying again in %.1f s (retry %d %s)",
                request.job_name,
                code,
                wait,
                tried,
                f"of {len(backoff)}" if tried <= len(backoff) else "while jobs hold the quota",
            )
            time.sleep(wait)


def _proves_ours(
    summary: dict, token: str, input_uri: str | None = None, output_uri: str | None = None
) -> bool:
    """Whether a listed job is ours: the same token (unique to the run), input and output."""
    output = summary.get("outputDataConfig", {}).get("s3OutputDataConfig", {}).get("s3Uri")
    source = summary.get("inputDataConfig", {}).get("s3InputDataConfig", {}).get("s3Uri")
    return (
        summary.get("clientRequestToken") == token
        and (output_uri is None or output == output_uri)
        and (input_uri is None or source == input_uri)
    )


def find_job(
    job_name: str, token: str, input_uri: str | None = None, output_uri: str | None = None
) -> str | None:
    """The ARN of a job with this exact name that proves ours, if Bedrock has one.

    A job is found by name but adopted only when its clientRequestToken (and, when given, its
    input and output locations) prove it is ours: GetModelInvocationJob and the list summaries
    return those, not the tags (they need ListTagsForResource), and the token is unique to
    this run.
    """
    listed = job_summaries(
        client("bedrock").list_model_invocation_jobs, nameContains=job_name, maxResults=100
    )
    for summary in listed:
        if summary["jobName"] == job_name and _proves_ours(summary, token, input_uri, output_uri):
            return summary["jobArn"]
    return None


def find_own_job(request: JobRequest) -> str | None:
    """The ARN of the job ``request`` already created (name, token and locations), if any."""
    return find_job(request.job_name, request.client_token, request.input_uri, request.output_uri)
