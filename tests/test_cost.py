"""Prices, the pre-flight estimate, the max_cost_usd ceiling and the actual cost of a run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers import assert_answers_match_rows, graded_source

from flows.batch_inference import batch_inference
from flows.cli import main as cli_main
from tasks.bedrock import catalog, prices
from tasks.errors import CostCeilingError, RunSettingsError
from tasks.pipeline.columns import (
    ERROR_CODE,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    SERVED_BY,
    SERVED_ON_DEMAND,
)
from tasks.pipeline.estimate import estimate_from_dir
from tasks.pipeline.preprocess import preprocess_params
from tasks.run.cost import COST_CEILING_REACHED, ESTIMATE_FILE, cost_markdown
from tasks.run.params import BatchParams, InferenceOverrides
from tasks.settings import get_settings

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "topics.csv"
# The estimate fits CountTokens counts of a sample; the emulator rounds each record's count
# down to a whole token, which a linear fit recovers to well under one token a record.
ESTIMATE_TOLERANCE = 0.02


def _topics(tmp_path: Path, n: int) -> str:
    path = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic number {i} of a longer list" for i in range(n)]}).write_csv(
        path
    )
    return str(path)


def test_prices_cover_every_catalog_model_with_a_source():
    assert set(prices.PRICES) == set(catalog.CATALOG)
    for price in prices.PRICES.values():
        assert price.on_demand_input is None or price.source.startswith(prices.PRICING_URL)
        assert price.read == "2026-11-22"


def test_price_unknown_gives_unknown_cost():
    price = prices.PRICES["anthropic.claude-3-5-haiku-20241022-v1:0"]
    assert price.cost(1000, 100, "batch") is None
    assert price.cost(1_000_000, 0, "on_demand") == pytest.approx(0.8)


def test_prices_file_overrides_by_base_model_id(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({f"us.{CLAUDE}": {"batch_input": 1.0, "source": "contract"}}))
    monkeypatch.setenv("BEDROCK_BATCH_PRICES_FILE", str(path))
    get_settings.cache_clear()
    try:
        price = prices.price_for(f"global.{CLAUDE}")
    finally:
        get_settings.cache_clear()
    assert (price.batch_input, price.batch_output, price.source) == (1.0, 0.625, "contract")


def test_prices_file_with_unknown_field_is_refused(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({CLAUDE: {"batch_in": 1.0}}))
    with pytest.raises(RunSettingsError, match="unknown fields \\['batch_in'\\]"):
        prices.load_prices(str(path))


def test_answers_without_token_counts_cost_unknown_not_zero(tmp_path):
    # Cohere Embed and Mistral report no tokens: with a price set for them, their run was
    # reported as costing $0.0 (and the guard settled it at $0, freeing the ceiling).
    from tasks.pipeline.columns import JOB_ID
    from tasks.run.cost import actual_cost

    part = tmp_path / "part-00000.parquet"
    pl.DataFrame(
        {
            INPUT_TOKENS: pl.Series([None, None], dtype=pl.Int64),
            SERVED_BY: ["batch", "batch"],
            JOB_ID: ["j0", "j0"],
            ERROR_CODE: pl.Series([None, None], dtype=pl.String),
        }
    ).write_parquet(part)
    price = prices.ModelPrice("cohere.embed-english-v3", 0.1, None, 0.05, None)

    cost = actual_cost([str(part)], price)

    assert (cost["batch_usd"], cost["total_usd"], cost["batch_rows"]) == (None, None, 2)


def test_preprocess_dry_run_prints_cost_per_shard_and_total(tmp_path, capsys):
    code = cli_main(
        ["preprocess", "--source", str(SAMPLE), "--prompt-id", "joke_about_topic", "--out",
         str(tmp_path / "plan")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "Cost estimate for anthropic.claude-3-haiku-20240307-v1:0" in out
    assert "offline (dry run without --count-tokens)" in out
    assert "shard-00000" in out and "shard-00001" in out
    assert "total" in out and "$0.125 in / $0.625 out" in out


def test_count_tokens_matches_the_tokens_a_job_reports(stack, tmp_path):
    params = BatchParams(
        source=_topics(tmp_path, 120), prompt_id="joke_about_topic", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
    )  # fmt: skip
    plan = preprocess_params(params, tmp_path / "plan")
    line = (tmp_path / "plan" / plan.shards[0].input_file).read_text().splitlines()[0]
    body = json.loads(line)["modelInput"]
    runtime = stack.client("bedrock-runtime")
    counted = runtime.count_tokens(
        modelId=CLAUDE, input={"invokeModel": {"body": json.dumps(body)}}
    )
    invoked = json.loads(runtime.invoke_model(modelId=CLAUDE, body=json.dumps(body))["body"].read())
    assert counted["inputTokens"] == invoked["usage"]["input_tokens"]


def test_count_tokens_unsupported_model_is_a_validation_error(stack):
    runtime = stack.client("bedrock-runtime")
    with pytest.raises(runtime.exceptions.ValidationException) as err:
        runtime.count_tokens(
            modelId="amazon.nova-lite-v1:0",
            input={"converse": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}},
        )
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert "doesn't support counting tokens" in err.value.response["Error"]["Message"]


def test_estimate_matches_the_tokens_the_local_stack_reports(stack, tmp_path):
    params = BatchParams(
        source=str(SAMPLE), prompt_id="joke_about_topic", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name="cost-estimate", max_concurrent_jobs=2,
    )  # fmt: skip

    summary = batch_inference(params)

    run_dir = tmp_path / "out" / "cost-estimate"
    estimate = json.loads((run_dir / ESTIMATE_FILE).read_text())
    assert estimate["method"].startswith("CountTokens on ")
    actual = summary["tokens"]["input"]
    assert abs(estimate["totals"]["input_tokens"] - actual) <= ESTIMATE_TOLERANCE * actual
    cost = summary["cost"]
    assert cost["on_demand_rows"] == 0 and cost["batch_rows"] == 250
    expected = (actual * 0.125 + summary["tokens"]["output"] * 0.625) / 1e6
    assert cost["batch_usd"] == pytest.approx(expected)
    assert cost["total_usd"] <= estimate["totals"]["cost_high_usd"]
    assert all("batch_usd" in row and "on_demand_usd" in row for row in summary["jobs"])


def _tail_run(stack, tmp_path: Path, run_name: str) -> BatchParams:
    """300 rows in three jobs, 30% of whose records fail: their remainders go on demand."""
    stack.set_faults(record_error_rate=0.3, seed=5)
    return BatchParams(
        source=_topics(tmp_path, 300), prompt_id="joke_about_topic", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name=run_name, max_records_per_job=100,
        on_demand_rps=200,
    )  # fmt: skip


def _on_demand_paid(out: pl.DataFrame) -> float:
    """What a run's rows served on demand cost at the on-demand price, from their own tokens."""
    rows = out.filter(pl.col(SERVED_BY) == "on_demand")
    tokens_in, tokens_out = int(rows[INPUT_TOKENS].sum()), int(rows[OUTPUT_TOKENS].sum())
    return prices.price_for(CLAUDE).cost(tokens_in, tokens_out, "on_demand")


