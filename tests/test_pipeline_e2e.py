"""Pipelines on the local stack: filter across shards, repair of invalid answers, crash + resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from helpers import assert_each_answer_quotes_its_prompt, prompts_of
from prefect.settings import PREFECT_API_URL

from data.make_samples import simplecot
from flows.pipeline import PipelineParams, batch_pipeline
from flows.pipeline_cli import show_summary
from pipelines import NOVA_LITE, Stage
from tasks.errors import CostCeilingError, RunIdentityError
from tasks.pipeline.stages import KILL_STAGE_ENV
from tasks.run.failpoints import ENV
from tasks.run.owner import EXPIRY_ENV
from tasks.run.params import InferenceOverrides

pytestmark = pytest.mark.slow

ROWS = 300
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
# Stage 2 keeps the rows whose question number does not end in 7: 270 of 300, two shards.
FILTER = "error_code IS NULL AND source NOT LIKE 'Q%7:%'"
KEPT = ROWS - ROWS // 10


def _stages() -> list[Stage]:
    return [
        Stage(name="answer", prompt_id="answer_with_rationale", model_id=NOVA_LITE),
        Stage(
            name="grade",
            prompt_id="grade_answer",
            model_id=CLAUDE,
            filter=FILTER,
            carry=["source", "target", "response_text"],
        ),
    ]


def _source(tmp_path: Path) -> Path:
    path = tmp_path / "simplecot.jsonl"
    simplecot(ROWS).write_ndjson(path)
    return path


def _assert_each_answer_is_its_rows(joined: pl.DataFrame) -> None:
    """Every row once, and each stage's answer on it the answer to the prompt its values make.

    Stage 2's prompt holds stage 1's answer, so a stage-1 answer on the wrong row, or a
    grade joined to another row, fails here.
    """
    assert joined["pipeline_row_id"].n_unique() == joined.height == ROWS
    answered = joined.filter(pl.col("answer_error_code").is_null())
    assert answered.height > 0
    prompts = prompts_of(answered, "answer_with_rationale")
    assert_each_answer_quotes_its_prompt(answered["answer_response_text"], prompts)
    graded = joined.filter(pl.col("grade_skipped").is_null() & pl.col("grade_error_code").is_null())
    assert graded.height > 0
    prompts = prompts_of(graded, "grade_answer")
    assert_each_answer_quotes_its_prompt(graded["grade_reason"], prompts, before=" re: ", after="")


def test_pipeline_filters_across_shards_and_repairs_invalid_answers(stack, tmp_path):
    # A fifth of the first grading jobs' answers break the schema; retry jobs answer cleanly.
    stack.set_faults(schema_error_rate=0.2, schema_error_job_names_containing="-a1")
    params = PipelineParams(
        source=str(_source(tmp_path)),
        output_uri=str(tmp_path / "out"),
        run_name="pipe-repair",
        stages=_stages(),
        max_records_per_job=150,
        max_concurrent_jobs=3,
    )
    summary = batch_pipeline(params)

    out = pl.read_parquet(tmp_path / "out" / "pipe-repair" / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(out)
    grade = summary["stages"][1]
    assert grade["rows_kept"] == KEPT == grade["counts"]["records"]
    grade_input = pl.read_parquet(
        tmp_path / "out" / "pipe-repair" / "stages" / "grade" / "input.parquet"
    )
    assert grade_input.height == KEPT
    graded = out.filter(pl.col("grade_skipped").is_null())
    assert graded.height == KEPT
    assert graded["grade_correct"].dtype == pl.Boolean
    assert graded["grade_error_code"].null_count() == KEPT  # every invalid answer repaired
    assert grade["schema_repaired"] > 0
    assert grade["schema_repaired"] == graded["grade_attempts"].gt(1).sum()
    skipped = out.filter(pl.col("grade_skipped").is_not_null())
    assert skipped.height == ROWS - KEPT
    assert skipped["grade_correct"].null_count() == ROWS - KEPT
    assert "filtered out before stage grade" in skipped["grade_skipped"][0]
    correct = int(graded["grade_correct"].sum())
    assert summary["accuracy"]["correct"] == correct
    assert summary["accuracy"]["graded"] == KEPT
    # Stage 1 ran over two shards of the source; stage 2 read both of its parts.
    assert len(stack.ledger(name_contains="pipe-repair--answer")) == 2

    again = batch_pipeline(params)
    assert again == summary  # a finished pipeline reports itself

    grade_all = _stages()[1].model_copy(update={"filter": "true"})
    changed = params.model_copy(update={"stages": [_stages()[0], grade_all]})
    with pytest.raises(RunIdentityError, match="changed: grade"):
        batch_pipeline(changed)


def _run(
    source: Path, out: Path, kill_at: str | None, *extra: str, run_name: str = "pipe-kill"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), EXPIRY_ENV: "3"}
    env.pop(ENV, None)
    if kill_at:  # armed only while stage 2 (grade) runs
        env[ENV], env[KILL_STAGE_ENV] = kill_at, "grade"
    command = [
        sys.executable, "-m", "flows.cli", "pipeline", "run",
        "--pipeline-id", "answer_and_grade", "--source", str(source),
        "--output-uri", str(out), "--run-name", run_name,
        "--max-concurrent-jobs", "3", "--max-records-per-job", "100", *extra,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


def _params(source: Path, out: Path, run_name: str, **fields) -> PipelineParams:
    """The named pipeline's parameters as `_run` runs it from the command line."""
    return PipelineParams(
        pipeline_id="answer_and_grade",
        source=str(source),
        output_uri=str(out),
        run_name=run_name,
        max_concurrent_jobs=3,
        max_records_per_job=100,
        **fields,
    )


