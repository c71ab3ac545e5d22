"""The Bedrock batch backend: jobs, their state machine, quotas, idempotency and the ledger."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import boto3
from botocore.config import Config

from . import runner
from .catalog import CATALOG, ModelSpec, base_model_id, lookup
from .config import EmulatorConfig
from .exceptions import (
    ConflictException,
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    ThrottlingException,
    ValidationException,
)
from .faults import Throttle
from .responders import CONVERSE, INVOKE_MODEL


class JobStatus(str, enum.Enum):
    """ModelInvocationJobStatus, with the transitions Bedrock makes."""

    SUBMITTED = "Submitted"
    VALIDATING = "Validating"
    SCHEDULED = "Scheduled"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    PARTIALLY_COMPLETED = "PartiallyCompleted"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    EXPIRED = "Expired"

    @property
    def final(self) -> bool:
        """No transition leaves this status."""
        return not TRANSITIONS[self]

    @property
    def active(self) -> bool:
        """Counts against the per-model quota of jobs submitted or in progress."""
        return not self.final


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SUBMITTED: frozenset({JobStatus.VALIDATING, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.VALIDATING: frozenset({JobStatus.SCHEDULED, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.SCHEDULED: frozenset({JobStatus.IN_PROGRESS, JobStatus.STOPPING, JobStatus.FAILED}),
    JobStatus.IN_PROGRESS: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.PARTIALLY_COMPLETED,
            JobStatus.FAILED,
            JobStatus.STOPPING,
            JobStatus.EXPIRED,
        }
    ),
    JobStatus.STOPPING: frozenset({JobStatus.STOPPED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.PARTIALLY_COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.STOPPED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}
STOPPABLE = frozenset(
    {JobStatus.SUBMITTED, JobStatus.VALIDATING, JobStatus.SCHEDULED, JobStatus.IN_PROGRESS}
)

JOB_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}$")
ROLE_ARN_PATTERN = re.compile(r"^arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+$")
TOKEN_PATTERN = re.compile(r"^[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}$")
S3_URI_PATTERN = re.compile(
    r"^s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?$"
)
JOB_ID_PATTERN = re.compile(
    r"^(arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/)?(?P<id>[a-z0-9]{12})$"
)
TAG_PATTERN = re.compile(r"^[a-zA-Z0-9\s._:/=+@-]*$")
DEFAULT_TIMEOUT_HOURS = 168


class JobCancelled(Exception):
    """Raised inside a job's worker when a stop request arrives."""


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
    request: dict
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
            "submitTime": _iso(self.submit_time),
            "lastModifiedTime": _iso(self.last_modified or self.submit_time),
            "inputDataConfig": self.request["inputDataConfig"],
            "outputDataConfig": self.request["outputDataConfig"],
            "timeoutDurationInHours": self.timeout_hours,
            "jobExpirationTime": _iso(self.expiration_time),
            "modelInvocationType": self.invocation_type,
        }
        if self.request.get("vpcConfig"):
            out["vpcConfig"] = self.request["vpcConfig"]
        if self.message:
            out["message"] = self.message
        if self.end_time:
            out["endTime"] = _iso(self.end_time)
        if self.total is not None:
            out.update(
                totalRecordCount=self.total,
                processedRecordCount=self.processed,
                successRecordCount=self.success,
                errorRecordCount=self.errors,
            )
        return out

    def ledger_entry(self) -> dict:
        """What the ledger keeps about a created job (tests assert nothing was paid twice)."""
        return {
            "jobArn": self.arn,
            "jobId": self.job_id,
            "jobName": self.name,
            "clientRequestToken": self.client_request_token,
            "modelId": self.model_id,
            "inputUri": self.input_uri,
            "outputUri": self.output_uri,
            "recordCount": self.total,
            "submitTime": _iso(self.submit_time),
            "tags": self.tags,
            "status": self.status.value,
            "statusHistory": [status for status, _ in self.history],
        }


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class BedrockBackend:
    """Jobs of one account and region. Unsupported: vpcConfig and KMS keys are stored only."""

    def __init__(self, account_id: str, region: str, server: EmulatorServerState):
        self.account_id = account_id
        self.region = region
        self.server = server
        self.jobs: dict[str, Job] = {}
        self.by_token: dict[str, Job] = {}
        self.lock = threading.RLock()

    # -- operations ---------------------------------------------------------------------

    def create_model_invocation_job(self, body: dict) -> Job:
        """CreateModelInvocationJob. Unsupported: vpcConfig, s3BucketOwner (stored only)."""
        self.server.check_throttle("create")
        for key in ("jobName", "roleArn", "modelId", "inputDataConfig", "outputDataConfig"):
            if key not in body:
                msg = (
                    f"1 validation error detected: Value null at '{key}' failed to satisfy "
                    "constraint: Member must not be null"
                )
                raise ValidationException(msg)
        name = body["jobName"]
        if not isinstance(name, str) or not JOB_NAME_PATTERN.match(name) or len(name) > 63:
            msg = (
                f"1 validation error detected: Value {_fmt(name)} at 'jobName' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: "
                r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63} and have length 1-63"
            )
            raise ValidationException(msg)
        role = body["roleArn"]
        if not isinstance(role, str) or not ROLE_ARN_PATTERN.match(role):
            msg = (
                f"1 validation error detected: Value {_fmt(role)} at 'roleArn' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: "
                "arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+"
            )
            raise ValidationException(msg)
        token = body.get("clientRequestToken") or uuid.uuid4().hex
        if not TOKEN_PATTERN.match(token):
            msg = (
                f"1 validation error detected: Value {_fmt(token)} at 'clientRequestToken' failed "
                "to satisfy constraint: Member must satisfy regular expression pattern: "
                "[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}"
            )
            raise ValidationException(msg)
        input_uri = (body["inputDataConfig"].get("s3InputDataConfig") or {}).get("s3Uri")
        output_uri = (body["outputDataConfig"].get("s3OutputDataConfig") or {}).get("s3Uri")
        with self.lock:
            existing = self.by_token.get(token)
            if existing is not None:
                same = (
                    existing.name == name
                    and existing.model_id == body["modelId"]
                    and existing.input_uri == input_uri
                    and existing.output_uri == output_uri
                )
                if not same:
                    msg = (
                        f"clientRequestToken {token!r} was already used for job "
                        f"{existing.arn} ({existing.name}) with different parameters; use a "
                        "new token for a different job"
                    )
                    raise ConflictException(msg)
                return existing
        spec = self._validate_model(body)
        invocation_type = body.get("modelInvocationType", INVOKE_MODEL)
        if invocation_type not in (INVOKE_MODEL, CONVERSE):
            msg = (
                f"1 validation error detected: Value {_fmt(invocation_type)} at "
                "'modelInvocationType' failed to satisfy constraint: Member must satisfy enum "
                "value set: [InvokeModel, Converse]"
            )
            raise ValidationException(msg)
        if invocation_type == CONVERSE and not spec.converse:
            msg = (
                f"Model {body['modelId']} does not support the Converse invocation type; "
                "use modelInvocationType InvokeModel for embedding models"
            )
            raise ValidationException(msg)
        timeout = body.get("timeoutDurationInHours", DEFAULT_TIMEOUT_HOURS)
        if not isinstance(timeout, int) or not 24 <= timeout <= 168:
            msg = (
                f"1 validation error detected: Value {_fmt(timeout)} at 'timeoutDurationInHours' "
                "failed to satisfy constraint: Member must have value between 24 and 168"
            )
            raise ValidationException(msg)
        for field_name, uri in (
            ("inputDataConfig.s3InputDataConfig.s3Uri", input_uri),
            ("outputDataConfig.s3OutputDataConfig.s3Uri", output_uri),
        ):
            if not isinstance(uri, str) or not S3_URI_PATTERN.match(uri):
                msg = (
                    f"1 validation error detected: Value {_fmt(uri)} at '{field_name}' failed to "
                    "satisfy constraint: Member must satisfy regular expression pattern: "
                    "s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/...)?"
                )
                raise ValidationException(msg)
        tags = body.get("tags") or []
        for tag in tags:
            key, value = tag.get("key", ""), tag.get("value", "")
            if not key or not TAG_PATTERN.match(key) or not TAG_PATTERN.match(value):
                msg = (
                    f"1 validation error detected: Value {_fmt(tag)} at 'tags' failed to satisfy "
                    r"constraint: key and value must match [a-zA-Z0-9\s._:/=+@-]*, key non-empty"
                )
                raise ValidationException(msg)
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
            quota = self.server.quota()
            base = base_model_id(body["modelId"])
            active = [j for j in self.jobs.values() if j.status.active and j.spec.model_id == base]
            if len(active) >= quota:
                msg = (
                    f"You have reached the quota of {quota} batch inference jobs submitted or in "
                    f"progress for model {base} in {self.region} ({len(active)} now). Wait for a "
                    "job to finish, stop one, or request a quota increase."
                )
                raise ServiceQuotaExceededException(msg)
            job_id = uuid.uuid4().hex[:12]
            now = _now()
            job = Job(
                job_id=job_id,
                arn=f"arn:aws:bedrock:{self.region}:{self.account_id}:model-invocation-job/{job_id}",
                name=name,
                model_id=body["modelId"],
                spec=spec,
                role_arn=role,
                client_request_token=token,
                input_uri=input_uri,
                output_uri=output_uri,
                request=body,
                invocation_type=invocation_type,
                timeout_hours=timeout,
                tags=tags,
                submit_time=now,
                last_modified=now,
                history=[(JobStatus.SUBMITTED.value, now)],
            )
            self.jobs[job_id] = job
            self.by_token[token] = job
            self.server.record_created(job)
        threading.Thread(
            target=JobWorker(self, job, files).run, name=f"job-{job_id}", daemon=True
        ).start()
        return job

    def _validate_model(self, body: dict) -> ModelSpec:
        spec = lookup(body["modelId"])
        if spec is None:
            msg = (
                f"The provided model identifier {body['modelId']!r} is invalid or not supported "
                f"for batch inference. Supported model ids (optionally with a us., eu., apac. or "
                f"global. inference-profile prefix): {', '.join(sorted(CATALOG))}"
            )
            raise ValidationException(msg)
        return spec

    def get_job(self, identifier: str, operation: str = "get") -> Job:
        """GetModelInvocationJob by ARN or 12-character id."""
        self.server.check_throttle(operation)
        match = JOB_ID_PATTERN.match(identifier or "")
        if not match:
            msg = (
                f"1 validation error detected: Value {_fmt(identifier)} at 'jobIdentifier' failed "
                "to satisfy constraint: Member must be a model-invocation-job ARN or its "
                "12-character id"
            )
            raise ValidationException(msg)
        with self.lock:
            job = self.jobs.get(match.group("id"))
        if job is None:
            msg = f"Could not find model invocation job {identifier!r} in {self.region}"
            raise ResourceNotFoundException(msg)
        return job

    def list_jobs(self, params: dict) -> tuple[list[Job], str | None]:
        """ListModelInvocationJobs with its filters, sort and pagination."""
        self.server.check_throttle("list")
        with self.lock:
            jobs = list(self.jobs.values())
        status = params.get("statusEquals")
        if status:
            valid = [s.value for s in JobStatus]
            if status not in valid:
                msg = (
                    f"1 validation error detected: Value {status!r} at 'statusEquals' failed to "
                    f"satisfy constraint: Member must satisfy enum value set: [{', '.join(valid)}]"
                )
                raise ValidationException(msg)
            jobs = [j for j in jobs if j.status.value == status]
        if params.get("nameContains"):
            jobs = [j for j in jobs if params["nameContains"] in j.name]
        for key, keep in (
            ("submitTimeAfter", lambda j, t: j.submit_time > t),
            ("submitTimeBefore", lambda j, t: j.submit_time < t),
        ):
            if params.get(key):
                try:
                    moment = datetime.fromisoformat(params[key].replace("Z", "+00:00"))
                except ValueError:
                    msg = f"Value {params[key]!r} at '{key}' is not an ISO 8601 timestamp"
                    raise ValidationException(msg) from None
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=timezone.utc)
                jobs = [j for j in jobs if keep(j, moment)]
        order = params.get("sortOrder") or "Descending"
        if order not in ("Ascending", "Descending"):
            msg = (
                f"1 validation error detected: Value {order!r} at 'sortOrder' failed to satisfy "
                "constraint: Member must satisfy enum value set: [Ascending, Descending]"
            )
            raise ValidationException(msg)
        sort_by = params.get("sortBy") or "CreationTime"
        if sort_by != "CreationTime":
            msg = (
                f"1 validation error detected: Value {sort_by!r} at 'sortBy' failed to satisfy "
                "constraint: Member must satisfy enum value set: [CreationTime]"
            )
            raise ValidationException(msg)
        jobs.sort(key=lambda j: (j.submit_time, j.job_id), reverse=order == "Descending")
        try:
            limit = int(params.get("maxResults") or 1000)
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            msg = (
                f"1 validation error detected: Value {params.get('maxResults')!r} at "
                "'maxResults' failed to satisfy constraint: Member must have value between 1 "
                "and 1000"
            )
            raise ValidationException(msg)
        start = 0
        if params.get("nextToken"):
            start = _decode_token(params["nextToken"])
        page = jobs[start : start + limit]
        token = _encode_token(start + limit) if start + limit < len(jobs) else None
        return page, token

    def stop_job(self, identifier: str) -> None:
        """StopModelInvocationJob: Stopping now, Stopped once the worker has written outputs."""
        job = self.get_job(identifier, "stop")
        with self.lock:
            if job.status not in STOPPABLE:
                msg = (
                    f"Job {job.arn} is {job.status.value} and cannot be stopped; only "
                    "Submitted, Validating, Scheduled and InProgress jobs can be stopped"
                )
                raise ConflictException(msg)
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