def test_on_demand_rows_are_priced_apart_at_the_on_demand_price(stack, tmp_path):
    # 30% of records fail in their batch job; the remainder (under the job minimum) goes on
    # demand at full price.
    params = _tail_run(stack, tmp_path, "cost-on-demand")

    summary = batch_inference(params)

    cost = summary["cost"]
    out = pl.read_parquet(summary["parts"])
    on_demand = out.filter(pl.col(SERVED_BY) == "on_demand")
    assert on_demand.height > 0 and cost["on_demand_rows"] == on_demand.height
    assert cost["on_demand_usd"] == pytest.approx(_on_demand_paid(out))
    assert cost["batch_rows"] + cost["on_demand_rows"] == 300


def _manifest_tokens(stack, name_contains: str) -> tuple[int, int]:
    """Input and output tokens the run's batch jobs report in their manifests (what was paid)."""
    s3 = stack.client("s3")
    tokens_in = tokens_out = 0
    for job in stack.ledger(name_contains=name_contains):
        bucket, prefix = job["outputUri"].removeprefix("s3://").split("/", 1)
        key = f"{prefix.rstrip('/')}/{job['jobId']}/manifest.json.out"
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        tokens_in += manifest["inputTokenCount"]
        tokens_out += manifest["outputTokenCount"]
    return tokens_in, tokens_out


