"""`python -m emulator`: run the local stack and print the shell lines that point AWS at it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import signal
import sys
import threading

from .config import EmulatorConfig, _coerce
from .faults import Faults
from .stack import LocalStack

DESCRIPTION = (
    "Local Amazon Bedrock batch inference beside moto's S3 and CloudWatch. Prints "
    "`export ...` lines on stdout: eval them in a shell to point boto3, the AWS CLI and "
    "the flows at the stack. Every setting also reads BEDROCK_EMULATOR_<NAME> and each "
    "fault BEDROCK_EMULATOR_FAULT_<NAME>."
)


def parse_args(
    argv: list[str] | None = None, prog: str = "python -m emulator"
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser.parse_args(argv)


def _fault(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    known = [f.name for f in dataclasses.fields(Faults)]
    if not sep or name.replace("-", "_") not in known:
        msg = f"--fault takes NAME=VALUE with NAME one of {', '.join(known)}; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return name.replace("-", "_"), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stack's options: ports, pace, quotas and faults (shared with `bedrock-batch local`)."""
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
    parser.add_argument(
        "--fault",
        action="append",
        type=_fault,
        default=[],
        metavar="NAME=VALUE",
        help="any fault of emulator/faults.py, e.g. fail_jobs=0.2 or throttle_get_rate=0.5 "
        "(repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")


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
    for name, raw in getattr(args, "fault", None) or []:
        faults[name] = _coerce(Faults, name, raw)
    if faults:
        config = dataclasses.replace(config, faults=config.faults.updated(**faults))
    return config


def main(argv: list[str] | None = None, prog: str = "python -m emulator") -> int:
    return serve(parse_args(argv, prog))


def serve(args: argparse.Namespace) -> int:
    """Run the stack the options describe until SIGINT / SIGTERM."""
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