def _encode_token(offset: int) -> str:
    return f"offset-{offset}"


def _decode_token(token: str) -> int:
    try:
        return int(token.removeprefix("offset-"))
    except ValueError:
        msg = f"Invalid nextToken {token!r}: pass back the nextToken of the previous page"
        raise ValidationException(msg) from None


class JobWorker:
    """Walks one job through its statuses; reads faults and pace each tick so they apply live."""

    def __init__(self, backend: BedrockBackend, job: Job, files: list[runner.InputFile]):
        self.backend = backend
        self.server = backend.server
        self.job = job
        self.files = files

    def run(self) -> None:
        """The job's life, from Submitted to a final status."""
        try:
            self._run()
        except JobCancelled:
            self._finish_stop(None, 0)
        except Exception as exc:  # noqa: BLE001 - any crash must end the job, not hang it
            with self.backend.lock:
                if not self.job.status.final:
                    if self.job.status == JobStatus.STOPPING:
                        self.backend.transition(self.job, JobStatus.STOPPED)
                    else:
                        message = f"Internal error while running the job: {exc}"
                        self.backend.transition(self.job, JobStatus.FAILED, message)

    def _wait(self, seconds: float) -> None:
        """Wait, waking early for a stop request."""
        deadline = time.monotonic() + seconds
        while True:
            if self.job.stop_requested:
                raise JobCancelled
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.job.wake.wait(min(left, 0.25))
            self.job.wake.clear()

    def _step(self, status: JobStatus, message: str | None = None) -> None:
        with self.backend.lock:
            if self.job.stop_requested:
                raise JobCancelled
            self.backend.transition(self.job, status, message)

    def _fail(self, message: str) -> None:
        with self.backend.lock:
            if not self.job.stop_requested:
                self.backend.transition(self.job, JobStatus.FAILED, message)
                return
        raise JobCancelled

    def _run(self) -> None:
        job, config = self.job, self.server.config
        self._wait(config.status_step_seconds)
        self._step(JobStatus.VALIDATING)
        self._wait(self.server.config.status_step_seconds)
        try:
            inputs = self._load()
        except runner.InputError as exc:
            self._fail(str(exc))
            return
        if self.server.config.faults.hits_job("fail", job.name):
            self._fail(self.server.config.faults.fail_message)
            return
        self._step(JobStatus.SCHEDULED)
        self._wait(self.server.config.queue_delay_seconds)
        order_seed = int.from_bytes(hashlib.sha256(job.job_id.encode()).digest()[:4], "big")
        results = runner.answer(
            inputs,
            job.spec,
            job.invocation_type,
            self.server.config.faults,
            job.name,
            order_seed + self.server.config.faults.seed,
        )
        self._step(JobStatus.IN_PROGRESS)
        self._progress(results)

    def _load(self):
        config = self.server.config
        inputs, total_bytes, first = [], 0, 0
        for file in self.files:
            uri = f"s3://{file.bucket}/{file.key}"
            if file.size > config.max_file_bytes:
                msg = (
                    f"Input file {uri} is {file.size} bytes, over the quota of "
                    f"{config.max_file_bytes} bytes per file; split it into smaller files"
                )
                raise runner.InputError(msg)
            total_bytes += file.size
            if total_bytes > config.max_job_bytes:
                msg = (
                    f"The job's input under {self.job.input_uri} is over the quota of "
                    f"{config.max_job_bytes} bytes per job; split it into several jobs"
                )
                raise runner.InputError(msg)
        for file in self.files:
            data = self.server.s3.get_object(Bucket=file.bucket, Key=file.key)["Body"].read()
            frame = runner.parse_input(data, f"s3://{file.bucket}/{file.key}", first)
            first += frame.height
            inputs.append((file.name, frame))
        total = sum(frame.height for _, frame in inputs)
        with self.backend.lock:
            self.job.total = total
        if total < config.min_records_per_job:
            msg = (
                f"The job has {total} records in {self.job.input_uri}, below the minimum of "
                f"{config.min_records_per_job} records per batch inference job for "
                f"{self.job.spec.model_id}; add records or combine inputs"
            )
            raise runner.InputError(msg)
        if total > config.max_records_per_job:
            msg = (
                f"The job has {total} records in {self.job.input_uri}, above the maximum of "
                f"{config.max_records_per_job} records per batch inference job for "
                f"{self.job.spec.model_id}; split the input into several jobs"
            )
            raise runner.InputError(msg)
        return inputs

    def _progress(self, results: runner.JobResults) -> None:
        job, total = self.job, results.total
        done = 0.0
        last = time.monotonic()
        while True:
            config = self.server.config
            faults = config.faults
            if job.stop_requested:
                self._finish_stop(results, int(done))
                return
            processed = int(done)
            if processed >= total:
                self._finish(results, total, JobStatus.COMPLETED)
                return
            fraction = processed / total
            if faults.hits_job("expire", job.name) and fraction >= faults.expire_after_fraction:
                message = (
                    f"The job expired: it did not finish within timeoutDurationInHours="
                    f"{job.timeout_hours}; {total - processed} of {total} records were not "
                    "processed"
                )
                self._finish(results, processed, JobStatus.EXPIRED, message)
                return
            partial_at = total - int(round(total * faults.partial_fraction))
            if faults.hits_job("partial", job.name) and processed >= partial_at:
                message = (
                    f"{total - processed} of {total} records were not processed before the job "
                    "ended; retry them in a new job"
                )
                self._finish(results, processed, JobStatus.PARTIALLY_COMPLETED, message)
                return
            now = time.monotonic()
            elapsed, last = now - last, now
            stuck = faults.hits_job("stuck", job.name) and fraction >= faults.stuck_after_fraction
            limit = float(total)
            for fault, at in (
                ("stuck", faults.stuck_after_fraction),
                ("expire", faults.expire_after_fraction),
            ):
                if faults.hits_job(fault, job.name):
                    limit = min(limit, max(float(processed), total * at))
            if faults.hits_job("partial", job.name):
                limit = min(limit, max(float(processed), float(partial_at)))
            rate = 0.0 if stuck else self._rate(results, processed)
            step = limit if rate == float("inf") else rate * elapsed
            done = min(limit, done + step) if not stuck else done
            self._publish(results, int(done))
            if int(done) < total:
                job.wake.wait(config.tick_seconds)
                job.wake.clear()

    def _rate(self, results: runner.JobResults, processed: int) -> float:
        config = self.server.config
        rate = float("inf")
        if config.records_per_second:
            rate = config.records_per_second
        if config.tokens_per_minute:
            _, _, tin, tout = results.counters(max(processed, 1))
            per_record = max((tin + tout) / max(processed, 1), 1.0)
            rate = min(rate, config.tokens_per_minute / 60.0 / per_record)
        return rate

    def _publish(self, results: runner.JobResults, processed: int) -> None:
        success, errors, tin, tout = results.counters(processed)
        with self.backend.lock:
            job = self.job
            job.processed, job.success, job.errors = processed, success, errors
            job.input_tokens, job.output_tokens = tin, tout

    def _finish(
        self,
        results: runner.JobResults,
        processed: int,
        status: JobStatus,
        message: str | None = None,
    ) -> None:
        self._publish(results, processed)
        self.server.write_outputs(self.job, self.files, results, processed)
        with self.backend.lock:
            if self.job.stop_requested:
                self.backend.transition(self.job, JobStatus.STOPPED)
            else:
                self.backend.transition(self.job, status, message)

    def _finish_stop(self, results: runner.JobResults | None, processed: int) -> None:
        if results is not None:
            self._publish(results, processed)
            self.server.write_outputs(self.job, self.files, results, processed)
        with self.backend.lock:
            if self.job.status == JobStatus.STOPPING:
                self.backend.transition(self.job, JobStatus.STOPPED, "Stopped by request")


