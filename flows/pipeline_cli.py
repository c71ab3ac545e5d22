"""`bedrock-batch pipeline run`: parameters from the command line, and a printed summary."""

from __future__ import annotations

import argparse
from contextlib import ExitStack


def _count(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def show_summary(summary: dict) -> None:
    """Per-stage counts, the totals, the accuracy, and where the joined output is.

    Costs as the run command prints them ($0.0075, "unknown" without a price), not the raw
    float (0.007492749999999999) nor None.
    """
    from tasks.bedrock.prices import format_usd

    print(f"\nPipeline {summary['run_name']}: {summary['rows']} rows -> {summary['output_uri']}/")
    for s in summary["stages"]:
        counts, tokens = s["counts"], s["tokens"]
        if s.get("not_run"):
            from tasks.pipeline.stages import not_run_reason

            kept = f" ({not_run_reason(s['stage'], s.get('emptied_by'))})"
        elif "rows_kept" in s:
            kept = f", {s['rows_kept']}/{s['rows_in']} rows kept by filter"
        else:
            kept = ""
        repaired = f", repaired {s['schema_repaired']}" if "schema_repaired" in s else ""
        print(
            f"  stage {s['stage']:<8} {s['model_id']}: records {counts.get('records')} "
            f"ok {counts.get('succeeded')} failed {counts.get('failed')}{repaired}{kept}; "
            f"tokens {_count(tokens.get('input'))}/{_count(tokens.get('output'))}; "
            f"cost {format_usd(s.get('cost_usd'))}"
        )
    total = summary["tokens"]
    ceiling = summary.get("max_cost_usd")
    print(
        f"  total tokens in/out: {_count(total['input'])}/{_count(total['output'])}; "
        f"cost {format_usd(summary['cost_usd'])}"
        + (f" (max_cost_usd {format_usd(ceiling)})" if ceiling is not None else "")
    )
    if summary.get("accuracy"):
        a = summary["accuracy"]
        print(f"  accuracy ({a['column']}): {a['correct']}/{a['graded']} = {a['accuracy']}")


def run_pipeline(args: argparse.Namespace) -> int:
    """Build the parameters, run the pipeline flow, print its summary."""
    from flows.cli import (
        interruptible,
        quiet_tracebacks,
        refuse_runs_of_an_ended_stack,
        start_local_stack,
        stop_temporary_server,
    )
    from tasks.pipeline.stages import pipeline_dir

    if args.local_stack:
        refuse_runs_of_an_ended_stack(pipeline_dir(args.output_uri, args.run_name))
    with ExitStack() as stack:
        if args.local_stack:
            start_local_stack(stack, args.output_uri)
        from flows.pipeline import PipelineParams, batch_pipeline

        if not args.debug:
            quiet_tracebacks()  # after Prefect's import, which sets its logging up

        fields = {
            "pipeline_id": args.pipeline_id,
            "source": args.source,
            "output_uri": args.output_uri,
            "run_name": args.run_name,
            "max_concurrent_jobs": args.max_concurrent_jobs,
            "max_records_per_job": args.max_records_per_job,
            "max_attempts": args.max_attempts,
            "role_arn": args.role_arn,
            "max_cost_usd": args.max_cost_usd,
            "restart": args.restart or None,
            "restart_from": args.restart_from,
        }
        params = PipelineParams(**{k: v for k, v in fields.items() if v is not None})
        interruptible()
        summary = batch_pipeline(params)
        stop_temporary_server()
        show_summary(summary)
    return 0
