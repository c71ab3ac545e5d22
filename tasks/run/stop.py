"""Stopping a run's in-flight Bedrock jobs: on cancel or crash of its flow run, or by hand."""

from __future__ import annotations

import logging
import time
import weakref

from botocore.exceptions import ClientError

from tasks.aws.clients import client, error_code
from tasks.aws.poll import describe_job
from tasks.aws.submit import find_job
from tasks.bedrock.error_codes import CONFLICT, RETRYABLE_GET, VALIDATION
from tasks.bedrock.statuses import STOPPED, STOPPING
from tasks.errors import StopJobsError
from tasks.pipeline import columns as C
from tasks.run import gate
from tasks.run.owner import live_holder_elsewhere, owner_text
from tasks.run.state import JobAttempt, RunStateStore, has_state, now_iso

log = logging.getLogger("bedrock_batch.stop")

# The state of runs alive in this process: a hook in the flow's own process must write through
# the store its shard threads use, or a later save of theirs would undo the stop's record.
_live_stores: weakref.WeakValueDictionary[str, RunStateStore] = weakref.WeakValueDictionary()


def register_live_store(run_dir: str, store: RunStateStore) -> None:
    """Remember the store a running run writes its state through."""
    _live_stores[run_dir] = store


def _stop_job(job_arn: str) -> None:
    """StopModelInvocationJob; a job that already ended (or is stopping) is left as it is."""
    delay = 0.5
    for _ in range(8):
        try:
            client("bedrock").stop_model_invocation_job(jobIdentifier=job_arn)
            return
        except ClientError as exc:
            code = error_code(exc)
            if code in (CONFLICT, VALIDATION):  # "State was: Completed" and the like
                return
            if code not in RETRYABLE_GET:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    client("bedrock").stop_model_invocation_job(jobIdentifier=job_arn)


def _stop_attempt(attempt: JobAttempt, reason: str) -> bool:
    """Ask Bedrock to stop the attempt's job; True when it is stopping (or stopped) now.

    A job that ended on its own before the request reached it (Completed, Failed...) keeps
    its status and is not recorded as stopped: its answers are whole and were paid anyway.
    """
    job_arn = attempt.job_arn
    if job_arn is None and attempt.lease_id:  # created just before a crash, ARN not saved
        job_arn = find_job(attempt.job_name, attempt.client_token)
    if job_arn is None:
        return False
    _stop_job(job_arn)
    attempt.job_arn = job_arn
    attempt.status = describe_job(job_arn)["status"]
    if attempt.status not in (STOPPING, STOPPED):
        log.info("Job %s had already ended (%s): nothing to stop", attempt.job_name, attempt.status)
        return False
    attempt.stop_requested_at = now_iso()
    attempt.stopped_by = reason
    return True


def _free_slot(store: RunStateStore, shard: str, attempt: JobAttempt) -> None:
    """Give the attempt's gate slot back and save its shard's state."""
    slot = gate.KEEPER.drop(attempt.job_name)
    lease_id = (slot.lease_id if slot else None) or attempt.lease_id
    if lease_id:
        gate.release_slot(lease_id, log)
        attempt.lease_id = None
    store.save(shard)


def stop_run_jobs(
    run_dir: str, run_name: str, reason: str, kms_key_id: str | None = None
) -> list[str]:
    """Stop every job of the run that is still in flight, free its slot and record it.

    Outputs of the records a stopped job processed are kept by Bedrock and merged by a re-run;
    a re-run sends the rest again only with ``retry_stopped``.

    Args:
        run_dir: the run folder, ``<output_uri>/<run_name>``.
        run_name: the run's name.
        reason: why, recorded in each attempt's ``stopped_by`` (cancelled, crashed, stop).
        kms_key_id: the run's key, to write its state back encrypted.

    Returns:
        The names of the jobs stopped.
    """
    store = _live_stores.get(run_dir)
    owner = None
    if store is None:
        if not has_state(run_dir):
            return []
        store = RunStateStore(run_dir, run_name, kms_key_id)
        # A live process running the run holds its jobs' slots and hands each one on to its
        # next shard when it sees the job end: freed from here as well, that lease was gone
        # from the server while a new job ran on it, and the gate let more jobs in than it
        # allows (4 in flight under a cap of 2).
        owner = live_holder_elsewhere(run_dir)
    stopped = []
    asked: list[tuple[str, JobAttempt]] = []
    refused: list[tuple[str, Exception]] = []
    # Every job is asked to stop before any slot is given back: a slow Prefect server (the
    # CLI's temporary one starting) held the next job's stop for half a minute a job, long
    # enough for it to bill on to its end.
    for shard in list(store.state.shards.values()):
        for attempt in shard.attempts:
            if attempt.served_by != C.SERVED_BATCH or attempt.is_final:
                continue
            if attempt.job_arn is None and attempt.lease_id is None:
                continue  # never reached the gate: nothing was created
            try:
                done = _stop_attempt(attempt, reason)
            except ClientError as exc:
                # One job AWS will not stop (another region or account?) left the rest running.
                refused.append((attempt.job_name, exc))
                continue
            asked.append((shard.name, attempt))
            if done:
                log.warning("Stopped job %s of run %s (%s)", attempt.job_name, run_name, reason)
                stopped.append(attempt.job_name)
    for shard_name, attempt in asked:
        if owner is None:
            _free_slot(store, shard_name, attempt)
        else:
            store.save(shard_name)
    if owner is not None and asked:
        log.info(
            "Run %s is live in %s: it frees the stopped jobs' gate slots as it sees them end",
            run_name,
            owner_text(owner),
        )
    if stopped:
        store.save()  # and the whole picture compacted in state.json, for people and tools
    if refused:
        first_name, first = refused[0]
        msg = (
            f"{len(refused)} job(s) of run {run_name} could not be stopped (first: {first_name}: "
            f"{error_code(first)}: {first}); {len(stopped)} stopped. Check the region and "
            "account the credentials point at: they must be the run's."
        )
        raise StopJobsError(msg) from first
    return stopped