class EmulatorServerState:
    """What every backend shares: config and faults, S3 access, throttling, the ledger."""

    def __init__(self, config: EmulatorConfig, s3_endpoint_url: str | None, region: str):
        self.initial_config = config
        self.config = config
        self.region = region
        self.throttle = Throttle()
        self.ledger: list[Job] = []
        self.backends: dict[tuple[str, str], BedrockBackend] = {}
        self.lock = threading.Lock()
        self.s3 = boto3.client(
            "s3",
            endpoint_url=s3_endpoint_url,
            region_name=region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def backend(self, region: str | None = None, account_id: str | None = None) -> BedrockBackend:
        """The backend for (account, region), created on first use (moto's BackendDict)."""
        key = (account_id or self.config.account_id, region or self.region)
        with self.lock:
            if key not in self.backends:
                self.backends[key] = BedrockBackend(key[0], key[1], self)
            return self.backends[key]

    def all_jobs(self) -> list[Job]:
        """Jobs of every backend."""
        with self.lock:
            backends = list(self.backends.values())
        return [job for backend in backends for job in list(backend.jobs.values())]

    def quota(self) -> int:
        """Jobs submitted or in progress allowed per model: the fault's, else the config's."""
        return self.config.faults.quota or self.config.max_jobs_per_model

    def check_throttle(self, operation: str) -> None:
        """Raise ThrottlingException when the throttle fault picks this call."""
        if self.throttle.hit(self.config.faults, operation):
            msg = "Too many requests, please wait before trying again. (emulated throttling)"
            raise ThrottlingException(msg)

    def record_created(self, job: Job) -> None:
        """Add a newly created job to the ledger."""
        with self.lock:
            self.ledger.append(job)

    def ledger_entries(self, name_contains: str | None = None) -> list[dict]:
        """Every created job, oldest first."""
        with self.lock:
            jobs = list(self.ledger)
        return [j.ledger_entry() for j in jobs if not name_contains or name_contains in j.name]

    def list_inputs(self, uri: str) -> list[runner.InputFile]:
        """Input objects of a job; none when the bucket or prefix is missing."""
        try:
            return runner.list_inputs(self.s3, uri)
        except self.s3.exceptions.NoSuchBucket:
            return []

    def write_outputs(self, job: Job, files, results, processed: int) -> None:
        """Write the job's outputs and manifest to S3 (with the job's KMS key, as Bedrock does)."""
        key = (job.request["outputDataConfig"].get("s3OutputDataConfig") or {}).get(
            "s3EncryptionKeyId"
        )
        runner.write_outputs(
            self.s3, job.output_uri, job.job_id, files, results, processed, kms_key_id=key
        )

    def set_faults(self, **faults) -> None:
        """Change faults at run time; running jobs see them on their next tick."""
        self.config = dataclasses.replace(self.config, faults=self.config.faults.updated(**faults))
        self._wake_all()

    def configure(self, **changes) -> None:
        """Change pace, throughput or quotas at run time."""
        self.config = self.config.updated(**changes)
        self._wake_all()

    def reset(self) -> None:
        """Faults and config back to what the server started with."""
        self.config = self.initial_config
        self.throttle.reset()
        self._wake_all()

    def _wake_all(self) -> None:
        for job in self.all_jobs():
            job.wake.set()
