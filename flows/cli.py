"""The `bedrock-batch` command: run the flow, dry-run preprocess, merge offline, local stack."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from flows.monitor_cli import add_subcommands
from tasks.allocator import tune_jemalloc

DEFAULT_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="hf://id?split=..., s3:// URI, path, glob")
    parser.add_argument("--prompt-id", help="template from prompt_templates.py (none: embeddings)")
    parser.add_argument("--model-id", default=DEFAULT_MODEL, help="Bedrock model id")
    parser.add_argument("--text-column", help="column to embed when there is no prompt")
    parser.add_argument("--id-column", help="your own unique id column")
    parser.add_argument("--invocation-type", choices=["InvokeModel", "Converse"])
    parser.add_argument(
        "--max-concurrent-jobs", type=int, help="jobs of this run in flight (its gate)"
    )
    parser.add_argument("--max-records-per-job", type=int)
    parser.add_argument("--on-missing", choices=["fail", "skip"])
    parser.add_argument(
        "--csv-types", choices=["text", "infer"], help="CSV values as text (default) or guessed"
    )
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--dimensions", type=int, help="embedding size (Titan v2, Cohere Embed v4)")
    parser.add_argument(
        "--stop-sequence", action="append", help="text that ends generation, repeatable"
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        help="unit-norm embeddings (Titan v2)",
    )
    parser.add_argument("--input-type", help="Cohere Embed input_type (e.g. search_document)")
    parser.add_argument(
        "--embedding-type",
        action="append",
        help="embedding type to return, repeatable: float, int8, uint8, binary, ubinary (Cohere "
        "Embed), float, binary (Titan v2); each lands in its own column",
    )


def _params(args: argparse.Namespace):
    from tasks.run.params import BatchParams, InferenceOverrides

    inference = InferenceOverrides(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        dimensions=args.dimensions,
        stop_sequences=args.stop_sequence,
        normalize=args.normalize,
        input_type=args.input_type,
        embedding_types=args.embedding_type,
    )
    fields = {
        "source": args.source,
        "prompt_id": args.prompt_id,
        "model_id": args.model_id,
        "output_uri": getattr(args, "output_uri", None) or "out",
        "text_column": args.text_column,
        "id_column": args.id_column,
        "invocation_type": args.invocation_type,
        "max_concurrent_jobs": args.max_concurrent_jobs,
        "max_records_per_job": args.max_records_per_job,
        "on_missing": args.on_missing,
        "csv_types": args.csv_types,
        "run_name": getattr(args, "run_name", None),
        "role_arn": getattr(args, "role_arn", None),
        "timeout_hours": getattr(args, "timeout_hours", None),
        "kms_key_id": getattr(args, "kms_key_id", None),
        "aws_credentials_block": getattr(args, "aws_credentials_block", None),
        "restart": getattr(args, "restart", None) or None,
        "on_demand_rps": getattr(args, "on_demand_rps", None),
        "on_demand": getattr(args, "on_demand", None),
        "max_attempts": getattr(args, "max_attempts", None),
        "retry_stopped": getattr(args, "retry_stopped", None) or None,
        "resend_lost_outputs": getattr(args, "resend_lost_outputs", None) or None,
        "max_cost_usd": getattr(args, "max_cost_usd", None),
        "tags": dict(tag.split("=", 1) for tag in getattr(args, "tag", None) or []),
        "inference": inference,
    }
    return BatchParams(**{k: v for k, v in fields.items() if v is not None})


def _show_output(summary: dict) -> None:
    import polars as pl

    from tasks.run.artifacts import absolute_location

    output = absolute_location(summary["output_uri"])
    print(f"\nOutput: {output}/  ({len(summary['parts'])} Parquet files)")
    counts, tokens = summary["counts"], summary["tokens"]
    from tasks.pipeline.tokens import fmt_tokens

    print(
        f"Records: {counts['records']:,}  ok: {counts['succeeded']:,}  failed: "
        f"{counts['failed']:,}  tokens in/out: "
        f"{fmt_tokens(tokens['input'])}/{fmt_tokens(tokens['output'])}"
    )
    if summary.get("cost"):
        from tasks.run.cost import cost_markdown

        print(cost_markdown(summary["cost"]).removeprefix("- "))
    if summary["parts"] and not summary["parts"][0].startswith("s3://"):
        from tasks.pipeline import columns as C

        frame = pl.read_parquet(summary["parts"][0]).head(5)
        # The columns that say what happened; the Parquet has the rest.
        hidden = {C.JOB_ID, C.STOP_REASON, C.INPUT_TOKENS, C.OUTPUT_TOKENS, C.ERROR_MESSAGE}
        frame = frame.select([c for c in frame.columns if c not in hidden])
        with pl.Config(fmt_str_lengths=70, tbl_cols=8, tbl_width_chars=150):
            print(frame)


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields ``advance(done, total)`` for the step to call."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def cmd_run(args: argparse.Namespace) -> int:
    """Run the batch flow now, optionally on an in-process local stack."""
    params = _params(args)
    _preflight(params, needs_aws=not args.local_stack)
    with ExitStack() as stack:
        if args.local_stack:
            start_local_stack(stack, params.output_uri)
            from tasks.run.layout import layout_for
            from tasks.run.lifecycle import name_for_events

            args.output_uri = params.output_uri
            # The default name follows the inputs (a local source is hashed for it): named
            # here only when an earlier stack left a run to refuse, not on every start.
            if params.run_name or runs_of_an_ended_stack(params.output_uri, "*"):
                args.run_name = name_for_events(params)
                run_dir = layout_for(params.output_uri, args.run_name).run_dir
                refuse_runs_of_an_ended_stack(run_dir)
        from flows.batch_inference import batch_inference

        if not args.debug:
            quiet_tracebacks()
        interruptible()
        summary = batch_inference(params)
        stop_temporary_server()
        _show_output(summary)
    return 0


def start_local_stack(stack: ExitStack, output_uri: str | None = None) -> None:
    """The local stack for this command, its variables in the environment the run reads.

    The stack's S3 is new and empty but for its demo bucket, and lives only as long as the
    command: nobody could create the bucket of an ``s3://`` output_uri in it beforehand, so
    the stack creates it (`--output-uri s3://my-bucket/runs --local-stack` as the README
    shows it was refused: the bucket 'my-bucket' does not exist).
    """
    from emulator import EmulatorConfig, LocalStack

    # Demo pace, tunable through BEDROCK_EMULATOR_* (as for `bedrock-batch local`).
    config = EmulatorConfig.from_env(EmulatorConfig.demo())
    local = stack.enter_context(LocalStack(config))
    os.environ.update(local.env)
    from tasks.aws.clients import reset_clients
    from tasks.settings import get_settings

    get_settings.cache_clear()  # the settings must see the stack's variables
    reset_clients()
    print(f"Local stack: Bedrock emulator {local.bedrock_url}, S3 {local.moto_url}")
    from tasks.aws import storage

    if output_uri and storage.is_s3(output_uri):
        bucket, _ = storage.split_s3(output_uri)
        if bucket and bucket != local.bucket:
            local.client("s3").create_bucket(Bucket=bucket)
            print(f"Local stack: bucket s3://{bucket} created for --output-uri")


def runs_of_an_ended_stack(folder: str, depth: str = "**") -> list[Path]:
    """The runs in ``folder`` (``depth``: its glob) left unfinished with jobs on Bedrock."""
    from tasks.aws import storage
    from tasks.run.layout import IDENTITY_FILE
    from tasks.run.state import RunStateStore

    if storage.is_s3(folder) or not Path(folder).is_dir():
        return []  # an s3:// output lived in the stack's own S3, gone with it
    left = []
    for identity in sorted(Path(folder).glob(f"{depth}/{IDENTITY_FILE}")):
        state = RunStateStore(str(identity.parent), identity.parent.name).state
        if state.jobs_created and not state.finished_at:
            left.append(identity.parent)
    return left


def refuse_runs_of_an_ended_stack(folder: str) -> None:
    """Refuse, on a new --local-stack, a run in ``folder`` an earlier one left unfinished.

    The local stack lives as long as its command, and its Bedrock jobs and S3 files (the jobs'
    input and output) end with it: the same command again failed on the run's first job with
    ResourceNotFoundException (GetModelInvocationJob; with --restart, StopModelInvocationJob).
    """
    from tasks.errors import RunSettingsError

    for run_dir in runs_of_an_ended_stack(folder)[:1]:
        msg = (
            f"run {run_dir.name} in {run_dir} was interrupted on an earlier --local-stack, "
            "whose jobs and files ended with its command: it cannot be resumed on a new "
            f"one. Remove {folder} (or pass another --run-name) and run the command again."
        )
        raise RunSettingsError(msg)


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    """Run a pipeline (one batch run per stage), optionally on an in-process local stack."""
    from flows.pipeline_cli import run_pipeline

    return run_pipeline(args)


def _preflight(params, needs_aws: bool) -> None:
    """The user mistakes a run can show before Prefect starts: one line each, no traceback.

    Everything that needs no AWS call comes first, so a user with no credentials yet hears of
    a bad model id or output_uri at once, not after setting credentials up.
    """
    from prompt_templates import get_template
    from tasks.bedrock.families import family_for
    from tasks.run.layout import (
        ANY_RUN,
        check_output_uri_form,
        expand_run_name,
        layout_for,
        resolve_role_arn,
    )

    template = get_template(params.prompt_id) if params.prompt_id else None  # lists known ids
    family = family_for(params.model_id, params.invocation_type)  # lists the families
    # The model's limits and rules (max_tokens over its output cap, temperature with top_p).
    family.options(template.inference_params() if template else {}, params.inference.as_dict())
    if params.run_name:
        expand_run_name(params.run_name)
    source = params.source
    if "://" not in source and not any(c in source for c in "*?[") and not Path(source).exists():
        raise FileNotFoundError(errno.ENOENT, "no such file or folder", source)
    check_output_uri_form(params.output_uri)
    if "://" not in params.output_uri:
        _check_writable(Path(params.output_uri))
    if needs_aws:  # the local stack sets the staging prefix and role when it starts
        layout_for(params.output_uri, ANY_RUN, params.kms_key_id)
        resolve_role_arn(params.role_arn)
    if needs_aws and not os.environ.get("AWS_ENDPOINT_URL_BEDROCK"):
        import boto3
        from botocore.exceptions import NoCredentialsError

        if boto3.Session().get_credentials() is None:
            raise NoCredentialsError


def _check_writable(folder: Path) -> None:
    """The nearest existing folder of ``folder`` must be writable (the run creates the rest)."""
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not a writable folder", str(existing))


def interruptible() -> None:
    """Ctrl-C reaches the run again while it waits: Python's own SIGINT handler back in place.

    Importing Polars installs a SIGINT handler of its own with SA_RESTART (pola-rs/polars
    #21739), so a wait on a lock or event is not interrupted: Ctrl-C during a run did nothing
    until every job had ended (a run of two 2-minute jobs went on for minutes after it, then
    hung on its dead temporary Prefect server). Python's handler raises KeyboardInterrupt
    where the main thread waits; a Polars call in progress finishes first.
    """
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _temporary_server_apart()


# The temporary Prefect server this process started, if any (`stop_temporary_server`).
_STARTED: list = []


def _temporary_server_apart() -> None:
    """Without PREFECT_API_URL, start Prefect's temporary server out of Ctrl-C's reach.

    Prefect starts it as a child in the terminal's process group, so Ctrl-C killed it with
    the run: the interrupted run then failed to record its state, retried the dead server for
    minutes and never exited. In a session of its own the server outlives the interrupt; the
    run ends in seconds and stops it on exit, as Prefect does (atexit). A run that cannot
    stop it (SIGKILL, the OOM killer) left it running for good, 220 MB and a port each: on
    Linux the kernel sends it SIGTERM when the run's process dies (`PR_SET_PDEATHSIG`).
    """
    import subprocess
    import threading
    from types import SimpleNamespace

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # before the server's import: ~2 s of CPU a run that never starts one
    from prefect.server.api import server

    temporary = server.SubprocessASGIServer()  # the one Prefect's client takes (a singleton)
    if temporary.running:
        return

    # From the main thread only: the signal comes when the forking thread ends.
    main = threading.current_thread() is threading.main_thread()
    ends_with_us = _parent_death_signal() if main else None

    def apart(*args, **kwargs):
        return subprocess.Popen(*args, **kwargs, start_new_session=True, preexec_fn=ends_with_us)

    # Only the server module's view of subprocess changes, and only for this start.
    server.subprocess = SimpleNamespace(Popen=apart)
    try:
        temporary.start()
    finally:
        server.subprocess = subprocess
    _STARTED.append(temporary)


def stop_temporary_server() -> None:
    """Stop the temporary Prefect server this process started, once its run has ended.

    Prefect stops it on exit, and its "Stopping temporary server" line then came after the
    run's report or its `error:` line, which must be the last thing a user reads. Logs and
    events still queued are sent first, so the early stop loses none; Prefect's own stop on
    exit then does nothing more.
    """
    if not _STARTED:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)
    while _STARTED:
        _STARTED.pop().stop()


def _parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGTERM the child when this process dies (Linux).

    prctl(2) PR_SET_PDEATHSIG: the signal comes when the thread that forked the child ends,
    which for the CLI's main thread is the process. None elsewhere: the child is then stopped
    only by the run's own exit, as Prefect does.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util
    import signal

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1  # <linux/prctl.h>

    def ends_with_parent() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return ends_with_parent


def quiet_tracebacks() -> None:
    """Prefect's console logs keep their lines but not the traceback (``--debug`` shows it)."""
    import logging

    class NoTraceback(logging.Formatter):
        def __init__(self, inner: logging.Formatter | None) -> None:
            super().__init__()
            self.inner = inner or logging.Formatter()

        def format(self, record: logging.LogRecord) -> str:
            saved = record.exc_info, record.exc_text
            record.exc_info, record.exc_text = None, None
            try:
                return self.inner.format(record)
            finally:
                record.exc_info, record.exc_text = saved

    # Prefect 3.8 puts its console handler on the root logger; older layouts on its own.
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler.formatter, NoTraceback
            ):
                handler.setFormatter(NoTraceback(handler.formatter))


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Dry run: write the shards under --out and print the plan; no AWS call."""
    # From the pipeline, not tasks.run.lifecycle: the dry run needs no Prefect and no boto3.
    from tasks.pipeline.plan import format_plan
    from tasks.pipeline.preprocess import preprocess_params

    params = _params(args)
    with _progress("Validating, rendering and sharding") as advance:
        plan = preprocess_params(params, Path(args.out), on_shard=advance)
    print(format_plan(plan))
    print()
    print(_estimate(plan, args))
    print(f"Shards written under {Path(args.out) / 'input'}/")
    return 0


def _estimate(plan, args: argparse.Namespace) -> str:
    """The cost estimate: offline, or with CountTokens when --count-tokens asks for it."""
    from tasks.pipeline.estimate import estimate_from_dir, format_estimate

    client = None
    if args.count_tokens:
        from tasks.aws.clients import client as aws_client

        client = aws_client("bedrock-runtime")
    estimate = estimate_from_dir(
        plan, Path(args.out), client, offline_reason="dry run without --count-tokens"
    )
    return format_estimate(estimate)


def cmd_merge(args: argparse.Namespace) -> int:
    """Offline merge of Bedrock outputs downloaded under --outputs into the run folder."""
    import polars as pl

    from tasks.errors import RunOwnedError
    from tasks.pipeline import columns as C
    from tasks.pipeline.merge import merge_offline_run
    from tasks.pipeline.tokens import fmt_tokens
    from tasks.run.owner import live_holder_elsewhere, owner_text

    # A live run's parts are its merged answers; written over from outputs downloaded so far,
    # one became MissingOutput rows and the run finished with them.
    owner = live_holder_elsewhere(str(args.run_dir))
    if owner is not None:
        msg = (
            f"{args.run_dir} is a live run's folder: {owner_text(owner)} runs it and merges its "
            "jobs' outputs itself; merge once it has finished, or into a copy of the folder."
        )
        raise RunOwnedError(msg)
    with _progress("Merging outputs into Parquet") as advance:
        merged = merge_offline_run(Path(args.run_dir), Path(args.outputs), on_part=advance)
    parts = merged.parts
    print(f"Wrote {len(parts)} Parquet parts under {(Path(args.run_dir) / 'output').resolve()}")
    tokens_in, tokens_out = merged.tokens
    print(f"tokens in/out: {fmt_tokens(tokens_in)}/{fmt_tokens(tokens_out)}")
    counts = (
        pl.scan_parquet(parts, missing_columns="insert")
        .select(
            pl.len().alias("rows"),
            (pl.col(C.ERROR_CODE) == C.MISSING_OUTPUT).sum().alias("missing"),
        )
        .collect()
        .row(0, named=True)
    )
    missing, rows = counts["missing"] or 0, counts["rows"]
    if not missing:
        print(f"Every one of the {rows:,} rows has an output.")
        return 0
    note = (
        f"{missing:,} of {rows:,} rows have no output (error_code {C.MISSING_OUTPUT}): "
        "their job's outputs are not under --outputs"
    )
    if args.allow_missing:
        print(f"{note}; kept as errors (--allow-missing).")
        return 0
    print(f"error: {note}; download them, or pass --allow-missing to accept.", file=sys.stderr)
    return 1


def cmd_iam_policy(args: argparse.Namespace) -> int:
    """Print the service role's trust and permission policies and the runner's policy."""
    from tasks.aws import iam
    from tasks.errors import RunSettingsError
    from tasks.run.layout import ANY_RUN, expand_run_name, layout_for, resolve_role_arn

    role = resolve_role_arn(args.role_arn)
    account = role.split(":")[4]
    if not account:
        msg = f"--role-arn {role!r} has no account id; the policies' ARNs need it."
        raise RunSettingsError(msg)
    from tasks.bedrock.families import family_for

    for model_id in args.model_id:
        family_for(model_id)  # an id a run refuses: UnknownModelError lists the known ones
    # IAM names a KMS key by its ARN (botocore KmsKeyId: arn:aws(-*)?:kms:<region>:<account>:
    # key/<id>); a bare id or an alias granted nothing.
    if args.kms_key_id and not re.fullmatch(
        r"arn:aws(-[^:]+)?:kms:[a-zA-Z0-9-]*:[0-9]{12}:key/[a-zA-Z0-9-]{36}", args.kms_key_id
    ):
        msg = (
            f"--kms-key-id {args.kms_key_id!r} is not a KMS key ARN "
            "(arn:aws:kms:<region>:<account>:key/<key id>): IAM policies name keys by ARN."
        )
        raise RunSettingsError(msg)
    region = iam.resolve_region(args.region)
    partition = iam.partition_of(role)
    region_partition = iam.region_partition(region)
    if region_partition != partition:
        msg = (
            f"--region {region!r} is in the {region_partition} partition, but --role-arn "
            f"{role!r} is in {partition}: give a region of the role's partition."
        )
        raise RunSettingsError(msg)
    run_name = expand_run_name(args.run_name) if args.run_name else ANY_RUN
    # The same layout a run uses: local output folders put their job files under staging.
    layout = layout_for(args.output_uri, run_name, args.kms_key_id)
    policies = {
        "service_role_trust_policy": iam.service_role_trust_policy(account),
        "service_role_policy": iam.service_role_policy(
            layout, args.model_id, region, account, args.kms_key_id
        ),
        "runner_policy": iam.runner_policy(
            layout, role, args.model_id, region, account, args.source or ()
        ),
    }
    print(json.dumps(iam.in_partition(policies, partition), indent=2))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a run's in-flight Bedrock jobs, free their gate slots and record it in state.json."""
    from tasks.aws import storage
    from tasks.errors import PlanError
    from tasks.run.layout import STATE_FILE
    from tasks.run.state import has_state
    from tasks.run.stop import stop_run_jobs

    run_dir = storage.join(args.output_uri, args.run_name)
    if not has_state(run_dir):
        msg = (
            f"No run state in {run_dir}: check --run-name and "
            "--output-uri (the run folder is <output_uri>/<run_name>/)."
        )
        raise PlanError(msg)
    stopped = stop_run_jobs(run_dir, args.run_name, "stop", args.kms_key_id)
    for name in stopped:
        print(f"Stopped {name}")
    print(f"{len(stopped)} jobs of {args.run_name} stopped; state in {run_dir}/{STATE_FILE}")
    return 0


