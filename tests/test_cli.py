"""The bedrock-batch command: dry-run preprocess, offline merge, IAM policies."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import polars as pl
import pytest
from prefect.settings import PREFECT_API_URL

from flows.cli import main
from tasks.pipeline.columns import ERROR_CODE, RESPONSE_TEXT
from tasks.settings import get_settings

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"


def _answer(line: str) -> str:
    record = json.loads(line)
    output = {
        "content": [{"type": "text", "text": "ok " + record["recordId"]}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }
    return json.dumps({**record, "modelOutput": output})


def test_preprocess_then_merge_offline_round_trip(tmp_path, capsys):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(250)]}).write_csv(source)
    run_dir = tmp_path / "run"

    command = [
        "preprocess", "--source", str(source), "--prompt-id", "joke_about_topic",
        "--model-id", CLAUDE, "--out", f"{run_dir}/", "--max-concurrent-jobs", "2",
    ]  # fmt: skip
    assert main(command) == 0
    printed = capsys.readouterr().out
    shards = sorted((run_dir / "input").glob("*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert "250" in printed
    # `--out plan/`, as the README types it, printed "Shards written under plan//input/".
    assert f"Shards written under {run_dir}/input/" in printed
    # Bedrock's layout: <jobId>/<input file>.out; the second job never ran.
    job_dir = tmp_path / "outputs" / "job0abc12345"
    job_dir.mkdir(parents=True)
    lines = shards[0].read_text().splitlines()
    (job_dir / "shard-00000.jsonl.out").write_text("\n".join(_answer(x) for x in lines) + "\n")

    merge = ["merge", "--run-dir", str(run_dir), "--outputs", str(tmp_path / "outputs")]
    assert main([*merge, "--allow-missing"]) == 0
    assert "125 of 250 rows have no output" in capsys.readouterr().out

    out = pl.read_parquet(run_dir / "output" / "*.parquet")
    assert out.height == 250
    assert out.filter(pl.col(RESPONSE_TEXT).is_not_null()).height == 125
    assert out.filter(pl.col(ERROR_CODE) == "MissingOutput").height == 125


def test_iam_policy_scopes_role_prefixes_and_models(capsys):
    role = "arn:aws:iam::111122223333:role/BedrockBatch"

    assert main(["iam-policy", "--role-arn", role, "--model-id", f"us.{CLAUDE}",
                 "--output-uri", "s3://my-bucket/batch", "--run-name", "nightly",
                 "--region", "us-east-1"]) == 0  # fmt: skip

    policies = json.loads(capsys.readouterr().out)
    trust = policies["service_role_trust_policy"]["Statement"][0]
    assert trust["Principal"] == {"Service": "bedrock.amazonaws.com"}
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": "111122223333"}
    service = {s["Sid"]: s for s in policies["service_role_policy"]["Statement"]}
    assert service["ReadJobInputs"]["Resource"] == ["arn:aws:s3:::my-bucket/batch/nightly/input/*"]
    assert service["WriteJobOutputs"]["Resource"] == [
        "arn:aws:s3:::my-bucket/batch/nightly/bedrock-output/*"
    ]
    assert service["InvokeChosenModels"]["Resource"] == [
        f"arn:aws:bedrock:*::foundation-model/{CLAUDE}",
        f"arn:aws:bedrock:us-east-1:111122223333:inference-profile/us.{CLAUDE}",
    ]
    runner = {s["Sid"]: s for s in policies["runner_policy"]["Statement"]}
    assert runner["PassServiceRole"]["Resource"] == [role]
    # The run's cost estimate calls CountTokens on the chosen models, nothing else.
    assert runner["EstimateInputTokens"]["Action"] == ["bedrock:CountTokens"]
    assert runner["EstimateInputTokens"]["Resource"] == service["InvokeChosenModels"]["Resource"]


def test_iam_policy_grants_the_runner_its_s3_sources_only(capsys):
    role = "arn:aws:iam::111122223333:role/BedrockBatch"
    assert main(["iam-policy", "--role-arn", role, "--model-id", CLAUDE,
                 "--output-uri", "s3://my-bucket/batch", "--region", "us-east-1",
                 "--source", "s3://data-bucket/sets/2026/*.parquet",
                 "--source", "s3://data-bucket/one.csv",
                 "--source", "data/local.csv"]) == 0  # fmt: skip
    runner = {
        s["Sid"]: s for s in json.loads(capsys.readouterr().out)["runner_policy"]["Statement"]
    }
    assert runner["ReadSources"]["Action"] == ["s3:GetObject"]
    assert runner["ReadSources"]["Resource"] == [
        "arn:aws:s3:::data-bucket/one.csv*",
        "arn:aws:s3:::data-bucket/sets/2026/*",
    ]
    assert runner["ListSources"]["Resource"] == ["arn:aws:s3:::data-bucket"]
    prefixes = runner["ListSources"]["Condition"]["StringLike"]["s3:prefix"]
    assert "sets/2026/" in prefixes and "one.csv" in prefixes


def test_iam_policy_rejects_a_malformed_role(capsys):
    code = main(["iam-policy", "--role-arn", "BedrockBatch", "--model-id", CLAUDE,
                 "--output-uri", "s3://my-bucket/batch"])  # fmt: skip

    assert code == 2
    assert "arn:aws:iam::<12-digit account>:role/<name>" in capsys.readouterr().err


def test_iam_policy_without_run_name_covers_every_run_under_the_output(capsys):
    role = "arn:aws:iam::111122223333:role/BedrockBatch"

    assert main(["iam-policy", "--role-arn", role, "--model-id", CLAUDE,
                 "--output-uri", "s3://my-bucket/batch", "--region", "eu-west-1"]) == 0  # fmt: skip

    service = {s["Sid"]: s for s in json.loads(capsys.readouterr().out)["service_role_policy"][
        "Statement"]}  # fmt: skip
    assert service["ReadJobInputs"]["Resource"] == ["arn:aws:s3:::my-bucket/batch/*/input/*"]


def test_iam_policy_without_any_region_says_how_to_give_one(capsys, monkeypatch):
    from tasks.settings import get_settings

    for name in ("BEDROCK_BATCH_REGION", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    get_settings.cache_clear()
    try:
        code = main(["iam-policy", "--role-arn", "arn:aws:iam::111122223333:role/B",
                     "--model-id", CLAUDE, "--output-uri", "s3://my-bucket/batch"])  # fmt: skip
    finally:
        get_settings.cache_clear()

    assert code == 2
    err = capsys.readouterr().err
    assert "--region" in err and "<region>" not in err


def _topics_csv(tmp_path, rows: int = 150):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(rows)]}).write_csv(source)
    return source


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_run_unknown_prompt_id_is_one_line(tmp_path, capsys):
    code = main(["run", "--source", str(_topics_csv(tmp_path)), "--prompt-id", "jokes",
                 "--output-uri", str(tmp_path / "out"), "--local-stack"])  # fmt: skip

    assert code == 2
    assert "jokes" in _one_error_line(capsys)


def test_run_missing_source_file_is_one_line(tmp_path, capsys):
    code = main(["run", "--source", str(tmp_path / "nope.csv"), "--prompt-id", "joke_about_topic",
                 "--output-uri", str(tmp_path / "out"), "--local-stack"])  # fmt: skip

    assert code == 2
    assert f"{tmp_path / 'nope.csv'}: no such file or folder" in _one_error_line(capsys)


def test_run_without_credentials_says_how_to_set_them_or_use_the_local_stack(
    tmp_path, capsys, monkeypatch
):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL_BEDROCK"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("BEDROCK_BATCH_ROLE_ARN", "arn:aws:iam::111122223333:role/B")
    get_settings.cache_clear()
    try:
        code = main(["run", "--source", str(_topics_csv(tmp_path)), "--prompt-id",
                     "joke_about_topic", "--output-uri", "s3://my-bucket/runs"])  # fmt: skip
    finally:
        get_settings.cache_clear()

    assert code == 2
    line = _one_error_line(capsys)
    assert "no AWS credentials" in line and "AWS_PROFILE" in line and "--local-stack" in line


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--model-id", "acme.unknown-v1"], "Unknown model id 'acme.unknown-v1'"),
        (["--output-uri", "s3://"], "output_uri 's3://' is not a valid S3 URI"),
        (["--run-name", "bad name/x"], "run_name 'bad name/x' is not usable"),
        (["--role-arn", "my-role"], "role_arn 'my-role' is not an IAM role ARN"),
        (["--max-tokens", "9000"], "max_tokens=9000 is over the 4,096 output tokens"),
        (["--output-uri", "s3:/my-bucket/runs"], "Write 's3://my-bucket/runs'"),
        (
            ["--model-id", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "--top-p", "0.5"],
            "accepts temperature or top_p, not both",
        ),
        ([], "BEDROCK_BATCH_STAGING_URI"),  # a local output_uri needs a staging prefix on S3
    ],
)
def test_run_mistakes_known_offline_come_before_the_credentials_check(
    tmp_path, capsys, monkeypatch, extra, words
):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL_BEDROCK", "BEDROCK_BATCH_STAGING_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BEDROCK_BATCH_ROLE_ARN", "arn:aws:iam::111122223333:role/B")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    get_settings.cache_clear()
    output = str(tmp_path / "out") if not extra else "s3://my-bucket/runs"
    try:
        code = main(["run", "--source", str(_topics_csv(tmp_path)), "--prompt-id",
                     "joke_about_topic", "--output-uri", output, *extra])  # fmt: skip
    finally:
        get_settings.cache_clear()

    assert code == 2
    line = _one_error_line(capsys)
    assert words in line and "credentials" not in line, line


@pytest.mark.slow
def test_run_failing_inside_the_flow_prints_one_error_line_and_no_traceback(tmp_path):
    """In a real process: Prefect's console handler sits on the root logger and logs the
    flow's and task's exceptions with their tracebacks unless the command quiets them."""
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(149)] + [""]}).write_csv(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BEDROCK_BATCH_"))}
    # The worker's Prefect server: without it the CLI starts a temporary one on the shared
    # ~/.prefect database, which another test's temporary server may be writing to.
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()

    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", str(source),
         "--prompt-id", "joke_about_topic", "--output-uri", str(tmp_path / "out"),
         "--local-stack"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "R0000000149" in errors[0], done.stderr[-2000:]


def test_run_unwritable_output_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode: make the output a file instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("a file, not a folder")
        code = main(["run", "--source", str(_topics_csv(tmp_path)),
                     "--prompt-id", "joke_about_topic", "--output-uri", str(locked / "out"),
                     "--local-stack"])  # fmt: skip
    finally:
        if locked.is_dir():
            locked.chmod(0o700)

    assert code == 2
    assert f"{locked}: permission denied" in _one_error_line(capsys)


def test_preprocess_missing_column_is_one_line(tmp_path, capsys):
    source = tmp_path / "other.csv"
    pl.DataFrame({"subject": [f"t{i}" for i in range(150)]}).write_csv(source)

    code = main(["preprocess", "--source", str(source), "--prompt-id", "joke_about_topic",
                 "--model-id", CLAUDE, "--out", str(tmp_path / "plan")])  # fmt: skip

    assert code == 2
    assert "topic" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, capsys):
    code = main(["run", "--source", str(tmp_path / "nope.csv"), "--output-uri", "out",
                 "--local-stack", "--debug"])  # fmt: skip

    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("no such file or folder")


def test_merge_with_missing_outputs_exits_non_zero_and_counts_rows(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert not main(["preprocess", "--source", str(_topics_csv(tmp_path, 250)),
                 "--prompt-id", "joke_about_topic", "--model-id", CLAUDE,
                 "--out", str(run_dir), "--max-concurrent-jobs", "2"])  # fmt: skip
    shard = sorted((run_dir / "input").glob("*.jsonl"))[0]
    job_dir = tmp_path / "outputs" / "job0abc12345"
    job_dir.mkdir(parents=True)
    lines = shard.read_text().splitlines()
    (job_dir / f"{shard.name}.out").write_text("\n".join(_answer(x) for x in lines) + "\n")
    capsys.readouterr()

    code = main(["merge", "--run-dir", str(run_dir), "--outputs", str(tmp_path / "outputs")])

    assert code == 1
    line = _one_error_line(capsys)
    assert "125 of 250 rows have no output" in line and "--allow-missing" in line


def test_merge_into_the_folder_of_a_live_run_is_refused_naming_its_owner(tmp_path, capsys):
    """The parts a live run merged are its answers: an offline merge beside it replaced one
    with MissingOutput rows, and the run then finished with them."""
    import socket

    from tasks.run.owner import _process

    run_dir = tmp_path / "run"
    assert not main(["preprocess", "--source", str(_topics_csv(tmp_path, 250)),
                 "--prompt-id", "joke_about_topic", "--model-id", CLAUDE,
                 "--out", str(run_dir), "--max-concurrent-jobs", "2"])  # fmt: skip
    (tmp_path / "outputs" / "job0abc12345").mkdir(parents=True)
    shard = sorted((run_dir / "input").glob("*.jsonl"))[0]
    lines = shard.read_text().splitlines()
    outputs = tmp_path / "outputs" / "job0abc12345" / f"{shard.name}.out"
    outputs.write_text("\n".join(_answer(x) for x in lines) + "\n")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = {"flow_run_id": "the-live-run", "host": socket.gethostname(), "pid": owner.pid,
                 "process": _process(owner.pid), "since": "2026-12-07T12:00:00+00:00",
                 "expiry_seconds": 60}  # fmt: skip
        (run_dir / "owner.json").write_text(json.dumps(claim))
        capsys.readouterr()

        code = main(["merge", "--run-dir", str(run_dir), "--outputs", str(tmp_path / "outputs")])
    finally:
        owner.kill()
        owner.wait()

    assert code == 2
    line = _one_error_line(capsys)
    assert "the-live-run" in line and f"pid {owner.pid}" in line
    assert not list((run_dir / "output").glob("part-*.parquet"))


def test_local_forwards_port_pace_and_fault_options():
    from emulator.__main__ import build_config, parse_args

    args = parse_args(["--port", "4566", "--records-per-second", "7", "--fault", "fail_jobs=0.25",
                       "--fault", "quota=3"], prog="bedrock-batch local")  # fmt: skip
    config = build_config(args)

    assert args.port == 4566
    assert config.records_per_second == 7
    assert (config.faults.fail_jobs, config.faults.quota) == (0.25, 3)


def test_local_help_is_the_stack_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["local", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bedrock-batch local") and "--fault NAME=VALUE" in out


def test_a_bad_setting_is_one_line_naming_its_variable_and_value(tmp_path, capsys, environment):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(150)]}).write_csv(source)
    environment({"BEDROCK_BATCH_MERGE_WORKERS": "0", "BEDROCK_BATCH_POLL_INTERVAL_SECONDS": "1m"})
    command = [
        "preprocess", "--source", str(source), "--prompt-id", "joke_about_topic",
        "--model-id", CLAUDE, "--out", str(tmp_path / "run"),
    ]  # fmt: skip

    assert main(command) == 2

    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert error.startswith("error: Invalid setting BEDROCK_BATCH_POLL_INTERVAL_SECONDS='1m': ")
    assert "; BEDROCK_BATCH_MERGE_WORKERS='0': Input should be greater than or equal to 1" in error
    assert not (tmp_path / "run").exists()


def test_run_flags_reach_every_parameter_they_name():
    from flows.cli import _params, build_parser

    args = build_parser().parse_args(
        ["run", "--source", "s.csv", "--output-uri", "s3://my-bucket/runs",
         "--max-cost-usd", "12.5", "--max-attempts", "5", "--no-on-demand", "--retry-stopped",
         "--stop-sequence", "END", "--stop-sequence", "STOP", "--no-normalize",
         "--input-type", "search_query", "--on-demand-rps", "2"]
    )  # fmt: skip

    params = _params(args)

    assert (params.max_cost_usd, params.max_attempts) == (12.5, 5)
    assert (params.on_demand, params.retry_stopped, params.on_demand_rps) == (False, True, 2.0)
    assert params.inference.stop_sequences == ["END", "STOP"]
    assert (params.inference.normalize, params.inference.input_type) == (False, "search_query")
    defaults = _params(build_parser().parse_args(["run", "--source", "s.csv", "--output-uri", "o"]))
    assert (defaults.on_demand, defaults.retry_stopped) == (True, False)
    assert defaults.max_cost_usd is None
    assert defaults.inference.normalize is None and defaults.inference.stop_sequences is None


def test_every_run_parameter_has_a_flag():
    """A parameter the UI form shows and the command cannot set is a gap a user hits later."""
    from flows.cli import build_parser
    from tasks.run.params import BatchParams, InferenceOverrides

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = commands.choices["run"]
    flags = {s for action in [*run._actions, *parser._actions] for s in action.option_strings}
    singular = {
        "tags": "--tag",
        "stop_sequences": "--stop-sequence",
        "embedding_types": "--embedding-type",
    }
    names = [n for n in BatchParams.model_fields if n != "inference"]
    names += list(InferenceOverrides.model_fields)

    missing = [n for n in names if singular.get(n, "--" + n.replace("_", "-")) not in flags]

    assert missing == []


def test_ctrl_c_is_one_line_with_what_to_do(monkeypatch, capsys):
    # Ctrl-C during `merge` printed a KeyboardInterrupt traceback.
    import flows.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_merge", interrupted)
    code = main(["merge", "--run-dir", "r", "--outputs", "o"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip() == (
        "error: interrupted; the parts written are whole; run the same command again to merge "
        "the rest."
    )


def test_ctrl_c_during_a_run_gives_the_whole_stop_command(monkeypatch, capsys):
    # It said `bedrock-batch stop --run-name <name>`, which argparse refuses: stop needs
    # --output-uri too.
    import flows.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_run", interrupted)
    base = ["run", "--source", "data/topics.csv", "--output-uri", "s3://my-bucket/runs"]
    assert main([*base, "--run-name", "jokes-1"]) == 130
    err = capsys.readouterr().err
    assert "`bedrock-batch stop --run-name jokes-1 --output-uri s3://my-bucket/runs`" in err
    stop = err.split("`")[1].split()[1:]
    assert cli.build_parser().parse_args(stop).func is cli.cmd_stop

    assert main(base) == 130
    assert "--run-name <the run name the flow run is named after> --output-uri" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["automations", "apply", "--heartbeat-seconds", "-1"], "--heartbeat-seconds: must be at"),
        (["automations", "apply", "--webhook-url", "notaurl"], "--webhook-url: must be an http"),
        (["serve", "--monitor-interval-minutes", "0"], "--monitor-interval-minutes: must be more"),
        (["cloudwatch", "setup", "--model-id", "m", "--threshold", "-5"], "--threshold: must be"),
    ],
)
def test_monitoring_flags_out_of_range_name_the_flag(argv, words, capsys):
    # A Prefect validation message, a pydantic dump or a block made from "notaurl" before.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and "Traceback" not in err


def test_run_output_says_what_the_run_cost(tmp_path, capsys):
    # The CLI printed records and tokens; the cost was only in summary.json and the UI.
    from flows.cli import _show_output

    summary = {
        "output_uri": "s3://bucket/out/run/output",
        "parts": ["s3://bucket/out/run/output/part-00000.parquet"],
        "counts": {"records": 40, "succeeded": 40, "failed": 0},
        "tokens": {"input": 1634, "output": 1476},
        "cost": {
            "batch_usd": 0.0, "batch_rows": 0, "on_demand_usd": 0.0022535,
            "on_demand_rows": 40, "total_usd": 0.0022535, "held_back_rows": 0,
        },
    }  # fmt: skip

    _show_output(summary)

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (
        "Cost: $0.0000 batch (0 rows) + $0.0023 on demand at the full price (40 rows) = $0.0023"
    )


def test_pipeline_summary_of_a_stage_not_run_before_emptied_by_was_recorded(capsys):
    # A pipeline finished by an earlier version: its not-run stages have no rows_in nor
    # emptied_by, and printing its summary on a resume died on a KeyError.
    from flows.pipeline_cli import show_summary

    stage = {"model_id": "m", "counts": {"records": 0, "succeeded": 0, "failed": 0}}
    stage |= {"tokens": {"input": 0, "output": 0}, "cost_usd": 0.0, "not_run": True}
    summary = {"run_name": "p", "rows": 3, "output_uri": "out", "cost_usd": 0.0}
    summary |= {"tokens": {"input": 0, "output": 0}}
    summary["stages"] = [{**stage, "stage": "grade", "rows_kept": 0, "rows_in": 3}]
    summary["stages"] += [{**stage, "stage": "regrade", "rows_kept": 0}]

    show_summary(summary)

    printed = capsys.readouterr().out
    assert "stage grade not run: a filter kept no row" in printed
    assert "stage regrade not run: a filter kept no row" in printed


def test_local_stack_creates_the_bucket_of_an_s3_output_uri(environment, capsys):
    # The README's `bedrock-batch run ... --output-uri s3://my-bucket/runs --local-stack` was
    # refused ("The bucket 'my-bucket' ... does not exist. Create it"), in an S3 that lives
    # only as long as the command.
    from contextlib import ExitStack

    from flows.cli import start_local_stack
    from tasks.aws.clients import client

    environment({})  # the stack's variables go when the test ends
    with ExitStack() as stack:
        start_local_stack(stack, "s3://my-bucket/runs")
        buckets = {b["Name"] for b in client("s3").list_buckets()["Buckets"]}
    assert {"my-bucket", "bedrock-batch-demo"} <= buckets
    assert "bucket s3://my-bucket created" in capsys.readouterr().out


def test_pipeline_summary_prints_costs_in_dollars_and_unknown_when_unpriced(capsys):
    # It printed "cost 0.007492749999999999" for a priced stage and "cost None" for one
    # without a price.
    from flows.pipeline_cli import show_summary

    def stage(name, cost):
        return {
            "stage": name,
            "model_id": "m",
            "counts": {"records": 300, "succeeded": 300, "failed": 0},
            "tokens": {"input": 40557, "output": 3877},
            "cost_usd": cost,
        }

    summary = {"run_name": "p", "rows": 300, "output_uri": "out", "cost_usd": 0.007492749999999999}
    summary |= {"tokens": {"input": 81114, "output": 7754}}
    summary["stages"] = [stage("answer", None), stage("grade", 0.007492749999999999)]

    show_summary(summary)

    printed = capsys.readouterr().out
    assert "tokens 40,557/3,877; cost unknown" in printed
    assert "tokens 40,557/3,877; cost $0.0075" in printed
    assert "total tokens in/out: 81,114/7,754; cost $0.0075" in printed
    assert "None" not in printed and "0.00749" not in printed


def _interrupted_on_a_local_stack(run_dir) -> None:
    """The files a run interrupted on a --local-stack left: a job created, the run unfinished."""
    from tasks.run.layout import IDENTITY_FILE
    from tasks.run.state import JobAttempt, RunStateStore

    run_dir.mkdir(parents=True)
    (run_dir / IDENTITY_FILE).write_text("{}")
    store = RunStateStore(str(run_dir), run_dir.name)
    arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/gone"
    attempt = JobAttempt(1, f"k-{run_dir.name}-shard-00000-a1", "t", records=100, job_arn=arn)
    store.shard("shard-00000").attempts.append(attempt)
    store.save("shard-00000")


@pytest.mark.parametrize("command", ["run", "pipeline"])
def test_a_run_interrupted_on_an_earlier_local_stack_is_refused_naming_its_folder(
    tmp_path, command
):
    # The local stack's jobs and S3 files end with its command: the same command again failed
    # on the run's first job with ResourceNotFoundException, and --restart did too.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BEDROCK_BATCH_"))}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # see the test above
    out = tmp_path / "out"
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(100)]}).write_csv(source)
    if command == "run":
        _interrupted_on_a_local_stack(out / "jokes")
        args = ["run", "--source", str(source), "--prompt-id", "joke_about_topic"]
        folder = out / "jokes"
    else:
        _interrupted_on_a_local_stack(out / "jokes" / "stages" / "answer" / "jokes--answer")
        args = ["pipeline", "run", "--pipeline-id", "answer_and_grade", "--source", str(source)]
        folder = out / "jokes"

    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--output-uri", str(out),
         "--run-name", "jokes", "--local-stack"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr[-2000:]
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("error: run jokes"), said
    assert "was interrupted on an earlier --local-stack" in said[0]
    assert f"Remove {folder} (or pass another --run-name)" in said[0]


def test_a_finished_run_or_one_without_jobs_on_an_earlier_local_stack_is_not_refused(tmp_path):
    # A finished run reports itself from its folder; one stopped before its first job has
    # nothing on the old stack to lose.
    from flows.cli import refuse_runs_of_an_ended_stack, runs_of_an_ended_stack
    from tasks.errors import RunSettingsError
    from tasks.run.state import RunStateStore

    _interrupted_on_a_local_stack(tmp_path / "done")
    store = RunStateStore(str(tmp_path / "done"), "done")
    store.state.finished_at = "2026-12-07T00:00:00+00:00"
    store.save()
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "run.json").write_text("{}")

    refuse_runs_of_an_ended_stack(str(tmp_path))
    refuse_runs_of_an_ended_stack(str(tmp_path / "missing"))
    store.state.finished_at = None
    store.save()
    with pytest.raises(RunSettingsError, match="run done in .* was interrupted on an earlier"):
        refuse_runs_of_an_ended_stack(str(tmp_path))
    # A run of the default name is named (its source hashed) only when one is left: the runs
    # directly in the output folder, not a pipeline's stages deeper down.
    assert runs_of_an_ended_stack(str(tmp_path), "*") == [tmp_path / "done"]
    assert runs_of_an_ended_stack(str(tmp_path.parent), "*") == []


def test_ctrl_c_on_a_local_stack_does_not_say_resume():
    from flows.cli import _resume_hint

    args = argparse.Namespace(command="run", local_stack=True, output_uri="out", run_name="r")
    assert "cannot be resumed. Remove out/r (or pass another --run-name)" in _resume_hint(args)
    on_s3 = argparse.Namespace(**{**vars(args), "output_uri": "s3://b/runs"})
    assert _resume_hint(on_s3).endswith("the same command starts it over.")
    args.local_stack = False
    assert "Run the same command again to resume" in _resume_hint(args)
