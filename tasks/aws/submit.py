"""Creating Bedrock batch jobs: deterministic names and tokens, and the throttling-aware create."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from prefect import task

from tasks.aws.clients import client, retry_on_error_codes
from tasks.bedrock.error_codes import RETRYABLE_CREATE
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


@task(
    task_run_name="create-job-{request.job_name}",
    retries=CREATE_RETRIES,
    retry_delay_seconds=create_backoff(5.0),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_error_codes(RETRYABLE_CREATE),
)
def create_job(request: JobRequest) -> str:
    """CreateModelInvocationJob, idempotent through the request's token.

    Args:
        request: the job to create.

    Returns:
        The job ARN.
    """
    return client("bedrock").create_model_invocation_job(**request.to_api())["jobArn"]


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
    bedrock = client("bedrock")
    next_token = None
    while True:
        page = bedrock.list_model_invocation_jobs(
            nameContains=job_name,
            maxResults=100,
            **({"nextToken": next_token} if next_token else {}),
        )
        for summary in page.get("invocationJobSummaries", []):
            if summary["jobName"] == job_name and _proves_ours(
                summary, token, input_uri, output_uri
            ):
                return summary["jobArn"]
        next_token = page.get("nextToken")
        if not next_token:
            return None


def find_own_job(request: JobRequest) -> str | None:
    """The ARN of the job ``request`` already created (name, token and locations), if any."""
    return find_job(request.job_name, request.client_token, request.input_uri, request.output_uri)