def cmd_events_setup(args: argparse.Namespace) -> int:
    """Route Bedrock's job state change events to an SQS queue the runs relay from."""
    from tasks.aws.job_events import QUEUE_URL_VARIABLE, setup_job_events

    names = {"queue_name": args.queue_name, "rule_name": args.rule_name}
    queue_url = setup_job_events(**{k: v for k, v in names.items() if v})
    print(
        f"Job events queue: {queue_url} (runs find it in the Prefect Variable "
        f"{QUEUE_URL_VARIABLE}, or set BEDROCK_BATCH_EVENTS_QUEUE_URL={queue_url})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bedrock-batch",
        description="Amazon Bedrock batch inference with Prefect.",
        epilog="--debug (anywhere on the line) shows the traceback of an error.",
    )
    parser.add_argument(
        "--aws-credentials-block",
        help="Prefect AwsCredentials block to build every AWS client from (before the command)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the batch flow now")
    _add_data_args(run)
    run.add_argument("--output-uri", required=True, help="s3://bucket/prefix or a local folder")
    run.add_argument("--run-name", help="stable name; re-running it resumes")
    run.add_argument("--role-arn")
    run.add_argument("--timeout-hours", type=int)
    run.add_argument("--kms-key-id")
    run.add_argument("--tag", action="append", help="key=value, repeatable")
    run.add_argument("--on-demand-rps", type=float, help="on-demand calls per second")
    run.add_argument(
        "--on-demand",
        action=argparse.BooleanOptionalAction,
        help=(
            "serve records too few for a batch job (a small run, a retry remainder) on demand "
            "at the full price (default: on)"
        ),
    )
    run.add_argument("--max-attempts", type=int, help="tries per record (default 3)")
    run.add_argument(
        "--retry-stopped", action="store_true", help="also resubmit the records of stopped jobs"
    )
    run.add_argument(
        "--resend-lost-outputs",
        action="store_true",
        help="pay again for records whose job outputs were deleted or cut on S3",
    )
    run.add_argument(
        "--max-cost-usd",
        type=float,
        help="cost ceiling: refused before any job if the estimate may pass it, and stops "
        "submitting once actual plus in-flight cost would",
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="move the run's old folder aside and start it again (inputs changed)",
    )
    run.add_argument(
        "--local-stack", action="store_true", help="start the local stack for this run"
    )
    run.set_defaults(func=cmd_run)

    pre = sub.add_parser("preprocess", help="dry run: write shards and print the plan")
    _add_data_args(pre)
    pre.add_argument("--out", required=True, help="local folder for the shards")
    pre.add_argument(
        "--count-tokens",
        action="store_true",
        help="count a sample's input tokens with bedrock-runtime CountTokens (an AWS call)",
    )
    pre.set_defaults(func=cmd_preprocess)

    merge = sub.add_parser("merge", help="merge downloaded Bedrock outputs offline")
    merge.add_argument("--run-dir", required=True, help="folder `preprocess` wrote")
    merge.add_argument("--outputs", required=True, help="folder with <jobId>/<file>.out files")
    merge.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even when some rows have no output (they keep a MissingOutput error)",
    )
    merge.set_defaults(func=cmd_merge)

    stop = sub.add_parser("stop", help="stop a run's in-flight Bedrock jobs")
    stop.add_argument("--run-name", required=True)
    stop.add_argument("--output-uri", required=True, help="the run's output_uri")
    stop.add_argument("--kms-key-id", help="the run's key, to write its state encrypted")
    stop.set_defaults(func=cmd_stop)

    # Listed for --help only: main() hands `local ...` to the emulator's own parser, so every
    # option of `python -m emulator` (ports, pace, faults) works here without importing the
    # emulator (a second of start-up) for the other commands.
    sub.add_parser(
        "local",
        help="start the local stack (moto + Bedrock emulator); "
        "`bedrock-batch local --help` lists its options",
    )

    iam = sub.add_parser("iam-policy", help="print least-privilege IAM policies")
    iam.add_argument("--role-arn", required=True, help="the Bedrock service role")
    iam.add_argument("--model-id", action="append", required=True, help="repeatable")
    iam.add_argument(
        "--output-uri",
        required=True,
        help="the runs' output_uri (s3:// or a local folder; then BEDROCK_BATCH_STAGING_URI)",
    )
    iam.add_argument("--run-name", help="one run only (default: every run under --output-uri)")
    iam.add_argument("--region", default=None)
    iam.add_argument("--kms-key-id")
    iam.add_argument(
        "--source", action="append", help="s3:// dataset the runs read (file, folder or glob)"
    )
    iam.set_defaults(func=cmd_iam_policy)

    events = sub.add_parser("events", help="Bedrock job state change events (EventBridge)")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    events_setup = events_sub.add_parser(
        "setup", help="route job state changes to an SQS queue the runs relay (idempotent)"
    )
    events_setup.add_argument("--queue-name", help="SQS queue (default: the project's)")
    events_setup.add_argument("--rule-name", help="EventBridge rule (default: the project's)")
    events_setup.set_defaults(func=cmd_events_setup)

    pipeline = sub.add_parser("pipeline", help="multi-stage pipelines (see pipelines.py)")
    pipeline_sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    prun = pipeline_sub.add_parser("run", help="run a pipeline now; re-running it resumes")
    prun.add_argument("--pipeline-id", required=True, help="a key of pipelines.py")
    prun.add_argument("--source", required=True, help="the first stage's source")
    prun.add_argument("--output-uri", required=True, help="s3://bucket/prefix or a local folder")
    prun.add_argument("--run-name", required=True, help="stable name; re-running it resumes")
    prun.add_argument("--max-concurrent-jobs", type=int)
    prun.add_argument("--max-records-per-job", type=int)
    prun.add_argument("--max-attempts", type=int)
    prun.add_argument("--role-arn")
    prun.add_argument(
        "--max-cost-usd",
        type=float,
        help="cost ceiling for all stages together: each stage runs under what the ones "
        "before it left; a re-run with a higher one goes on where it stopped",
    )
    prun.add_argument("--restart", action="store_true", help="start the pipeline again")
    prun.add_argument(
        "--restart-from",
        metavar="STAGE",
        help="run this stage and the ones after it again; the stages before it are kept",
    )
    prun.add_argument("--local-stack", action="store_true", help="start the local stack")
    prun.set_defaults(func=cmd_pipeline_run)

    add_subcommands(sub)
    return parser


NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_PROFILE (after `aws configure` or `aws sso login`) or "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; or run without AWS on the local stack: "
    '`bedrock-batch run --local-stack ...`, or `eval "$(bedrock-batch local)"` first.'
)


def user_error(exc: BaseException) -> str | None:
    """The one line that tells a person what went wrong and what to do, or None for a bug."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError
    from pydantic import ValidationError

    from tasks.errors import BedrockBatchError

    if isinstance(exc, BedrockBatchError):
        message = str(exc)
    elif isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        message = NO_CREDENTIALS
    elif isinstance(exc, FileNotFoundError):
        message = f"{exc.filename or exc}: no such file or folder"
    elif isinstance(exc, PermissionError):
        message = f"{exc.filename or exc}: permission denied; choose a folder you can write to"
    elif isinstance(exc, OSError) and exc.filename:
        message = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, ValidationError):
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}"
            for e in exc.errors()
        )
    elif isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        message = f"AWS refused {exc.operation_name}: {error.get('Code')}: {error.get('Message')}"
    else:
        return None
    return " ".join(message.split())  # one line, whatever the message's layout


_RESUME_DEFAULT = "run the same command again."
_RESUME_HINT = {
    "merge": "the parts written are whole; run the same command again to merge the rest.",
}


def _local_stack_folder(args: argparse.Namespace) -> str:
    """The folder a --local-stack run or pipeline wrote, to remove before running it again."""
    from tasks.aws import storage
    from tasks.run.layout import expand_run_name

    if not args.run_name:
        return f"its folder in {args.output_uri}, named as the flow run is,"
    return storage.join(args.output_uri, expand_run_name(args.run_name))


def _resume_hint(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C; for a run, the whole `stop` command (it needs --output-uri)."""
    if getattr(args, "local_stack", False):
        ended = "the local stack ended with this command, and the run's jobs with it"
        if "://" in (args.output_uri or ""):  # its files too: the same command starts over
            return f"{ended}; the same command starts it over."
        return (
            f"{ended}: it cannot be resumed. Remove {_local_stack_folder(args)} (or pass "
            "another --run-name) and run the command again."
        )
    if args.command != "run":
        return _RESUME_HINT.get(args.command, _RESUME_DEFAULT)
    run_name = args.run_name or "<the run name the flow run is named after>"
    return (
        "jobs already submitted keep running on Bedrock. Run the same command again to resume "
        "(nothing answered is paid again), or `bedrock-batch stop --run-name "
        f"{run_name} --output-uri {args.output_uri}` to stop them."
    )


def main(argv: list[str] | None = None) -> int:
    tune_jemalloc()  # read when Polars loads, which no import above does
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: the traceback of any error
    if argv[:1] == ["local"]:
        from emulator.__main__ import main as local_stack

        return local_stack(argv[1:], prog="bedrock-batch local")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if args.aws_credentials_block:
        from tasks.aws.clients import use_credentials_block

        use_credentials_block(args.aws_credentials_block)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        stop_temporary_server()
        # Whatever was written is whole (parts and state are written atomically).
        print(
            f"error: interrupted; {_resume_hint(args)}",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        stop_temporary_server()
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