def _repaired_run(stack, tmp_path, run_name: str) -> tuple[dict, pl.DataFrame]:
    """A graded run whose first jobs' answers break the schema 30% of the time: repaired."""
    stack.set_faults(schema_error_rate=0.3, schema_error_job_names_containing="-a1")
    source = graded_source(tmp_path, 200)
    params = BatchParams(
        source=str(source), prompt_id="grade_answer", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name=run_name, max_records_per_job=100,
        on_demand_rps=200,
    )  # fmt: skip
    summary = batch_inference(params)
    return summary, pl.read_parquet(summary["parts"])


def test_answers_a_repair_replaced_are_counted_in_the_cost(stack, tmp_path):
    # Answers that break the schema are paid for, then asked again: the part keeps only the
    # repaired answer, and the cost left the first one out (batch $0.00247 for two jobs whose
    # manifests said $0.00366).
    summary, out = _repaired_run(stack, tmp_path, "cost-repaired")
    assert out.filter(pl.col("attempts") > 1).height > 0  # some answers were repaired
    price = prices.price_for(CLAUDE)
    tokens_in, tokens_out = _manifest_tokens(stack, "cost-repaired")
    cost = summary["cost"]
    assert cost["batch_usd"] == pytest.approx(price.cost(tokens_in, tokens_out, "batch"))
    assert cost["on_demand_usd"] == pytest.approx(_on_demand_paid(out))
    assert cost["total_usd"] == pytest.approx(cost["batch_usd"] + cost["on_demand_usd"])


def test_tokens_of_answers_a_repair_replaced_are_counted_in_the_run_figures(stack, tmp_path):
    # The cost counted the answers a schema repair replaced, the tokens did not: the CLI line
    # and summary.json said 16,327/2,588 where the jobs' manifests and the on-demand repairs
    # came to 21,303/2,857, and each shard's job-table row left them out too.
    summary, out = _repaired_run(stack, tmp_path, "tokens-repaired")
    tail = out.filter(pl.col(SERVED_BY) == SERVED_ON_DEMAND)
    assert tail.height > 0 and tail["attempts"].min() > 1  # repairs of paid batch answers
    batch_in, batch_out = _manifest_tokens(stack, "tokens-repaired")
    paid = (batch_in + int(tail[INPUT_TOKENS].sum()), batch_out + int(tail[OUTPUT_TOKENS].sum()))
    assert (summary["tokens"]["input"], summary["tokens"]["output"]) == paid
    by_job = [(j["input_tokens"], j["output_tokens"]) for j in summary["jobs"]]
    assert (sum(i for i, _ in by_job), sum(o for _, o in by_job)) == paid


def test_a_repair_held_back_by_the_ceiling_keeps_the_answer_it_paid_for(stack, tmp_path):
    # The answers that broke the schema were paid for; their repair (on demand) would pass
    # max_cost_usd and was held back: the rows lost those answers (no text, no tokens,
    # served_by skipped) and the summary's tokens left them out.
    stack.set_faults(schema_error_rate=0.3, schema_error_job_names_containing="-a1")
    source = graded_source(tmp_path, 100)
    fields = dict(
        source=str(source), prompt_id="grade_answer", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name="repair-held", max_records_per_job=100,
    )  # fmt: skip
    plan = preprocess_params(BatchParams(**fields), tmp_path / "probe")
    high = estimate_from_dir(plan, tmp_path / "probe", stack.client("bedrock-runtime")).cost_high

    # One job's upper bound fits; that job's repair on top of it does not.
    summary = batch_inference(BatchParams(**fields, max_cost_usd=round(high * 1.01, 8)))

    out = pl.read_parquet(summary["parts"])
    held = out.filter(pl.col(ERROR_CODE) == COST_CEILING_REACHED)
    assert held.height == summary["cost"]["held_back_rows"] > 0
    assert held["response_text"].null_count() == 0
    assert held[INPUT_TOKENS].null_count() == held[OUTPUT_TOKENS].null_count() == 0
    assert held[SERVED_BY].unique().to_list() == ["batch"]
    assert held["job_id"].null_count() == 0 and held["attempts"].unique().to_list() == [1]
    assert held["correct"].null_count() == held.height
    messages = held["error_message"]
    assert messages.str.starts_with("Not sent: max_cost_usd=").all()
    assert messages.str.contains("failed validation (SchemaValidationError)", literal=True).all()
    assert messages.str.contains("does not fit output schema").all()
    # What the run reports is what its one job was paid for, counted once.
    assert [job["jobName"].rsplit("-", 1)[-1] for job in stack.ledger("repair-held")] == ["a1"]
    tokens_in, tokens_out = _manifest_tokens(stack, "repair-held")
    assert (summary["tokens"]["input"], summary["tokens"]["output"]) == (tokens_in, tokens_out)
    price = prices.price_for(CLAUDE)
    assert summary["cost"]["batch_usd"] == pytest.approx(price.cost(tokens_in, tokens_out, "batch"))
    assert summary["cost"]["on_demand_usd"] == 0


