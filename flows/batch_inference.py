"""The main flow: a dataset in, Bedrock batch jobs through the gate, Parquet with results out."""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFutureList
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from prompt_templates import output_schema_for
from tasks.allocator import cap_malloc_arenas
from tasks.aws import storage
from tasks.aws.job_events import job_events
from tasks.aws.submit import run_key
from tasks.aws.watcher import JobWatcher
from tasks.errors import RunOwnedError
from tasks.monitoring import events
from tasks.run import gate
from tasks.run.artifacts import JobBoard, flow_run_name, rename_flow_run
from tasks.run.cost import batch_cost_of, cost_guard, preflight_cost, run_price
from tasks.run.lifecycle import (
    finish_run,
    name_for_events,
    open_gate,
    prepare_run,
    release_run,
    resolve_run,
)
from tasks.run.owner import holder_of, owner_text
from tasks.run.params import MAX_CONCURRENT_JOBS, BatchParams, warn_if_unknown_model
from tasks.run.progress import RunProgress, merged_records
from tasks.run.shard import RunContext, run_shard
from tasks.run.stop import stop_run_jobs

# A shard holds a thread while it waits for a slot, its job and its merge; the threads mostly
# wait on the run's one watcher. More threads than the largest gate (plus merges of shards that
# just gave their slot back), so the gate is the only cap on jobs in flight.
MAX_SHARDS_IN_FLIGHT = MAX_CONCURRENT_JOBS + 28


# Flow runs of this process that a Ctrl-C interrupted: their jobs keep running (a re-run
# resumes them, as the CLI says) and no failure is announced for them.
_INTERRUPTED: set[str] = set()


def _interrupted(flow_run_id: UUID | str, exc: BaseException) -> None:
    if isinstance(exc, KeyboardInterrupt):
        _INTERRUPTED.add(str(flow_run_id))


# Flow runs of this process refused because another live process owns their run ("Run"
# clicked twice): the run itself is alive, so no `bedrock.batch.run.failed` names it.
_REFUSED: set[str] = set()


def _batch_run_name(flow_run, params: BatchParams) -> str | None:
    """The batch run this flow run named when it resolved it: the flow run's name since then.

    Computed again from the parameters, ``{date}`` became the hook's day (a nightly run
    cancelled after midnight UTC stopped nothing of its own) and a default name followed a
    source changed meanwhile. None while the server's name is still the provisional one: the
    run was never resolved, so it has no job.
    """
    try:  # the hook's copy of a flow run in its own process predates the rename
        with get_client(sync_client=True) as client:
            name, read = client.read_flow_run(flow_run.id).name, True
    except Exception:  # an unknown flow run or an unreachable server: the name it was given
        name, read = flow_run.name, False
    if params.run_name is None and name == flow_run_name(params):
        return None if read else name_for_events(params)  # not knowing, the best guess
    return name


def _wait_interruptibly(shards: PrefectFutureList) -> None:
    """Wait until every shard has ended, waking each second so Ctrl-C reaches this thread.

    A wait without a timeout is a lock acquire that only a signal landing on this very thread
    breaks: the kernel may hand SIGINT to any of the run's threads, and the interrupted run
    then waited on until a shard ended (a test SIGABRTed it after its 60 s).
    """
    pending = {future.wrapped_future for future in shards}
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=1.0)


def _emit_failed(flow, flow_run, state) -> None:
    """Flow failure hook: a `bedrock.batch.run.failed` event automations can act on."""
    if str(flow_run.id) in _INTERRUPTED | _REFUSED:
        return
    raw = flow_run.parameters.get("params") or {}
    try:
        params = BatchParams.model_validate(raw)
        run_name = _batch_run_name(flow_run, params) or name_for_events(params)
    except Exception:  # the parameters or the source themselves were the failure
        run_name = flow_run.name
    events.emit_run_failed(run_name, raw.get("model_id", ""), str(state.message))


def _stop_jobs(flow, flow_run, state) -> None:
    """Cancel / crash hook: stop the run's jobs still in flight, so nothing keeps billing.

    Not after Ctrl-C: the user left the jobs running, to resume (`bedrock-batch stop` stops).
    """
    if str(flow_run.id) in _INTERRUPTED:
        return
    raw = flow_run.parameters.get("params") or {}
    try:
        params = BatchParams.model_validate(raw)
        run_name = _batch_run_name(flow_run, params)
    except Exception:  # the parameters or the source were the failure: nothing was created
        return
    if run_name is None:
        return
    reason = "crashed" if state.is_crashed() else "cancelled"
    run_dir = storage.join(params.output_uri, run_name)
    holder = holder_of(run_dir)
    if holder is not None and holder.get("flow_run_id") != str(flow_run.id):
        # "Run" clicked twice: the second flow run, refused or still waiting for the claim,
        # is cancelled; the jobs are the first one's, and stopping them cut its rows short.
        logging.getLogger("bedrock_batch.stop").warning(
            "Not stopping the jobs of run %s: %s holds it, not flow run %s",
            run_name,
            owner_text(holder),
            flow_run.id,
        )
        return
    stop_run_jobs(run_dir, run_name, reason, params.kms_key_id)


