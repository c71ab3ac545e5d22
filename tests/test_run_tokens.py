"""A run's token figures where the rows carry no counts: the jobs' manifests, else unknown."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from flows.batch_inference import batch_inference
from tasks.pipeline import tokens
from tasks.pipeline.columns import (
    ERROR_CODE,
    INPUT_TOKENS,
    JOB_ID,
    RECORD_ID,
    SERVED_BY,
    SERVED_ON_DEMAND,
)
from tasks.pipeline.merge import write_part
from tasks.run.params import BatchParams

COHERE = "cohere.embed-english-v3"


def _texts(tmp_path: Path, n: int) -> str:
    path = tmp_path / "texts.jsonl"
    rows = [{"input_text": f"review number {i}: " + "word " * (i % 7)} for i in range(n)]
    pl.DataFrame(rows).write_ndjson(path)
    return str(path)


def _job_files(stack, run_name: str) -> dict[str, dict[str, bytes]]:
    """Every batch job of the run: its id -> {file name: bytes} of what the emulator wrote."""
    s3 = stack.client("s3")
    files = {}
    for job in stack.ledger(name_contains=run_name):
        bucket, prefix = job["outputUri"].removeprefix("s3://").split("/", 1)
        base = f"{prefix.rstrip('/')}/{job['jobId']}/"
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=base).get("Contents", [])
        files[job["jobId"]] = {
            o["Key"].removeprefix(base): s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed
        }
    return files


def test_cohere_run_takes_its_tokens_from_each_jobs_manifest(stack, tmp_path):
    # Cohere Embed's outputs carry no token counts: the run said "tokens in/out: 0/0" (CLI,
    # summary.json, events) though each job's manifest.json.out held what Bedrock charged.
    params = BatchParams(
        source=_texts(tmp_path, 200), model_id=COHERE, output_uri=str(tmp_path / "out"),
        run_name="tokens-cohere", max_records_per_job=100,
    )  # fmt: skip

    summary = batch_inference(params)

    jobs = _job_files(stack, "tokens-cohere")
    manifests = {job: json.loads(f["manifest.json.out"]) for job, f in jobs.items()}
    assert len(manifests) == 2
    expected_in = sum(m["inputTokenCount"] for m in manifests.values())
    assert expected_in > 0
    assert summary["tokens"] == {
        "input": expected_in,
        "output": sum(m["outputTokenCount"] for m in manifests.values()),
    }
    # Each shard's and each job's figure is its own job's manifest.
    by_job = {j["job"]: j for j in summary["jobs"]}
    for job, manifest in manifests.items():
        assert by_job[job]["input_tokens"] == manifest["inputTokenCount"]
        assert by_job[job]["output_tokens"] == manifest["outputTokenCount"]
    cost_jobs = {j["job_id"]: j for j in summary["cost"]["jobs"]}
    assert {j: c["input_tokens"] for j, c in cost_jobs.items()} == {
        j: m["inputTokenCount"] for j, m in manifests.items()
    }
    # Rows keep null tokens: the manifest is a job's total, not a row's count.
    out = pl.read_parquet(summary["parts"])
    assert out[INPUT_TOKENS].null_count() == out.height == 200
    written = json.loads((tmp_path / "out" / "tokens-cohere" / "summary.json").read_text())
    assert written["tokens"]["input"] == expected_in


def test_cohere_rows_served_on_demand_take_their_tokens_from_invoke_model_headers(
    stack, tmp_path, capsys
):
    # Too few records for a batch job: served on demand, no manifest. Their bodies count no
    # tokens; the InvokeModel answers' headers do (it said "unknown", and 0 before that).
    from flows.cli import _show_output

    params = BatchParams(
        source=_texts(tmp_path, 5), model_id=COHERE, output_uri=str(tmp_path / "out"),
        run_name="tokens-cohere-od",
    )  # fmt: skip

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert (out[SERVED_BY] == SERVED_ON_DEMAND).all()
    sent = {}
    for shard in (tmp_path / "out" / "tokens-cohere-od" / "input").glob("shard-*.jsonl"):
        for line in shard.read_text().splitlines():
            record = json.loads(line)
            sent[record["recordId"]] = record["modelInput"]
    expected = {rid: _emulator_input_tokens(body) for rid, body in sent.items()}
    assert dict(out.select(RECORD_ID, INPUT_TOKENS).iter_rows()) == expected
    total = sum(expected.values())
    assert summary["tokens"] == {"input": total, "output": 0}
    assert [j["input_tokens"] for j in summary["jobs"]] == [total]
    assert [j["input_tokens"] for j in summary["cost"]["jobs"]] == [total]
    _show_output(summary)
    assert f"tokens in/out: {total:,}/0" in capsys.readouterr().out


def _emulator_input_tokens(model_input: dict) -> int:
    """What the emulator charges for one request body (its batch jobs and InvokeModel alike)."""
    from emulator.catalog import lookup
    from emulator.responders import count_tokens

    counted, problem = count_tokens(json.dumps(model_input), lookup(COHERE), "InvokeModel")
    assert problem is None
    return counted


def test_cohere_run_with_an_on_demand_tail_knows_its_tokens_and_cost(stack, tmp_path, environment):
    # The tail's rows (records a batch job failed, served through InvokeModel) kept null
    # tokens, so the whole run's tokens and cost said "unknown"; Bedrock sends their counts
    # in the InvokeModel response's X-Amzn-Bedrock-Input-Token-Count header.
    prices = tmp_path / "prices.json"
    rates = {"batch_input": 0.05, "on_demand_input": 0.1, "source": "test"}
    prices.write_text(json.dumps({COHERE: rates}))
    environment({"BEDROCK_BATCH_PRICES_FILE": str(prices)})
    stack.set_faults(record_error_rate=0.1, seed=3)
    params = BatchParams(
        source=_texts(tmp_path, 200), model_id=COHERE, output_uri=str(tmp_path / "out"),
        run_name="tokens-cohere-tail", max_records_per_job=100, on_demand_rps=100,
    )  # fmt: skip

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    tail = out.filter(pl.col(SERVED_BY) == SERVED_ON_DEMAND)
    assert 0 < tail.height < 60 and out[ERROR_CODE].null_count() == 200
    sent = {}
    for shard in (tmp_path / "out" / "tokens-cohere-tail" / "input").glob("shard-*.jsonl"):
        for line in shard.read_text().splitlines():
            record = json.loads(line)
            sent[record["recordId"]] = record["modelInput"]
    assert len(sent) == 200
    # Each tail row's tokens are what the emulator counted for the body it was sent.
    by_row = dict(tail.select(RECORD_ID, INPUT_TOKENS).iter_rows())
    assert by_row == {k: _emulator_input_tokens(sent[k]) for k in by_row}
    manifests = [
        json.loads(f["manifest.json.out"]) for f in _job_files(stack, "tokens-cohere-tail").values()
    ]
    assert len(manifests) == 2
    batch_in = sum(m["inputTokenCount"] for m in manifests)
    tail_in = sum(by_row.values())
    assert summary["tokens"] == {
        "input": batch_in + tail_in,
        "output": sum(m["outputTokenCount"] for m in manifests),
    }
    cost = summary["cost"]
    assert cost["batch_usd"] == pytest.approx(batch_in * 0.05 / 1e6)
    assert cost["on_demand_usd"] == pytest.approx(tail_in * 0.1 / 1e6)
    assert cost["total_usd"] == pytest.approx(cost["batch_usd"] + cost["on_demand_usd"])


def test_offline_merge_of_a_cohere_run_takes_each_jobs_manifest(stack, tmp_path, capsys):
    # `bedrock-batch merge` read no manifest: a Cohere run's figures were None.
    from flows.cli import main
    from tasks.pipeline.merge import merge_offline_run

    params = BatchParams(
        source=_texts(tmp_path, 200), model_id=COHERE, output_uri=str(tmp_path / "out"),
        run_name="tokens-cohere-offline", max_records_per_job=100,
    )  # fmt: skip
    batch_inference(params)
    downloaded = tmp_path / "downloaded"
    manifests = {}
    for job, files in _job_files(stack, "tokens-cohere-offline").items():
        (downloaded / job).mkdir(parents=True)
        for name, data in files.items():
            (downloaded / job / name).write_bytes(data)
        manifests[job] = json.loads(files["manifest.json.out"])
    assert len(manifests) == 2
    run_dir = tmp_path / "out" / "tokens-cohere-offline"

    merged = merge_offline_run(run_dir, downloaded)

    for part, stats in zip(merged.parts, merged.stats, strict=True):
        (job,) = pl.read_parquet(part)[JOB_ID].unique().to_list()
        assert (stats.input_tokens, stats.output_tokens) == (
            manifests[job]["inputTokenCount"],
            manifests[job]["outputTokenCount"],
        )
    total_in = sum(m["inputTokenCount"] for m in manifests.values())
    assert merged.tokens == (total_in, sum(m["outputTokenCount"] for m in manifests.values()))
    assert main(["merge", "--run-dir", str(run_dir), "--outputs", str(downloaded)]) == 0
    assert f"tokens in/out: {total_in:,}/0" in capsys.readouterr().out
    # A job whose manifest was not downloaded: its tokens, and so the run's, are unknown.
    (downloaded / next(iter(manifests)) / "manifest.json.out").unlink()
    assert merge_offline_run(run_dir, downloaded).tokens == (None, None)


def test_merge_stats_of_rows_without_counts_are_unknown_unless_their_job_has_a_manifest(
    tmp_path,
):
    frame = pl.DataFrame(
        {
            "record_id": ["R0", "R1", "R2"],
            INPUT_TOKENS: [None, None, None],
            "error_code": [None, None, "ValidationError"],
            JOB_ID: ["job1", "job1", "job1"],
        },
        schema_overrides={INPUT_TOKENS: pl.Int64},
    )

    unknown = write_part(frame, tmp_path / "a.parquet")
    manifests = tokens.with_manifests(tokens.tally(frame.lazy()).collect(), {"job1": (41, 0)})
    known = write_part(frame, tmp_path / "b.parquet", usage=manifests)

    assert (unknown.input_tokens, unknown.output_tokens) == (None, None)
    assert (known.input_tokens, known.output_tokens) == (41, 0)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({JOB_ID: ["a", "b"], INPUT_TOKENS: [10, 0], tokens.UNCOUNTED: [0, 3]}, (15, 0)),
        ({JOB_ID: ["a", None], INPUT_TOKENS: [10, 0], tokens.UNCOUNTED: [0, 3]}, (None, None)),
        ({JOB_ID: ["a"], INPUT_TOKENS: [10], tokens.UNCOUNTED: [0]}, (10, 0)),
    ],
)
def test_token_totals_use_a_manifest_only_for_jobs_whose_rows_have_none(usage, expected):
    frame = pl.DataFrame(usage).with_columns(pl.lit(0, pl.Int64).alias("output_tokens"))
    assert tokens.totals(frame, {"b": (5, 0), "a": (999, 9)}) == expected