def test_job_table_prices_the_on_demand_tail_at_its_own_price(stack, tmp_path):
    # The live job table priced a merged shard's tokens all at the batch price: a shard whose
    # tail went on demand showed $0.0028 where the summary said $0.0040.
    from tasks.run.artifacts import ShardView, job_rows
    from tasks.run.cost import batch_cost_of
    from tasks.run.state import RunState

    params = _tail_run(stack, tmp_path, "cost-table")

    summary = batch_inference(params)

    run_dir = tmp_path / "out" / "cost-table"
    state = RunState.from_dict(json.loads((run_dir / "state.json").read_text()))
    views = [ShardView.of(name, 100, shard) for name, shard in sorted(state.shards.items())]
    rows = job_rows(views, 3, cost_of=batch_cost_of(CLAUDE))
    parts = summary["cost"]["parts"]
    expected = [p["batch_usd"] + p["on_demand_usd"] for _, p in sorted(parts.items())]
    assert summary["cost"]["on_demand_rows"] > 0
    shown = [float(r["cost so far (USD)"]) for r in rows]
    assert shown[:-1] == pytest.approx(expected, abs=5e-5)  # each row to 4 decimals
    assert shown[-1] == pytest.approx(summary["cost"]["total_usd"], abs=5e-5)


def test_a_run_under_the_job_minimum_is_served_on_demand_at_its_price(stack, tmp_path):
    # 40 records, under the minimum of 100 a batch job takes: one shard, answered through
    # bedrock-runtime, estimated and reported at the on-demand price, no batch job created.
    source = tmp_path / "questions.csv"
    pl.DataFrame({"source": [f"Q{i:04d} what is {i} + 1?" for i in range(40)]}).write_csv(source)
    params = BatchParams(
        source=str(source), prompt_id="question_answering", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name="small-run", on_demand_rps=200,
        max_cost_usd=1.0,
    )  # fmt: skip

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert_answers_match_rows(out, 40)
    assert out[SERVED_BY].unique().to_list() == ["on_demand"]
    assert stack.ledger(name_contains="small-run") == []
    price = prices.price_for(CLAUDE)
    paid = _on_demand_paid(out)  # every row was served on demand (above)
    cost = summary["cost"]
    assert (cost["batch_rows"], cost["on_demand_rows"]) == (0, 40)
    assert cost["on_demand_usd"] == pytest.approx(paid) and cost["batch_usd"] == 0
    estimate = json.loads((tmp_path / "out" / "small-run" / ESTIMATE_FILE).read_text())
    assert [s["on_demand"] for s in estimate["shards"]] == [True]
    assert paid <= estimate["totals"]["cost_high_usd"]
    # At the batch price the upper bound would be half of it, under what the run paid.
    assert estimate["totals"]["cost_high_usd"] == pytest.approx(
        price.cost(estimate["totals"]["input_tokens"], estimate["totals"]["output_max"],
                   "on_demand")
    )  # fmt: skip