def _run_name() -> str:
    """The flow run's name: the batch run's, so the UI can be searched by run."""
    return flow_run_name(runtime.flow_run.parameters.get("params"))


@flow(
    name="batch-inference",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS_IN_FLIGHT),
    on_failure=[_emit_failed],
    on_crashed=[_emit_failed, _stop_jobs],
    on_cancellation=[_stop_jobs],
)
def batch_inference(params: BatchParams) -> dict[str, Any]:
    """Run Bedrock batch inference over a dataset and write Parquet with every row's result.

    Re-running with the same ``run_name`` resumes a crashed run and never creates a second
    job for a shard; re-running a finished run reports its output. A run whose inputs changed,
    or one another live process owns, is refused before anything is spent.
    """
    logger = get_run_logger()
    cap_malloc_arenas()  # before the shard threads start, each with a malloc arena otherwise

    # 1. Name and claim the run, check it is the run recorded before; nothing is spent yet.
    try:
        run = resolve_run(params, runtime.flow_run.id)
    except RunOwnedError:
        _REFUSED.add(str(runtime.flow_run.id))
        raise
    try:
        run_name = run.layout.run_name
        rename_flow_run(runtime.flow_run.id, runtime.flow_run.name, run_name)
        warn_if_unknown_model(params.model_id, logger)
        if run.finished_summary is not None:
            logger.info(
                "Run %s already finished; its output is in %s", run_name, run.layout.run_dir
            )
            return run.finished_summary

        # 2. Render, validate and shard the rows (or pick up the plan of an earlier attempt).
        plan = prepare_run(params, run)

        # 3. Estimate the cost; a run whose upper bound passes max_cost_usd stops here.
        estimate = preflight_cost(params, plan, run.layout, run.store.state.jobs_created)

        # 4. The model's gate (the account's quota) and this run's own, of max_concurrent_jobs;
        # a run with no job yet takes its first wave's slots now.
        started = any(shard.attempts for shard in run.store.state.shards.values())
        key = run.identity.run_key or run_key(run_name, run.layout.run_dir, run.identity.run_id)
        gate_name = open_gate(
            params.model_id,
            params.max_concurrent_jobs,
            gate.gate_run(run_name, key),
            new_shards=0 if started else sum(not s.on_demand for s in plan.shards),
            flow_run_id=runtime.flow_run.id,
        )

        # 5. Each shard: slot → job → watched → merge its Parquet part as soon as it finishes.
        ctx = RunContext(
            run_name=run_name,
            layout=run.layout,
            run_id=run.identity.run_id,
            run_key=key,
            model_id=params.model_id,
            invocation_type=params.invocation_type,
            role_arn=run.role_arn,
            gate_name=gate_name,
            store=run.store,
            # A resumed run's bar starts from the shards merged before (they are not run again).
            progress=RunProgress(plan.total_records, merged_records(plan, run.store.state)),
            watcher=JobWatcher(key),
            timeout_hours=params.timeout_hours,
            kms_key_id=params.kms_key_id,
            tags=params.tags,
            flow_run_id=runtime.flow_run.id,
            max_attempts=params.max_attempts,
            retry_stopped=params.retry_stopped,
            resend_lost_outputs=params.resend_lost_outputs,
            on_demand=params.on_demand,
            on_demand_rps=params.on_demand_rps,
            claim=run.claim,
            output_schema=output_schema_for(params.prompt_id),
            options=plan.options,
            board=JobBoard(
                run_name,
                run.store,
                plan.shards,
                params.max_attempts,
                params.max_concurrent_jobs,
                runtime.flow_run.id,
                cost_of=batch_cost_of(params.model_id),
            ),
            cost_guard=cost_guard(params, estimate, run.store.state),
            price=run_price(params.model_id),
        )
        try:
            # Job state change events (when `bedrock-batch events setup` made the queue) end a
            # shard's wait at once; the watcher's polls remain the fallback, at the poll
            # interval while the events stop reaching the run.
            with job_events(key, ctx.watcher.deliver, ctx.watcher.events_flowing) as events_active:
                ctx.watcher.events_active = events_active
                logger.info(
                    "Following the jobs of %d shards by %s",
                    len(plan.shards),
                    "job events, polling as the fallback" if events_active else "polling",
                )
                try:
                    shards = run_shard.map(unmapped(ctx), plan.shards)
                    # Every shard to its end before a failure is raised: Prefect's result()
                    # raises at the first one, and the watcher closed below left the shards
                    # still waiting on a job (hours on Bedrock) waiting for ever.
                    _wait_interruptibly(shards)
                    results = shards.result()
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: the process goes
                        _interrupted(runtime.flow_run.id, exc)
                        ctx.interrupt()
                    raise
        finally:
            ctx.watcher.close()

        # 6. Check every row came back once, report, and tell automations.
        return finish_run(ctx, plan, results)
    finally:
        release_run(run)
