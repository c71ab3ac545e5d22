"""The bedrock-batch command: dry-run preprocess, offline merge, IAM policies."""

from __future__ import annotations

import json

import polars as pl

from flows.cli import main
from tasks.pipeline.columns import ERROR_CODE, RESPONSE_TEXT

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
        "--model-id", CLAUDE, "--out", str(run_dir), "--max-concurrent-jobs", "2",
    ]  # fmt: skip
    assert main(command) == 0
    printed = capsys.readouterr().out
    shards = sorted((run_dir / "input").glob("*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert "250" in printed
    # Bedrock's layout: <jobId>/<input file>.out; the second job never ran.
    job_dir = tmp_path / "outputs" / "job0abc12345"
    job_dir.mkdir(parents=True)
    lines = shards[0].read_text().splitlines()
    (job_dir / "shard-00000.jsonl.out").write_text("\n".join(_answer(x) for x in lines) + "\n")

    assert main(["merge", "--run-dir", str(run_dir), "--outputs", str(tmp_path / "outputs")]) == 0

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
