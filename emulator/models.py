"""The Bedrock batch backend: jobs, their state machine, quotas, idempotency and the ledger."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from tasks.bedrock.catalog import quota_key

from .catalog import ModelSpec
from .exceptions import (
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    ValidationException,
)
from .responders import INVOKE_MODEL
from .statuses import STOPPABLE, TRANSITIONS, JobStatus
from .validation import (
    MAX_LIST_RESULTS,
    job_id_from_identifier,
    model_for_batch,
    validate_create_model_invocation_job,
    validate_list_model_invocation_jobs,
)
from .worker import JobWorker

if TYPE_CHECKING:
    from .state import EmulatorServerState


DEFAULT_TIMEOUT_HOURS = 168


def _now() -> datetime:
    """Now, to the millisecond: what the API shows is what filters compare."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass
class Job:
    """One model invocation job and its live counters."""

    job_id: str
    arn: str
    name: str
    model_id: str
    spec: ModelSpec
    role_arn: str
    client_request_token: str
    input_uri: str
    output_uri: str
    input_data_config: dict
    output_data_config: dict
    vpc_config: dict | None
    invocation_type: str
    timeout_hours: int
    tags: list[dict]
    submit_time: datetime
    status: JobStatus = JobStatus.SUBMITTED
    message: str | None = None
    last_modified: datetime | None = None
    end_time: datetime | None = None
    total: int | None = None
    processed: int = 0
    success: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    history: list[tuple[str, datetime]] = field(default_factory=list)
    stop_requested: bool = False
    wake: threading.Event = field(default_factory=threading.Event)

    @property
    def expiration_time(self) -> datetime:
        """submitTime plus the job's timeout."""
        return self.submit_time + timedelta(hours=self.timeout_hours)

    @property
    def pending_records(self) -> int:
        """Records not yet processed while the job is active."""
        if self.status.final or self.total is None:
            return 0
        return self.total - self.processed

    def describe(self) -> dict:
        """The GetModelInvocationJob / ListModelInvocationJobs summary shape."""
        out = {
            "jobArn": self.arn,
            "jobName": self.name,
            "modelId": self.model_id,
            "clientRequestToken": self.client_request_token,
            "roleArn": self.role_arn,
            "status": self.status.value,
            "submitTime": iso(self.submit_time),
            "lastModifiedTime": iso(self.last_modified or self.submit_time),
            "inputDataConfig": self.input_data_config,
            "outputDataConfig": self.output_data_config,
            "timeoutDurationInHours": self.timeout_hours,
            "jobExpirationTime": iso(self.expiration_time),
            "modelInvocationType": self.invocation_type,
        }
        if self.vpc_config:
            out["vpcConfig"] = self.vpc_config
        if self.message:
            out["message"] = self.message
        if self.end_time:
            out["endTime"] = iso(self.end_time)
        if self.total is not None:
            out.update(
                totalRecordCount=self.total,
                processedRecordCount=self.processed,
                successRecordCount=self.success,
                errorRecordCount=self.errors,
            )
        return out

    @property
    def kms_key_id(self) -> str | None:
        """The KMS key Bedrock encrypts the outputs with, if the request gave one."""
        return self.output_data_config["s3OutputDataConfig"].get("s3EncryptionKeyId")


