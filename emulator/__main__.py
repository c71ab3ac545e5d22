"""`python -m emulator`: run the local stack and print the shell lines that point AWS at it."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading

from .config import EmulatorConfig
from .stack import LocalStack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m emulator",
        description=(
            "Local Amazon Bedrock batch inference beside moto's S3 and CloudWatch. Prints "
            "`export ...` lines on stdout: eval them in a shell to point boto3, the AWS CLI and "
            "the flows at the stack. Every setting also reads BEDROCK_EMULATOR_<NAME> and each "
            "fault BEDROCK_EMULATOR_FAULT_<NAME>."
        ),
    )
    parser.add_argument("--port", type=int, default=0, help="emulator port (0: a free one)")
    parser.add_argument("--moto-port", type=int, default=0, help="moto port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--bucket", default="bedrock-batch-demo", help="demo bucket to create")
    parser.add_argument(
        "--fast", action="store_true", help="test pace: every status instant, no throughput cap"
    )
    parser.add_argument("--status-step-seconds", type=float, help="seconds per early status")
    parser.add_argument("--queue-delay-seconds", type=float, help="seconds spent in Scheduled")
    parser.add_argument("--records-per-second", type=float, help="per-job throughput")
    parser.add_argument("--tokens-per-minute", type=float, help="per-job token throughput")
    parser.add_argument("--metrics-interval-seconds", type=float, help="CloudWatch put period")
    parser.add_argument("--max-jobs-per-model", type=int, help="jobs submitted/in progress")
    parser.add_argument("--min-records-per-job", type=int)
    parser.add_argument("--max-records-per-job", type=int)
    parser.add_argument("--seed", type=int, help="seed of every fault draw")
    parser.add_argument("--record-error-rate", type=float, help="share of records that fail")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    """Demo pace (or --fast), then BEDROCK_EMULATOR_* env, then flags."""
    config = EmulatorConfig.from_env(EmulatorConfig() if args.fast else EmulatorConfig.demo())
    for name in (
        "status_step_seconds",
        "queue_delay_seconds",
        "records_per_second",
        "tokens_per_minute",
        "metrics_interval_seconds",
        "max_jobs_per_model",
        "min_records_per_job",
        "max_records_per_job",
    ):
        value = getattr(args, name)
        if value is not None:
            config = config.updated(**{name: value})
    faults = {}
    if args.seed is not None:
        faults["seed"] = args.seed
    if args.record_error_rate is not None:
        faults["record_error_rate"] = args.record_error_rate
    if faults:
        config = config.updated(faults=config.faults.updated(**faults))
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(
        build_config(args),
        port=args.port,
        moto_port=args.moto_port,
        region=args.region,
        bucket=args.bucket,
        host=args.host,
    )
    with stack:
        for key, value in stack.env.items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        logging.getLogger("emulator").info(
            "bedrock emulator at %s, moto at %s, bucket s3://%s; Ctrl-C to stop",
            stack.bedrock_url,
            stack.moto_url,
            stack.bucket,
        )
        stop.wait()
        logging.getLogger("emulator").info("shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
