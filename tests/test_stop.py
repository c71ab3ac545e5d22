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

    def stop_attempt(attempt, reason):
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


def test_stop_counts_only_jobs_it_stopped_and_asks_them_all_before_freeing_slots(
    tmp_path, monkeypatch
):
    # `bedrock-batch stop` said "Stopped" of jobs that had completed before its request
    # reached them, and gave each job's slot back (a Prefect call, slow while the CLI's
    # temporary server starts) before asking Bedrock to stop the next: two jobs of a run
    # billed on to their end ~40 s later and were reported as stopped.
    from botocore.exceptions import ClientError

    from tasks.run import gate, stop
    from tasks.run.state import JobAttempt, RunStateStore

    run_dir = str(tmp_path / "run")
    store = RunStateStore(run_dir, "run")
    statuses = {"arn-0": "InProgress", "arn-1": "Completed", "arn-2": "Scheduled"}
    for n in range(3):
        attempt = JobAttempt(
            1, f"run-shard-{n}-a1", f"t{n}", records=100, job_arn=f"arn-{n}", lease_id=f"{n}"
        )
        attempt.status = "InProgress"  # as the run last saw them
        store.shard(f"shard-{n}").attempts.append(attempt)
        store.save(f"shard-{n}")
    calls = []

    class Bedrock:
        def stop_model_invocation_job(self, jobIdentifier):
            calls.append(("stop", jobIdentifier))
            if statuses[jobIdentifier] == "Completed":
                error = {
                    "Error": {"Code": "ValidationException", "Message": "State was: Completed"}
                }
                raise ClientError(error, "StopModelInvocationJob")
            statuses[jobIdentifier] = "Stopping"

    monkeypatch.setattr(stop, "client", lambda service: Bedrock())
    monkeypatch.setattr(stop, "describe_job", lambda arn: {"status": statuses[arn]})
    monkeypatch.setattr(gate, "release_slot", lambda lease, log: calls.append(("free", lease)))

    stopped = stop.stop_run_jobs(run_dir, "run", "stop")

    assert stopped == ["run-shard-0-a1", "run-shard-2-a1"]
    assert [c[0] for c in calls] == ["stop"] * 3 + ["free"] * 3
    state = RunStateStore(run_dir, "run").state.shards
    ended = state["shard-1"].attempts[0]
    assert (ended.status, ended.stopped_by, ended.stop_requested_at) == ("Completed", None, None)
    assert ended.lease_id is None
    assert [state[f"shard-{n}"].attempts[0].stopped_by for n in (0, 2)] == ["stop", "stop"]
    assert state["shard-0"].attempts[0].status == "Stopping"
