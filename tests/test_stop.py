"""Stopping a run's jobs: every in-flight job is tried, and what AWS refused is named."""

from __future__ import annotations

import pytest


def test_stop_tries_every_job_and_names_those_aws_refused(tmp_path, monkeypatch):
    # The first job AWS refused to stop (ResourceNotFound: another region?) ended the loop and
    # left the run's other jobs running and billing.
    from botocore.exceptions import ClientError

    from tasks.errors import StopJobsError
    from tasks.run import stop
    from tasks.run.state import JobAttempt, RunStateStore

    run_dir = str(tmp_path / "run")
    store = RunStateStore(run_dir, "run")
    for n in range(3):
        attempt = JobAttempt(1, f"run-shard-{n}-a1", f"t{n}", records=100, job_arn=f"arn-{n}")
        store.shard(f"shard-{n}").attempts.append(attempt)
        store.save(f"shard-{n}")
    tried = []

    def stop_attempt(store, shard, attempt, reason):
        tried.append(attempt.job_name)
        if attempt.job_arn == "arn-0":
            error = {"Error": {"Code": "ResourceNotFoundException", "Message": "no such job"}}
            raise ClientError(error, "StopModelInvocationJob")
        return True

    monkeypatch.setattr(stop, "_stop_attempt", stop_attempt)
    with pytest.raises(StopJobsError) as exc:
        stop.stop_run_jobs(run_dir, "run", "stop")
    assert tried == [f"run-shard-{n}-a1" for n in range(3)]
    assert "1 job(s) of run run could not be stopped (first: run-shard-0-a1" in str(exc.value)
    assert "2 stopped" in str(exc.value) and "ResourceNotFoundException" in str(exc.value)
