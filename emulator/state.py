"""EmulatorServerState: what every backend shares (config and faults, S3, throttling, ledger)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import boto3
from botocore.config import Config

from . import runner
from .config import EmulatorConfig
from .exceptions import ThrottlingException
from .faults import Throttle
from .models import BedrockBackend, Job, iso


def publisher_client(service: str, endpoint_url: str | None, region: str):
    """A client the emulator publishes with (CloudWatch metrics, EventBridge events).

    Bedrock publishes these itself, under no policy of the user's: dummy keys serve moto
    without IAM enforcement, and an enforcing stack swaps in its admin's client.
    """
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


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
        self.s3_endpoint_url = s3_endpoint_url
        # Called with a job after each of its status changes, under the backend's lock.
        self.status_listeners: list[Callable[[Job], None]] = []
        # How long the last write of a job's outputs took here: jobs start writing that long
        # before their paced end (JobWorker._progress). Seconds, not per record, so a small
        # job's fixed cost never makes a large one write minutes early.
        self.write_seconds = 0.0
        self.use_s3_credentials("testing", "testing")

    def use_s3_credentials(
        self, access_key_id: str, secret_access_key: str, session_token: str | None = None
    ) -> None:
        """The credentials jobs read inputs and write outputs with: the service role's, in AWS.

        moto without IAM enforcement accepts any keys; with it, a job can touch only what the
        identity behind these keys is allowed to.
        """
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
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
        return [_ledger_entry(j) for j in jobs if not name_contains or name_contains in j.name]

    def list_inputs(self, uri: str) -> list[runner.InputFile]:
        """Input objects of a job; none when the bucket or prefix is missing."""
        try:
            return runner.list_inputs(self.s3, uri)
        except self.s3.exceptions.NoSuchBucket:
            return []

    def write_outputs(self, job: Job, files, results, processed: int) -> None:
        """Write the job's outputs and manifest to S3 (with the job's KMS key, as Bedrock does)."""
        started = time.monotonic()
        runner.write_outputs(
            self.s3,
            job.output_uri,
            job.job_id,
            files,
            results,
            processed,
            kms_key_id=job.kms_key_id,
        )
        self.write_seconds = time.monotonic() - started

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


def _ledger_entry(job: Job) -> dict:
    """What the ledger keeps about a created job (tests assert nothing was paid twice)."""
    return {
        "jobArn": job.arn,
        "jobId": job.job_id,
        "jobName": job.name,
        "clientRequestToken": job.client_request_token,
        "modelId": job.model_id,
        "inputUri": job.input_uri,
        "outputUri": job.output_uri,
        "recordCount": job.total,
        "submitTime": iso(job.submit_time),
        "tags": job.tags,
        "status": job.status.value,
        "statusHistory": [status for status, _ in job.history],
    }
