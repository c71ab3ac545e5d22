"""The Bedrock batch backend: jobs, their state machine, quotas, idempotency and the ledger."""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .catalog import CATALOG, ModelSpec, base_model_id, lookup
from .exceptions import (
    ConflictException,
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    ValidationException,
)
from .responders import CONVERSE, INVOKE_MODEL
from .statuses import STOPPABLE, TRANSITIONS, JobStatus
from .worker import JobWorker

if TYPE_CHECKING:
    from .state import EmulatorServerState


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