def test_run_over_the_ceiling_is_refused_before_any_job(stack, tmp_path):
    params = BatchParams(
        source=_topics(tmp_path, 150), prompt_id="joke_about_topic", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name="cost-refused", max_cost_usd=0.0001,
    )  # fmt: skip

    with pytest.raises(CostCeilingError) as err:
        batch_inference(params)

    assert "over max_cost_usd=0.0001; nothing was submitted" in str(err.value)
    assert "Raise max_cost_usd to at least" in str(err.value)
    assert stack.ledger(name_contains="cost-refused") == []


def test_refused_run_names_a_ceiling_that_lets_it_run(stack, tmp_path):
    # The refusal rounded the upper bound to 4 decimals, down as often as up: $0.0195375
    # became "at least 0.0195", a ceiling the same run was refused again under.
    fields = dict(
        source=_topics(tmp_path, 150), prompt_id="joke_about_topic", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), inference=InferenceOverrides(max_tokens=199),
    )  # fmt: skip
    with pytest.raises(CostCeilingError) as err:
        batch_inference(BatchParams(**fields, run_name="cost-low", max_cost_usd=0.0001))
    suggested = float(str(err.value).split("Raise max_cost_usd to at least ")[1].split(",")[0])
    estimate = json.loads((tmp_path / "out" / "cost-low" / ESTIMATE_FILE).read_text())
    assert suggested >= estimate["totals"]["cost_high_usd"]

    summary = batch_inference(BatchParams(**fields, run_name="cost-raised", max_cost_usd=suggested))

    assert summary["cost"]["batch_rows"] == 150


def test_tiny_costs_are_shown_with_their_digits():
    # One Nova Micro record costs about $0.0000018: 4 decimals showed "$0.0000", as if free.
    cost = {
        "batch_usd": 0.0000018, "on_demand_usd": 0.0, "total_usd": 0.0000018,
        "batch_rows": 1, "on_demand_rows": 0, "held_back_rows": 0,
    }  # fmt: skip
    assert cost_markdown(cost) == (
        "- Cost: $0.0000018 batch (1 rows) + $0.0000 on demand at the full price (0 rows) "
        "= $0.0000018"
    )


def test_cost_line_row_counts_have_thousands_separators():
    # Every other count of the summary has them; "(2909 rows)" stood out in the artifact.
    cost = {
        "batch_usd": 0.0663875, "on_demand_usd": 0.0054612, "total_usd": 0.0718487,
        "batch_rows": 2909, "on_demand_rows": 91, "held_back_rows": 1200,
        "held_back_shards": ["shard-00001"], "max_cost_usd": 0.07,
    }  # fmt: skip

    line = cost_markdown(cost)

    assert "(2,909 rows)" in line and "(91 rows)" in line
    assert "held back 1,200 rows of 1 shards" in line


def test_run_stops_at_the_ceiling_and_reports_what_was_held_back(stack, tmp_path):
    # Retries (30% of records fail and go on demand, at twice the batch price) push the run
    # past an estimate that only covers one try per record.
    stack.set_faults(record_error_rate=0.3, seed=5)
    fields = dict(
        source=_topics(tmp_path, 300), prompt_id="joke_about_topic", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name="cost-ceiling", max_records_per_job=100,
        max_concurrent_jobs=1, on_demand_rps=200, inference=InferenceOverrides(max_tokens=20),
    )  # fmt: skip
    plan = preprocess_params(BatchParams(**fields), tmp_path / "probe")
    high = estimate_from_dir(plan, tmp_path / "probe", stack.client("bedrock-runtime")).cost_high
    ceiling = round(high * 1.01, 8)

    summary = batch_inference(BatchParams(**fields, max_cost_usd=ceiling))

    cost = summary["cost"]
    out = pl.read_parquet(summary["parts"])
    held = out.filter(pl.col(ERROR_CODE) == COST_CEILING_REACHED)
    assert out.height == 300  # every row once (finish_run checked it too)
    assert cost["held_back_rows"] == held.height > 0
    assert cost["held_back_shards"]
    assert held[SERVED_BY].unique().to_list() == ["skipped"]
    assert held[INPUT_TOKENS].null_count() == held.height
    # Which tails are served and which held depends on which shard finishes first; either
    # way the on-demand rows are priced apart and the total stays under the ceiling.
    on_demand = out.filter(pl.col(SERVED_BY) == "on_demand")
    assert cost["on_demand_rows"] == on_demand.height
    assert (cost["on_demand_usd"] > 0) == (on_demand.height > 0)
    assert cost["total_usd"] <= ceiling
    assert sum(row["held_back"] for row in summary["jobs"]) == held.height
    # What was held back was never sent: no job and no on-demand answer for those rows.
    assert len(stack.ledger(name_contains="cost-ceiling")) <= 3


