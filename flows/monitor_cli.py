"""The monitoring subcommands of `bedrock-batch`: automations, CloudWatch alarms, serve, monitor."""

from __future__ import annotations

import argparse
import json


def cmd_automations_apply(args: argparse.Namespace) -> int:
    """Create or update the project's automations by name."""
    from tasks.monitoring.automations import apply_automations

    result = apply_automations(
        notification_block=args.block,
        webhook_url=args.webhook_url,
        summarize_deployment=args.summarize_deployment,
        heartbeat_seconds=args.heartbeat_seconds,
    )
    for name, outcome in result.items():
        print(f"{name}: {outcome}")
    return 0


def cmd_cloudwatch_setup(args: argparse.Namespace) -> int:
    """Create the CloudWatch alarms, the SNS topic and the dashboard."""
    from tasks.monitoring.alarms import setup

    print(
        json.dumps(
            setup(
                args.model_id,
                sns_email=args.email,
                threshold=args.threshold,
                allow_unknown=args.allow_unknown_model,
            ),
            indent=2,
        )
    )
    return 0


def cmd_cloudwatch_teardown(args: argparse.Namespace) -> int:
    """Delete the alarms (and the dashboard and topic once none is left)."""
    from tasks.monitoring.alarms import teardown

    print(json.dumps(teardown(args.model_id), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve batch-inference, bedrock-batch-monitor and summarize-run without a worker."""
    from flows.serve import serve_all

    serve_all(monitor_interval_minutes=args.monitor_interval_minutes)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor once and print the latest values and alert changes."""
    from tasks.monitoring.alarms import check_model_ids

    if args.model_id and not args.allow_unknown_model:
        check_model_ids(args.model_id, "monitor")  # a typo read nothing, every time
    from flows.monitor import MonitorParameters, bedrock_batch_monitor

    params = MonitorParameters(
        model_ids=args.model_id or [],
        lookback_minutes=args.lookback_minutes,
        period_seconds=args.period_seconds,
        stall_minutes=args.stall_minutes,
    )
    result = bedrock_batch_monitor(params)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _number(kind: type, minimum: float, above: bool = False):
    """An argparse type: a number at least (or above) ``minimum``, else argparse's one line
    naming the flag (a Prefect validation error or a pydantic dump came out before)."""

    def parse(text: str):
        value = kind(text)
        if value < minimum or (above and value == minimum):
            bound = "more than" if above else "at least"
            msg = f"must be {bound} {minimum:g}, got {text}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _url(text: str) -> str:
    if not text.startswith(("https://", "http://")):
        msg = f"must be an http(s):// URL, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add `automations apply`, `cloudwatch setup|teardown`, `serve` and `monitor`."""
    from tasks.monitoring.defaults import NOTIFICATION_BLOCK, SUMMARIZE_DEPLOYMENT

    automations = subparsers.add_parser("automations", help="Prefect automations in code")
    automations_sub = automations.add_subparsers(dest="automations_command", required=True)
    apply = automations_sub.add_parser("apply", help="create or update the automations by name")
    apply.add_argument(
        "--block", default=NOTIFICATION_BLOCK, help="notification block for stalled alerts"
    )
    apply.add_argument(
        "--webhook-url",
        type=_url,
        help="create the block first: a hooks.slack.com URL makes a Slack block, "
        "any other URL a custom webhook",
    )
    apply.add_argument(
        "--summarize-deployment",
        default=SUMMARIZE_DEPLOYMENT,
        help="flow/deployment run when a batch run finishes",
    )
    apply.add_argument(
        "--heartbeat-seconds",
        type=_number(int, 10),  # Prefect: a proactive trigger's `within` is at least 10 s
        default=90,
        help="crash flow runs without a heartbeat for this long",
    )
    apply.set_defaults(func=cmd_automations_apply)

    cloudwatch = subparsers.add_parser("cloudwatch", help="AWS-native alarms and dashboard")
    cloudwatch_sub = cloudwatch.add_subparsers(dest="cloudwatch_command", required=True)
    setup = cloudwatch_sub.add_parser("setup", help="create alarms, SNS topic and dashboard")
    setup.add_argument("--model-id", action="append", required=True, help="repeat per model")
    setup.add_argument("--email", help="subscribe this address to the SNS topic")
    setup.add_argument(
        "--threshold",
        type=_number(float, 0, above=True),
        default=1_000_000.0,
        help="input tokens/min (6 h average)",
    )
    setup.add_argument(
        "--allow-unknown-model",
        action="store_true",
        help="alarm on model ids the batch model catalog does not know (refused otherwise)",
    )
    setup.set_defaults(func=cmd_cloudwatch_setup)
    teardown = cloudwatch_sub.add_parser("teardown", help="delete the alarms of these models")
    teardown.add_argument("--model-id", action="append", required=True, help="repeat per model")
    teardown.set_defaults(func=cmd_cloudwatch_teardown)

    serve = subparsers.add_parser("serve", help="serve the flows without a worker")
    serve.add_argument(
        "--monitor-interval-minutes", type=_number(float, 0, above=True), default=5.0
    )
    serve.set_defaults(func=cmd_serve)

    monitor = subparsers.add_parser("monitor", help="run the CloudWatch monitor once")
    monitor.add_argument("--model-id", action="append", help="repeat per model (default: all)")
    monitor.add_argument("--lookback-minutes", type=float, default=60.0)
    monitor.add_argument("--period-seconds", type=int, default=60)
    monitor.add_argument("--stall-minutes", type=float, default=30.0)
    monitor.add_argument(
        "--allow-unknown-model",
        action="store_true",
        help="watch model ids the batch model catalog does not know (refused otherwise)",
    )
    monitor.set_defaults(func=cmd_monitor)
