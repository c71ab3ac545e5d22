"""Creating Bedrock batch jobs: deterministic names and tokens, and the throttling-aware create."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from prefect import task

from tasks.aws.clients import client, retry_on_error_codes
from tasks.bedrock.error_codes import RETRYABLE_CREATE
from tasks.bedrock.jobs import JOB_NAME_MAX_LENGTH

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9-]+")


def job_name_for(run_name: str, shard_name: str, attempt: int) -> str:
    """A valid jobName (≤ 63 chars, Bedrock's pattern) that is the same on every re-run."""
    suffix = f"-{shard_name}-a{attempt}"
    base = _NAME_UNSAFE.sub("-", run_name).strip("-") or "run"
    room = JOB_NAME_MAX_LENGTH - len(suffix)
    if len(base) > room:
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:8]
        base = base[: room - 9].rstrip("-") + "-" + digest
    return base + suffix


def client_token_for(run_name: str, shard_name: str, attempt: int) -> str:
    """The idempotency token: a crashed-and-resumed create returns the job it already made."""
    return hashlib.sha256(f"{run_name}|{shard_name}|{attempt}".encode()).hexdigest()[:64]


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


def find_job_by_name(job_name: str) -> str | None:
    """The ARN of an existing job with exactly this name, if Bedrock has one."""
    paginator_kwargs = {"nameContains": job_name, "maxResults": 100}
    bedrock = client("bedrock")
    token = None
    while True:
        page = bedrock.list_model_invocation_jobs(
            **paginator_kwargs, **({"nextToken": token} if token else {})
        )
        for summary in page.get("invocationJobSummaries", []):
            if summary["jobName"] == job_name:
                return summary["jobArn"]
        token = page.get("nextToken")
        if not token:
            return None