def iso(value: datetime) -> str:
    """A timestamp the way the bedrock API shows it: UTC, milliseconds, Z."""
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BedrockBackend:
    """Jobs of one account and region: the four batch operations, quotas and idempotency."""

    def __init__(self, account_id: str, region: str, server: EmulatorServerState):
        self.account_id = account_id
        self.region = region
        self.server = server
        self.jobs: dict[str, Job] = {}
        self.by_token: dict[str, Job] = {}
        self.lock = threading.RLock()

    # -- operations ---------------------------------------------------------------------

    def create_model_invocation_job(
        self,
        *,
        job_name: str,
        role_arn: str,
        model_id: str,
        input_data_config: dict,
        output_data_config: dict,
        client_request_token: str | None = None,
        vpc_config: dict | None = None,
        timeout_duration_in_hours: int | None = None,
        tags: list[dict] | None = None,
        model_invocation_type: str | None = None,
    ) -> Job:
        """CreateModelInvocationJob.

        Unsupported (accepted and stored, without effect): vpcConfig (its shape is checked),
        s3BucketOwner, s3InputFormat (JSONL is the only value). roleArn is checked for shape
        only; no IAM policy is evaluated. s3EncryptionKeyId is passed to S3 as SSE-KMS on every
        output.
        """
        self.server.check_throttle("create")
        validate_create_model_invocation_job(
            job_name=job_name,
            role_arn=role_arn,
            model_id=model_id,
            input_data_config=input_data_config,
            output_data_config=output_data_config,
            client_request_token=client_request_token,
            timeout_duration_in_hours=timeout_duration_in_hours,
            tags=tags,
            model_invocation_type=model_invocation_type,
            vpc_config=vpc_config,
        )
        token = client_request_token or uuid.uuid4().hex
        input_uri = input_data_config["s3InputDataConfig"]["s3Uri"]
        output_uri = output_data_config["s3OutputDataConfig"]["s3Uri"]
        with self.lock:
            existing = self.by_token.get(token)
        if existing is not None:
            # "If this token matches a previous request, Amazon Bedrock ignores the request,
            # but does not return an error" (botocore CreateModelInvocationJobRequest
            # .clientRequestToken): the job the token made, whatever the other parameters.
            return existing
        invocation_type = model_invocation_type or INVOKE_MODEL
        spec = model_for_batch(model_id, invocation_type, self.region)
        files = self.server.list_inputs(input_uri)
        if not files:
            msg = (
                f"The input location {input_uri} holds no .jsonl object: give the URI of a "
                ".jsonl file or of a prefix with .jsonl files under it"
            )
            raise ValidationException(msg)
        with self.lock:
            existing = self.by_token.get(token)
            if existing is not None:
                return existing
            self._check_quota(model_id)
            job_id = uuid.uuid4().hex[:12]
            now = _now()
            job = Job(
                job_id=job_id,
                arn=f"arn:aws:bedrock:{self.region}:{self.account_id}:model-invocation-job/{job_id}",
                name=job_name,
                model_id=model_id,
                spec=spec,
                role_arn=role_arn,
                client_request_token=token,
                input_uri=input_uri,
                output_uri=output_uri,
                input_data_config=input_data_config,
                output_data_config=output_data_config,
                vpc_config=vpc_config,
                invocation_type=invocation_type,
                timeout_hours=timeout_duration_in_hours or DEFAULT_TIMEOUT_HOURS,
                tags=tags or [],
                submit_time=now,
                last_modified=now,
                history=[(JobStatus.SUBMITTED.value, now)],
            )
            self.jobs[job_id] = job
            self.by_token[token] = job
            self.server.record_created(job)
            self._announce(job)
        threading.Thread(
            target=JobWorker(self, job, files).run, name=f"job-{job_id}", daemon=True
        ).start()
        return job

    def _check_quota(self, model_id: str) -> None:
        # One owner of how the quota counts: a profile's jobs count against its base model.
        quota = self.server.quota()
        base = quota_key(model_id)
        active = [
            j for j in self.jobs.values() if j.status.active and quota_key(j.model_id) == base
        ]
        if len(active) >= quota:
            msg = (
                f"You have reached the quota of {quota} batch inference jobs submitted or in "
                f"progress for model {base} in {self.region} ({len(active)} now). Wait for a "
                "job to finish, stop one, or request a quota increase."
            )
            raise ServiceQuotaExceededException(msg)

    def get_model_invocation_job(self, job_identifier: str, operation: str = "get") -> Job:
        """GetModelInvocationJob by ARN or 12-character id."""
        self.server.check_throttle(operation)
        job_id = job_id_from_identifier(job_identifier)
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            msg = f"Could not find model invocation job {job_identifier!r} in {self.region}"
            raise ResourceNotFoundException(msg)
        return job

    def list_model_invocation_jobs(
        self,
        *,
        submit_time_after: datetime | None = None,
        submit_time_before: datetime | None = None,
        status_equals: str | None = None,
        name_contains: str | None = None,
        max_results: int | None = None,
        next_token: str | None = None,
        sort_by: str | None = None,
        sort_order: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """ListModelInvocationJobs with its filters, sort and pagination.

        Unsupported: none. nextToken is an opaque offset, valid while the job set is unchanged.
        """
        self.server.check_throttle("list")
        validate_list_model_invocation_jobs(
            status_equals=status_equals,
            statuses=[s.value for s in JobStatus],
            max_results=max_results,
            sort_by=sort_by,
            sort_order=sort_order,
            name_contains=name_contains,
        )
        with self.lock:
            jobs = list(self.jobs.values())
        if status_equals:
            jobs = [j for j in jobs if j.status.value == status_equals]
        if name_contains:
            jobs = [j for j in jobs if name_contains in j.name]
        if submit_time_after:
            jobs = [j for j in jobs if j.submit_time > submit_time_after]
        if submit_time_before:
            jobs = [j for j in jobs if j.submit_time < submit_time_before]
        descending = (sort_order or "Descending") == "Descending"
        jobs.sort(key=lambda j: (j.submit_time, j.job_id), reverse=descending)
        limit = max_results or MAX_LIST_RESULTS
        start = _decode_token(next_token) if next_token else 0
        page = jobs[start : start + limit]
        token = _encode_token(start + limit) if start + limit < len(jobs) else None
        return page, token

    def stop_model_invocation_job(self, job_identifier: str) -> None:
        """StopModelInvocationJob: Stopping now, Stopped once the worker has written outputs."""
        job = self.get_model_invocation_job(job_identifier, "stop")
        with self.lock:
            if job.status not in STOPPABLE:
                # AWS answers ValidationException here, its message ending "State was: <status>"
                # (apache/airflow's example_bedrock_batch_inference.py matches on
                # "State was: Completed" after stopping a finished job).
                msg = (
                    f"Job {job.arn} cannot be stopped: only Submitted, Validating, Scheduled and "
                    f"InProgress jobs can be stopped. State was: {job.status.value}"
                )
                raise ValidationException(msg)
            job.stop_requested = True
            self.transition(job, JobStatus.STOPPING)
        job.wake.set()

    # -- state machine ------------------------------------------------------------------

    def transition(self, job: Job, status: JobStatus, message: str | None = None) -> None:
        """Move `job` to `status`, refusing moves the table does not allow."""
        with self.lock:
            if status not in TRANSITIONS[job.status]:
                msg = f"illegal transition {job.status.value} -> {status.value} for {job.arn}"
                raise RuntimeError(msg)
            now = _now()
            job.status = status
            job.last_modified = now
            job.history.append((status.value, now))
            if message:
                job.message = message
            if status.final:
                job.end_time = now
            self._announce(job)

    def _announce(self, job: Job) -> None:
        """Tell the status listeners (the EventBridge publisher) the job's new status."""
        for listener in self.server.status_listeners:
            listener(job)


def _encode_token(offset: int) -> str:
    return f"offset-{offset}"


def _decode_token(token: str) -> int:
    try:
        return int(token.removeprefix("offset-"))
    except ValueError:
        msg = f"Invalid nextToken {token!r}: pass back the nextToken of the previous page"
        raise ValidationException(msg) from None
