"""The main flow: a dataset in, Bedrock batch jobs through the gate, Parquet with results out."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from tasks.aws import storage
from tasks.monitoring import events
from tasks.run.layout import expand_run_name
from tasks.run.lifecycle import default_run_name, finish_run, open_gate, prepare_run, resolve_run
from tasks.run.params import BatchParams
from tasks.run.progress import RunProgress
from tasks.run.shard import RunContext, run_shard
from tasks.run.stop import stop_run_jobs

# A shard's thread mostly sleeps between polls; shards past this many wait their turn.
MAX_SHARDS_IN_FLIGHT = 64


def _emit_failed(flow, flow_run, state) -> None:
    """Flow failure hook: a `bedrock.batch.run.failed` event automations can act on."""
    raw = flow_run.parameters.get("params") or {}
    try:
        params = BatchParams.model_validate(raw)
        run_name = expand_run_name(params.run_name or default_run_name(params))
    except ValueError:  # the parameters themselves were the failure
        run_name = flow_run.name
    events.emit_run_failed(run_name, raw.get("model_id", ""), str(state.message))


def _stop_jobs(flow, flow_run, state) -> None:
    """Cancel / crash hook: stop the run's jobs still in flight, so nothing keeps billing."""
    raw = flow_run.parameters.get("params") or {}
    try:
        params = BatchParams.model_validate(raw)
        run_name = expand_run_name(params.run_name or default_run_name(params))
    except ValueError:  # the parameters themselves were the failure: nothing was created
        return
    reason = "crashed" if state.is_crashed() else "cancelled"
    run_dir = storage.join(params.output_uri, run_name)
    stop_run_jobs(run_dir, run_name, reason, params.kms_key_id)


@flow(
    name="batch-inference",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS_IN_FLIGHT),
    on_failure=[_emit_failed],
    on_crashed=[_emit_failed, _stop_jobs],
    on_cancellation=[_stop_jobs],
)
def batch_inference(params: BatchParams) -> dict[str, Any]:
    """Run Bedrock batch inference over a dataset and write Parquet with every row's result.

    Re-running with the same ``run_name`` resumes a crashed run and never creates a second
    job for a shard; re-running a finished run reports its output.
    """
    logger = get_run_logger()
    run_name = params.run_name or default_run_name(params)

    # 1. Check where everything goes, before anything is spent.
    run = resolve_run(params, run_name)
    run_name = run.layout.run_name  # with {date} filled in
    if run.finished_summary is not None:
        logger.info("Run %s already finished; its output is in %s", run_name, run.layout.run_dir)
        return run.finished_summary

    # 2. Render, validate and shard the rows (or pick up the plan of an earlier attempt).
    plan = prepare_run(params, run.layout)

    # 3. The model's gate (the account's quota) and this run's own, of max_concurrent_jobs.
    gate_name = open_gate(params.model_id, params.max_concurrent_jobs, run_name)

    # 4. Each shard: slot → job → poll → merge its Parquet part as soon as it finishes.
    ctx = RunContext(
        run_name=run_name,
        run_dir=run.layout.run_dir,
        job_prefix=run.layout.job_prefix,
        model_id=params.model_id,
        invocation_type=params.invocation_type,
        role_arn=run.role_arn,
        gate_name=gate_name,
        store=run.store,
        progress=RunProgress(plan.total_records),
        timeout_hours=params.timeout_hours,
        kms_key_id=params.kms_key_id,
        tags=params.tags,
        flow_run_id=runtime.flow_run.id,
        max_attempts=params.max_attempts,
        retry_stopped=params.retry_stopped,
        on_demand=params.on_demand,
        on_demand_rps=params.on_demand_rps,
    )
    results = run_shard.map(unmapped(ctx), plan.shards).result()

    # 5. Check every row came back once, report, and tell automations.
    return finish_run(ctx, plan, results)