class _PerRecord:
    """An estimate whose every shard costs at most ``usd`` a record (at the batch price)."""

    on_demand = False

    def __init__(self, usd: float) -> None:
        self.usd = usd

    def shard(self, name: str):
        return self

    def per_record_high(self) -> float:
        return self.usd


def test_a_resumed_run_counts_what_it_spent_before_the_crash(tmp_path):
    # A fresh guard took a resumed run for one that had spent nothing: its retries were
    # admitted past max_cost_usd. Shard 0 merged, shard 1's job ran when the run crashed.
    from tasks.pipeline.columns import JOB_ID, OUTPUT_TOKENS
    from tasks.run.cost import CostGuard, actual_cost, run_price
    from tasks.run.state import JobAttempt, RunState, ShardState

    price = run_price(CLAUDE)
    part = tmp_path / "part-00000.parquet"
    pl.DataFrame(
        {INPUT_TOKENS: [400_000], OUTPUT_TOKENS: [100_000], SERVED_BY: ["batch"], JOB_ID: ["j0"]}
    ).write_parquet(part)
    merged = actual_cost([str(part)], price)["total_usd"]
    assert merged > 0

    def attempt(n: int, **fields) -> JobAttempt:
        return JobAttempt(1, f"run-shard-{n}-a1", f"t{n}", records=100, **fields)

    state = RunState(
        "run",
        shards={
            "s0": ShardState("s0", [attempt(0, job_arn="a0", status="Completed")], str(part)),
            "s1": ShardState("s1", [attempt(1, job_arn="a1", status="InProgress")]),
            "s2": ShardState("s2", [attempt(2)]),
        },
    )
    estimate = _PerRecord(0.001)  # 100 records: at most $0.10 a job
    ceiling = merged + 0.15  # room for shard 1's job, not for shard 2's as well

    resumed = CostGuard(ceiling, estimate, price)
    resumed.resume(state)
    assert resumed.spent == pytest.approx(merged)
    assert not resumed.admit("s2", 100, on_demand=False)
    assert resumed.held == {"s2": 100}
    fresh = CostGuard(ceiling, estimate, price)
    assert fresh.admit("s2", 100, on_demand=False)  # what the run did before


def test_a_resumed_run_counts_the_tail_and_the_job_a_crash_may_have_left_paid(tmp_path):
    # An on-demand tail under way and a job created just before the crash (its slot held, its
    # ARN not saved) were reserved by nobody after a resume: other shards' attempts were
    # admitted past max_cost_usd beside them. Reserved now, once, and decided again by their
    # own admit if they had not started.
    from tasks.run.cost import CostGuard, run_price
    from tasks.run.state import JobAttempt, RunState, ShardState

    def attempt(n: int, number: int = 1, records: int = 100, **fields) -> JobAttempt:
        return JobAttempt(number, f"run-shard-{n}-a{number}", f"t{n}", records=records, **fields)

    state = RunState(
        "run",
        shards={
            "s1": ShardState("s1", [attempt(1, job_arn="a1", status="InProgress")]),
            "s2": ShardState("s2", [attempt(2)]),
            "s3": ShardState(
                "s3",
                [
                    attempt(3, job_arn="a3", status="Completed"),
                    attempt(3, 2, records=10, served_by=SERVED_ON_DEMAND),
                ],
            ),
            "s4": ShardState("s4", [attempt(4, lease_id="l4")]),
        },
    )
    # $0.001 a record at the batch price, $0.002 on demand: s1 0.10 + s3's job 0.10 and its
    # tail 0.02 + s4 0.10 may be paid; s2's 0.10 passes a ceiling of 0.35.
    guard = CostGuard(0.35, _PerRecord(0.001), run_price(CLAUDE))
    guard.resume(state)
    assert not guard.admit("s2", 100, on_demand=False, attempt=1)
    # s4's job had not been created after all: its own admit takes its place, not a second one.
    assert guard.admit("s4", 100, on_demand=False, attempt=1)
    assert guard.admit("s5", 20, on_demand=False)  # 0.32 + 0.02 is within the ceiling
    assert not guard.admit("s6", 20, on_demand=False)
    guard.settle("s3", 0.05)
    assert guard.spent == pytest.approx(0.05)
    assert guard.admit("s6", 60, on_demand=False)  # s3's 0.12 reserved became 0.05 spent


