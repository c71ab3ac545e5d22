"""JobWorker: walks one job through its statuses, at the configured pace and under faults."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from . import runner
from .statuses import JobStatus

if TYPE_CHECKING:
    from .models import BedrockBackend, Job


class JobCancelled(Exception):
    """Raised inside a job's worker when a stop request arrives."""


# The least time before a paced job's end at which it starts writing its outputs.
WRITE_LEAD_SECONDS = 0.5


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

    def _wait_until(self, moment: float) -> None:
        """Wait until the monotonic ``moment`` (at once if it passed), waking for a stop."""
        self._wait(moment - time.monotonic())

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
        # `clock` is where the job would be if the emulator's own work took no time: reading
        # the input, answering the records and writing the outputs run while the configured
        # pace runs, not on top of it. A job paced at N records/s over T records with instant
        # statuses ends T/N seconds after its submission, as the settings say, however long the
        # fake model takes (when that fits in the pace); before, a 6.5 s job took 7.2 s on a
        # busy machine.
        job, clock = self.job, time.monotonic()
        clock += self.server.config.status_step_seconds
        self._wait_until(clock)
        self._step(JobStatus.VALIDATING)
        clock += self.server.config.status_step_seconds
        try:
            inputs = self._load()
        except runner.InputError as exc:
            self._wait_until(clock)
            self._fail(str(exc))
            return
        self._wait_until(clock)
        if self.server.config.faults.hits_job("fail", job.name):
            self._fail(self.server.config.faults.fail_message)
            return
        self._step(JobStatus.SCHEDULED)
        clock += self.server.config.queue_delay_seconds
        order_seed = int.from_bytes(hashlib.sha256(job.job_id.encode()).digest()[:4], "big")
        results = runner.answer(
            inputs,
            job.spec,
            job.invocation_type,
            self.server.config.faults,
            job.name,
            order_seed + self.server.config.faults.seed,
        )
        self._wait_until(clock)
        if self.server.config.faults.hits_job("expire", job.name):
            # Expired: scheduled but never started before the timeout (botocore's status docs),
            # so nothing was processed: empty outputs and a manifest that says so.
            message = (
                f"The job expired: it was scheduled but did not start within "
                f"timeoutDurationInHours={job.timeout_hours}; none of its {results.total} records "
                "were processed. Submit a new job."
            )
            self._finish(results, 0, JobStatus.EXPIRED, message)
            return
        self._step(JobStatus.IN_PROGRESS)
        self._progress(results, started=clock)

    def _load(self):
        config = self.server.config
        self._check_output()
        inputs, total_bytes, first = [], 0, 0
        for file in self.files:
            uri = f"s3://{file.bucket}/{file.key}"
            runner.check_extension(file)
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
            data = self._read(file)
            frame = runner.parse_input(data, f"s3://{file.bucket}/{file.key}", first)
            first += frame.height
            inputs.append((file.name, frame))
        salt = f"{config.faults.seed}:{self.job.job_id}".encode()
        inputs = runner.fill_record_ids(inputs, int.from_bytes(hashlib.sha256(salt).digest()[:8]))
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

    def _read(self, file: runner.InputFile) -> bytes:
        """An input file's bytes; S3 refusing the job's role fails the job with AccessDenied."""
        try:
            return self.server.s3.get_object(Bucket=file.bucket, Key=file.key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("403", "AccessDenied"):
                raise
            msg = (
                f"AccessDenied: the service role {self.job.role_arn} may not read the input "
                f"file s3://{file.bucket}/{file.key} (s3:GetObject). Allow it in the role's "
                "policy (`bedrock-batch iam-policy` prints one) and submit the job again"
            )
            raise runner.InputError(msg) from exc

    def _check_output(self) -> None:
        """Fail in Validating when the output bucket is missing or the role may not write it.

        Validating checks that "Your IAM service role has access to the Amazon S3 buckets
        containing your files" (botocore's GetModelInvocationJobResponse.status), so a job that
        cannot write its outputs ends there, with nothing processed, not after its records.
        """
        job = self.job
        try:
            runner.probe_output(self.server.s3, job.output_uri, job.job_id, job.kms_key_id)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            bucket, _ = runner.split_s3_uri(job.output_uri)
            if code == "NoSuchBucket":
                msg = (
                    f"The output bucket {bucket} of {job.output_uri} does not exist "
                    "(NoSuchBucket). Create it, or give an s3OutputDataConfig.s3Uri in an "
                    "existing bucket, and submit the job again"
                )
            elif code in ("403", "AccessDenied"):
                msg = (
                    f"AccessDenied: the service role {job.role_arn} may not write the job's "
                    f"outputs under {job.output_uri} in bucket {bucket} (s3:PutObject). Allow it "
                    "in the role's policy (`bedrock-batch iam-policy` prints one) and submit the "
                    "job again"
                )
            else:
                raise
            raise runner.InputError(msg) from exc

    def _progress(self, results: runner.JobResults, started: float) -> None:
        """Records processed at the configured rate from ``started``, the job's paced start."""
        job, total = self.job, results.total
        done = 0.0
        last = min(started, time.monotonic())
        written: int | None = None  # records whose outputs are in S3 already
        while True:
            config = self.server.config
            faults = config.faults
            if job.stop_requested:
                self._finish_stop(results, int(done))
                return
            processed = int(done)
            if processed >= total:
                self._finish(results, total, JobStatus.COMPLETED, written=written)
                return
            fraction = processed / total
            partial_at = total - int(round(total * faults.partial_fraction))
            if faults.hits_job("partial", job.name) and processed >= partial_at:
                # PartiallyCompleted: "Not all of your records could be processed in time".
                message = (
                    f"{total - processed} of {total} records were not processed within "
                    f"timeoutDurationInHours={job.timeout_hours}; retry them in a new job"
                )
                self._finish(results, processed, JobStatus.PARTIALLY_COMPLETED, message)
                return
            now = time.monotonic()
            elapsed, last = now - last, now
            stuck = faults.hits_job("stuck", job.name) and fraction >= faults.stuck_after_fraction
            limit = float(total)
            if faults.hits_job("stuck", job.name):
                limit = min(limit, max(float(processed), total * faults.stuck_after_fraction))
            if faults.hits_job("partial", job.name):
                limit = min(limit, max(float(processed), float(partial_at)))
            rate = 0.0 if stuck else self._rate(results, processed)
            step = limit if rate == float("inf") else rate * elapsed
            done = min(limit, done + step) if not stuck else done
            self._publish(results, int(done))
            left = (limit - done) / rate if 0 < rate < float("inf") else 0.0  # paced seconds
            # Writing the outputs is the emulator's work too: it starts before the paced end,
            # so the job ends at its paced time. Twice as long before as the last write took
            # and at least WRITE_LEAD_SECONDS: jobs that end together write side by side, each
            # slower than the last one alone, and the first jobs have no last write to go by
            # (20 jobs of 2,000 records ending at once ended 0.2-0.5 s late without both).
            lead = max(2 * self.server.write_seconds, WRITE_LEAD_SECONDS)
            if written is None and limit == total and 0 < left <= lead:
                self.server.write_outputs(job, self.files, results, total)
                written = total
            if int(done) < total:
                # The last tick lands when the records are done, not up to a tick later.
                job.wake.wait(min(config.tick_seconds, left) if left > 0 else config.tick_seconds)
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
        written: int | None = None,
    ) -> None:
        """The final status, after the outputs of ``processed`` records (unless ``written``)."""
        self._publish(results, processed)
        if written != processed:
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