def test_pipeline_rerun_after_sigkill_in_stage_two_pays_no_job_twice(stack, tmp_path):
    stack.configure(records_per_second=200)
    source, out = _source(tmp_path), tmp_path / "out2"
    # Stage 1 finishes; stage 2's process dies while its first job is seen running, under a
    # ceiling for the whole pipeline.
    crashed = _run(source, out, "polling", "--max-cost-usd", "0.1")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    # A re-run under a ceiling too low for stage 2 is refused; the jobs stage 2 sent before the
    # crash are kept (the refusal said "nothing of stage grade was submitted").
    low = _params(source, out, "pipe-kill", max_cost_usd=0.03)
    sent = r"nothing more of stage grade was submitted \(the [123] jobs it sent before"
    with pytest.raises(CostCeilingError, match=sent) as refused:
        batch_pipeline(low)
    needed = re.search(r"at least ([0-9.]+),", str(refused.value))[1]

    finished = _run(source, out, None, "--max-cost-usd", needed)

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "accuracy (grade_correct)" in finished.stdout
    pipeline = out / "pipe-kill"
    joined = pl.read_parquet(pipeline / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(joined)
    jobs = [j["jobName"].split("-", 1)[1] for j in stack.ledger(name_contains="pipe-kill--")]
    assert len(jobs) == len(set(jobs))  # one job per shard attempt, never two
    assert sorted(j for j in jobs if "grade" in j) == [
        f"pipe-kill--grade-shard-0000{i}-a1" for i in range(3)
    ]
    # Stage 2 resumed under what stage 1 left; what it had sent is counted by its own run.
    summary = json.loads((pipeline / "summary.json").read_text())
    grade_run = json.loads((pipeline / "stages/grade/pipe-kill--grade/summary.json").read_text())
    answer_cost = summary["stages"][0]["cost_usd"]
    assert grade_run["cost"]["max_cost_usd"] == pytest.approx(float(needed) - answer_cost)
    assert grade_run["cost"]["held_back_rows"] == 0
    assert summary["cost_usd"] <= float(needed)


def test_a_plain_rerun_after_a_restart_crashed_finishes_the_restart(stack, tmp_path):
    # The restart left the old summary and joined output in place: the plain re-run after its
    # crash reported the old pipeline as finished, and the restarted grade jobs in flight were
    # never merged (paid, their answers nowhere).
    stack.configure(records_per_second=200)
    source, out = _source(tmp_path), tmp_path / "out3"
    params = _params(source, out, "pipe-restart")
    batch_pipeline(params)
    first_grade = {
        j["jobArn"].rsplit("/", 1)[-1] for j in stack.ledger(name_contains="pipe-restart--grade")
    }
    crashed = _run(source, out, "polling", "--restart", run_name="pipe-restart")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]

    batch_pipeline(params)

    pipeline = out / "pipe-restart"
    joined = pl.read_parquet(pipeline / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(joined)
    # The joined output carries the restarted run's answers, not the first run's.
    grade = pl.read_parquet(pipeline / "stages" / "grade" / "pipe-restart--grade" / "output")
    restarted_jobs = set(grade["job_id"].drop_nulls())
    assert restarted_jobs and set(joined["grade_job_id"].drop_nulls()) == restarted_jobs
    assert len(first_grade) == 3 and not restarted_jobs & first_grade
    aside = [p.name for p in out.iterdir() if p.name.startswith("pipe-restart.replaced-")]
    assert len(aside) == 1 and (out / aside[0] / "summary.json").exists()
    jobs = [j["jobName"] for j in stack.ledger(name_contains="pipe-restart--")]
    assert len(jobs) == len(set(jobs))  # no job created twice


def test_restart_from_a_changed_stage_keeps_the_answers_before_it(stack, tmp_path):
    params = PipelineParams(
        source=str(_source(tmp_path)),
        output_uri=str(tmp_path / "out"),
        run_name="pipe-from",
        stages=_stages(),
        max_records_per_job=150,
        max_concurrent_jobs=3,
    )
    first = batch_pipeline(params)
    before = pl.read_parquet(tmp_path / "out" / "pipe-from" / "output" / "*.parquet")
    answer_jobs = stack.ledger(name_contains="pipe-from--answer")

    # Grade every answered row now: a plain re-run is refused and names the way out.
    grade_all = _stages()[1].model_copy(update={"filter": "error_code IS NULL"})
    changed = params.model_copy(update={"stages": [_stages()[0], grade_all]})
    with pytest.raises(RunIdentityError, match="restart_from='grade'"):
        batch_pipeline(changed)
    # Keeping a stage that changed is refused too, before anything is spent.
    answer_v2 = _stages()[0].model_copy(update={"max_records_per_job": 100})
    with pytest.raises(RunIdentityError, match="changed: answer.*Restart from 'answer'"):
        batch_pipeline(
            params.model_copy(update={"stages": [answer_v2, grade_all], "restart_from": "grade"})
        )

    summary = batch_pipeline(changed.model_copy(update={"restart_from": "grade"}))

    after = pl.read_parquet(tmp_path / "out" / "pipe-from" / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(after)
    assert stack.ledger(name_contains="pipe-from--answer") == answer_jobs  # not paid again
    answers = ["pipeline_row_id", "answer_response_text", "answer_job_id"]
    assert after.select(answers).equals(before.select(answers))
    graded = after.filter(pl.col("grade_skipped").is_null())
    assert graded.height == ROWS == summary["stages"][1]["counts"]["records"]
    assert first["stages"][1]["counts"]["records"] == KEPT
    assert set(graded["grade_job_id"]).isdisjoint(set(before["grade_job_id"].drop_nulls()))
    assert batch_pipeline(changed) == summary  # finished: the new definition stands


def test_small_stage_is_served_on_demand_and_an_empty_one_is_not_run(stack, tmp_path):
    # Stage 2 keeps 30 rows, fewer than a batch job takes: served on demand, not refused.
    # Stage 3 keeps none: not run, and every row says why.
    small = "error_code IS NULL AND source LIKE 'Q%7:%'"
    regrade = _stages()[1].model_copy(
        update={
            "name": "regrade",
            "filter": "false",
            "carry": ["source", "target", "answer_response_text"],
        }
    )
    # Under a ceiling stage 1 passes (short answers: its upper bound is small) and stage 2 may
    # cost more than is left at the on-demand price, not at the batch one: the refusal says so.
    answer = _stages()[0].model_copy(update={"inference": InferenceOverrides(max_tokens=100)})
    params = PipelineParams(
        source=str(_source(tmp_path)),
        output_uri=str(tmp_path / "out"),
        run_name="pipe-small",
        stages=[answer, _stages()[1].model_copy(update={"filter": small}), regrade],
        max_records_per_job=150,
        max_concurrent_jobs=3,
        max_cost_usd=0.01,
    )
    on_demand = r"Stage grade may cost up to \$[0-9.]+ at the on-demand price \(fewer rows"
    with pytest.raises(CostCeilingError, match=on_demand) as refused:
        batch_pipeline(params)
    needed = float(re.search(r"at least ([0-9.]+) for stage grade \(", str(refused.value))[1])

    summary = batch_pipeline(params.model_copy(update={"max_cost_usd": needed}))

    out = pl.read_parquet(tmp_path / "out" / "pipe-small" / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(out)
    sevens = out["source"].str.contains(r"^Q\d*7:")
    graded = out.filter(sevens)
    assert graded.height == ROWS // 10 == summary["stages"][1]["counts"]["records"]
    assert graded["grade_error_code"].null_count() == graded.height
    assert graded["grade_served_by"].unique().to_list() == ["on_demand"]
    assert out.filter(~sevens)["grade_skipped"].str.starts_with("filtered out before").all()
    assert stack.ledger(name_contains="pipe-small--grade") == []
    assert len(stack.ledger(name_contains="pipe-small--answer")) == 2
    regraded = summary["stages"][2]
    assert regraded["not_run"] and regraded["counts"]["records"] == 0
    assert regraded["cost_usd"] == 0.0 and 0 < summary["cost_usd"] <= needed
    assert out["regrade_skipped"].to_list() == ["filtered out before stage regrade (false)"] * ROWS
    assert stack.ledger(name_contains="pipe-small--regrade") == []


def test_stages_after_an_emptied_one_say_which_filter_emptied_them(stack, tmp_path, capsys):
    # Stage grade keeps no row; stage regrade after it (with a filter of its own) is not run
    # either. Its rows said "filtered out before stage regrade (...)", a filter that never
    # ran, and `pipeline run` died on a KeyError printing its report (no rows_in).
    regrade = _stages()[1].model_copy(
        update={"name": "regrade", "carry": ["source", "target", "answer_response_text"]}
    )
    params = PipelineParams(
        source=str(_source(tmp_path)),
        output_uri=str(tmp_path / "out"),
        run_name="pipe-empty",
        stages=[_stages()[0], _stages()[1].model_copy(update={"filter": "false"}), regrade],
        max_records_per_job=150,
        max_concurrent_jobs=3,
    )

    summary = batch_pipeline(params)
    show_summary(summary)

    out = pl.read_parquet(tmp_path / "out" / "pipe-empty" / "output" / "*.parquet")
    assert out["grade_skipped"].to_list() == ["filtered out before stage grade (false)"] * ROWS
    why = "stage regrade not run: the filter of stage grade kept no row"
    assert out["regrade_skipped"].to_list() == [why] * ROWS
    grade, after = summary["stages"][1:]
    assert (grade["rows_in"], grade["rows_kept"], grade["emptied_by"]) == (ROWS, 0, "grade")
    assert (after["rows_in"], after["rows_kept"], after["emptied_by"]) == (0, 0, "grade")
    assert after["not_run"] and after["cost_usd"] == 0.0
    printed = capsys.readouterr().out
    assert f"records 0 ok 0 failed 0 ({why})" in printed
    assert "records 0 ok 0 failed 0 (stage grade not run: its filter kept no row)" in printed

    # Resumed once finished: the recorded summary, printed the same.
    assert batch_pipeline(params) == summary
    show_summary(summary)
    assert capsys.readouterr().out == printed
    assert stack.ledger(name_contains="pipe-empty--grade") == []
    assert stack.ledger(name_contains="pipe-empty--regrade") == []


def test_a_ceiling_stops_before_the_stage_it_cannot_pay_and_a_higher_one_goes_on(stack, tmp_path):
    # The answers cost a few tenths of a cent; grading them may cost up to ~6 cents. Under a
    # 3-cent ceiling for the pipeline, stage 1 runs and stage 2 is refused before its first
    # job, with the ceiling the whole pipeline needs; the same pipeline with it goes on.
    source, out = _source(tmp_path), tmp_path / "out"
    refused = _run(source, out, None, "--max-cost-usd", "0.03", run_name="pipe-ceiling")

    assert refused.returncode == 2, refused.stderr[-3000:]
    said = refused.stderr.strip().splitlines()[-1]
    assert said.startswith("error: Stage grade may cost up to $"), said
    assert "the pipeline's max_cost_usd=0.03 leaves after the stages before it (answer $" in said
    # The stage's own refusal, logged by Prefect above it (and shown on the stage's flow run
    # in the UI), named the stage's figure as the one to raise the ceiling to: a user who
    # took it was refused again. The figure to set is the pipeline's alone.
    stage_said = "over the $0.0280 that pipeline pipe-ceiling's max_cost_usd=0.03 leaves for stage"
    assert stage_said in refused.stderr and said.startswith("error: ")
    figures = set(re.findall(r"Raise max_cost_usd to at least ([0-9.]+)", refused.stderr))
    assert figures == {re.search(r"at least ([0-9.]+),", said)[1]}
    answered = stack.ledger(name_contains="pipe-ceiling--answer")
    assert len(answered) == 3
    assert stack.ledger(name_contains="pipe-ceiling--grade") == []
    needed = float(re.search(r"at least ([0-9.]+),", said)[1])
    assert needed > 0.03
    # Under what stage 1 cost, nothing is left for stage 2: the refusal still names the figure.
    spent = _params(source, out, "pipe-ceiling", max_cost_usd=0.001)
    with pytest.raises(CostCeilingError, match=rf"more than the \$0.0000 .*at least {needed},"):
        batch_pipeline(spent)
    assert stack.ledger(name_contains="pipe-ceiling--grade") == []

    params = _params(source, out, "pipe-ceiling", max_cost_usd=needed)
    summary = batch_pipeline(params)

    joined = pl.read_parquet(out / "pipe-ceiling" / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(joined)
    assert summary["max_cost_usd"] == needed
    assert 0 < summary["cost_usd"] <= needed
    assert summary["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in summary["stages"]))
    # Stage 1 was not paid again; stage 2 ran once over its rows.
    assert stack.ledger(name_contains="pipe-ceiling--answer") == answered
    graded = stack.ledger(name_contains="pipe-ceiling--grade")
    assert graded and all(job["jobName"].endswith("-a1") for job in graded)
    answer, grade = summary["stages"]
    assert grade["counts"]["records"] == grade["rows_kept"] == answer["counts"]["succeeded"]
    # Killed before its join, the pipeline is joined by a re-run under any ceiling: its stages
    # finished, nothing is left to pay (it was refused: "the stages before grade spent ...").
    (out / "pipe-ceiling" / "summary.json").unlink()
    assert batch_pipeline(spent) == {**summary, "max_cost_usd": 0.001}
    assert stack.ledger(name_contains="pipe-ceiling--") == answered + graded


def test_a_stage_that_held_rows_back_stops_the_pipeline_until_a_higher_ceiling(stack, tmp_path):
    # Every first job of stage 1 fails; the first retry decided meets the three jobs' upper
    # bounds still reserved, so a ceiling just over the stage's estimate holds it back. The
    # grading, which reads every answer, must not run on part of them.
    source, out = _source(tmp_path), tmp_path / "out"
    params = _params(source, out, "pipe-held", max_cost_usd=0.0001)
    with pytest.raises(CostCeilingError, match="Stage answer may cost up to") as first:
        batch_pipeline(params)
    assert stack.ledger(name_contains="pipe-held") == []
    stage_high = first.value.upper_bound_usd
    # Only first jobs fail: a retry admitted once another shard's hold freed its reservation
    # is answered, not failed up to max_attempts.
    stack.set_faults(fail_job_names_containing="-a1")

    ceiling = round(stage_high * 1.01, 6)
    with pytest.raises(CostCeilingError, match=r"Stage answer held back [0-9,]+ rows at") as held:
        batch_pipeline(params.model_copy(update={"max_cost_usd": ceiling}))
    needed = float(
        re.search(r"Raise max_cost_usd to at least ([0-9.]+) for stage", str(held.value))[1]
    )
    assert needed > ceiling
    assert stack.ledger(name_contains="pipe-held--grade") == []
    assert not (out / "pipe-held" / "summary.json").exists()
    failed = {j["jobName"] for j in stack.ledger(name_contains="pipe-held--answer")}

    stack.reset_faults()
    # The figure it named sends the held rows: stage answer finishes with every row answered.
    # Stage grade, priced only now that its prompts exist, asks a ceiling of its own.
    with pytest.raises(CostCeilingError, match="Stage grade may cost up to") as graded:
        batch_pipeline(params.model_copy(update={"max_cost_usd": needed}))
    answered = pl.read_parquet(out / "pipe-held/stages/answer/pipe-held--answer/output")
    assert answered.height == ROWS and answered["error_code"].null_count() == ROWS
    assert stack.ledger(name_contains="pipe-held--grade") == []
    to_grade = float(re.search(r"at least ([0-9.]+),", str(graded.value))[1])
    summary = batch_pipeline(params.model_copy(update={"max_cost_usd": to_grade}))

    joined = pl.read_parquet(out / "pipe-held" / "output" / "*.parquet")
    _assert_each_answer_is_its_rows(joined)
    answer, grade = summary["stages"]
    assert answer["counts"]["succeeded"] == ROWS
    assert grade["counts"]["records"] == answer["counts"]["succeeded"]
    assert joined["answer_error_code"].drop_nulls().to_list().count("CostCeilingReached") == 0
    jobs = [j["jobName"] for j in stack.ledger(name_contains="pipe-held--")]
    assert len(jobs) == len(set(jobs))  # no job created twice
    assert failed < set(jobs)  # the failed jobs were not made again; the held ones were sent