def test_held_attempts_sent_again_keep_their_share_from_other_shards_retries():
    # A re-run under the figure its run named (what it cost plus the held attempts' bounds)
    # reserved a held attempt only when its shard's task started: with more held shards than
    # task threads, the retry of a held attempt sent first took the share of one not started,
    # which was held again under the figure that was to send it.
    from tasks.run.cost import CostGuard, run_price
    from tasks.run.state import JobAttempt, RunState, ShardState

    def forgotten(n: int) -> ShardState:
        attempts = [
            JobAttempt(1, f"run-shard-{n}-a1", f"t{n}", records=100, job_arn=f"a{n}"),
            JobAttempt(2, f"run-shard-{n}-a2", f"u{n}", records=100),
        ]
        attempts[0].status, attempts[1].status = "Failed", COST_CEILING_REACHED
        return ShardState(f"s{n}", attempts, paid_usd=0.0, paid_attempts=1)

    state = RunState("run", shards={"s1": forgotten(1), "s2": forgotten(2)})
    guard = CostGuard(0.20, _PerRecord(0.001), run_price(CLAUDE))  # both held jobs, $0.10 each
    guard.resume(state)
    assert guard.admit("s1", 100, on_demand=False, attempt=2)
    assert not guard.admit("s1", 10, on_demand=False, attempt=3)  # s2's share is not free
    assert guard.admit("s2", 100, on_demand=False, attempt=2)


def _held_retry(stack, tmp_path: Path, run_name: str) -> tuple[dict, Any, float]:
    """A finished run of three shards whose shard 1 retry (its first job failed, all 100
    records again) was held back by max_cost_usd; its fields, plan and estimated upper bound."""
    stack.set_faults(fail_job_names_containing=f"{run_name}-shard-00001-a1")
    source = tmp_path / "q.csv"
    pl.DataFrame({"source": [f"Q{i:04d} what is {i} + 1?" for i in range(300)]}).write_csv(source)
    fields = dict(
        source=str(source), prompt_id="question_answering", model_id=CLAUDE,
        output_uri=str(tmp_path / "out"), run_name=run_name, max_records_per_job=100,
        max_concurrent_jobs=1, inference=InferenceOverrides(max_tokens=20),
    )  # fmt: skip
    plan = preprocess_params(BatchParams(**fields), tmp_path / "probe")
    high = estimate_from_dir(plan, tmp_path / "probe", stack.client("bedrock-runtime")).cost_high
    summary = batch_inference(BatchParams(**fields, max_cost_usd=round(high * 1.01, 8)))
    assert summary["cost"]["held_back_shards"] == ["shard-00001"]
    return fields, plan, high


def _job_names(stack, run_name: str) -> list[str]:
    return sorted(j["jobName"].split(f"{run_name}-", 1)[1] for j in stack.ledger(run_name))


def test_a_finished_run_rerun_with_a_higher_ceiling_sends_only_what_it_held_back(stack, tmp_path):
    # The re-run returned the old summary with the held rows: the one way left to finish them,
    # restart, paid for every answered record again.
    fields, _, high = _held_retry(stack, tmp_path, "held-raised")
    first = ["shard-00000-a1", "shard-00001-a1", "shard-00002-a1"]
    same = batch_inference(BatchParams(**fields, max_cost_usd=round(high * 1.01, 8)))
    assert same["cost"]["held_back_rows"] == 100 and _job_names(stack, "held-raised") == first
    # The run's report names the ceiling that sends them, and that ceiling does.
    said = re.search(
        r"the same run with max_cost_usd=([0-9.]+) sends them", cost_markdown(same["cost"])
    )
    assert said and float(said[1]) > round(high * 1.01, 8)

    summary = batch_inference(BatchParams(**fields, max_cost_usd=float(said[1])))

    assert summary["counts"]["succeeded"] == 300 and summary["cost"]["held_back_rows"] == 0
    assert summary["cost"]["total_usd"] <= float(said[1])
    assert _job_names(stack, "held-raised") == sorted([*first, "shard-00001-a2"])
    again = batch_inference(BatchParams(**fields, max_cost_usd=float(said[1])))
    assert again == summary and len(stack.ledger("held-raised")) == 4


def test_a_lost_part_does_not_keep_a_higher_ceiling_from_sending_what_was_held(stack, tmp_path):
    # Another shard's part deleted: merging it again forgot the run's end, and the re-run no
    # longer saw a finished run to send the held rows of, so the figure it named held them again.
    from tasks.run.layout import layout_for

    fields, _, high = _held_retry(stack, tmp_path, "lost-beside-held")
    first = batch_inference(BatchParams(**fields, max_cost_usd=round(high * 1.01, 8)))
    said = re.search(r"max_cost_usd=([0-9.]+) sends them", cost_markdown(first["cost"]))
    assert said
    Path(layout_for(fields["output_uri"], "lost-beside-held").part_uri(0)).unlink()

    summary = batch_inference(BatchParams(**fields, max_cost_usd=float(said[1])))

    assert summary["cost"]["held_back_rows"] == 0 and summary["counts"]["succeeded"] == 300
    assert summary["cost"]["total_usd"] <= float(said[1])
    assert _job_names(stack, "lost-beside-held") == [
        "shard-00000-a1", "shard-00001-a1", "shard-00001-a2", "shard-00002-a1"
    ]  # fmt: skip
    assert pl.read_parquet(summary["parts"]).height == 300


class _Killed(Exception):
    """Stands for the SIGKILL of a failpoint, in process: nothing after it is written."""


def test_a_held_retry_admitted_then_killed_is_counted_by_the_resumed_guard(
    stack, tmp_path, monkeypatch
):
    # A retry held back kept its CostCeilingReached status after a later run admitted it: killed
    # between its job's create and the ARN's save, the next run's guard skipped it as held
    # and admitted other jobs as if that paid job cost nothing.
    from tasks.run import shard as shard_module
    from tasks.run.cost import cost_guard, load_estimate
    from tasks.run.layout import layout_for
    from tasks.run.state import RunStateStore

    fields, plan, high = _held_retry(stack, tmp_path, "held-then-run")
    layout = layout_for(fields["output_uri"], "held-then-run")
    Path(layout.part_uri(1)).unlink()  # merged again by the next run, which raises the ceiling
    failpoint = shard_module.failpoint

    def killed(point: str) -> None:
        if point == "after-create":
            raise _Killed(point)
        failpoint(point)

    monkeypatch.setattr(shard_module, "failpoint", killed)
    raised = BatchParams(**fields, max_cost_usd=round(high * 10, 8))
    with pytest.raises(_Killed):
        batch_inference(raised)

    state = RunStateStore(layout.run_dir, "held-then-run").state
    retry = state.shards["shard-00001"].attempts[-1]
    assert (retry.attempt, retry.job_arn, retry.status) == (2, None, None)
    guard = cost_guard(raised, load_estimate(plan, layout), state)
    one_job = guard.upper_bound("shard-00001", 100, on_demand=False)
    # The retry that may run, reserved until the shard merges; its failed first job at what
    # the forgotten merge priced it ($0: it answered nothing), not at a job's upper bound.
    assert guard._reserved["shard-00001"] == pytest.approx(one_job)

    monkeypatch.setattr(shard_module, "failpoint", failpoint)
    summary = batch_inference(raised)  # adopts the job it created, pays for it once
    assert summary["counts"]["succeeded"] == 300
    names = [j["jobName"].rsplit("-", 2)[-2:] for j in stack.ledger("held-then-run")]
    assert sorted(names) == [["00000", "a1"], ["00001", "a1"], ["00001", "a2"], ["00002", "a1"]]
