"""A pipeline's mistakes in any stage are found before stage 1 is paid."""

from __future__ import annotations

import pytest

from data.make_samples import simplecot
from flows.pipeline import PipelineParams, batch_pipeline
from pipelines import NOVA_LITE, Stage
from tasks.bedrock.prices import ceil_usd
from tasks.errors import CostCeilingError, PlanError, TemplateError, UnknownModelError
from tasks.pipeline.stages import check_stages

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
TITAN_EMBED = "amazon.titan-embed-text-v2:0"  # no price in the catalog (tasks.bedrock.prices)
SOURCE = ["source", "target", "rationale", "task", "type"]  # simplecot's columns


def _stages(**grade) -> list[Stage]:
    fields = dict(
        name="grade",
        prompt_id="grade_answer",
        model_id=CLAUDE,
        filter="error_code IS NULL",
        carry=["source", "target", "response_text"],
    )
    fields.update(grade)
    return [
        Stage(name="answer", prompt_id="answer_with_rationale", model_id=NOVA_LITE),
        Stage(**fields),
    ]


def test_a_sound_pipeline_passes():
    check_stages(_stages(), SOURCE)
    check_stages(_stages(carry=None), SOURCE)  # the default carry keeps what grading needs


@pytest.mark.parametrize(
    ("grade", "error", "words"),
    [
        ({"prompt_id": "grade_answr"}, TemplateError, "grade_answr"),
        ({"model_id": "acme.unknown-v1"}, UnknownModelError, "acme.unknown-v1"),
        ({"filter": "eror_code IS NULL"}, PlanError, "names eror_code, not columns"),
        ({"filter": "error_code IS NUL"}, PlanError, "is not SQL Polars reads"),
        ({"carry": ["source", "response_txt"]}, PlanError, "carries ['response_txt']"),
        ({"carry": ["source", "response_text"]}, PlanError, "needs column(s) 'target'"),
        ({"name": "answer"}, PlanError, "answer used more than once"),
        ({"inference": {"max_tokens": 9000}}, Exception, "max_tokens=9000 is over"),
    ],
)
def test_a_mistake_in_stage_two_is_named(grade, error, words):
    with pytest.raises(error) as exc:
        check_stages(_stages(**grade), SOURCE)
    assert words in str(exc.value), str(exc.value)


def test_a_source_that_holds_pipeline_columns_is_refused():
    # A joined pipeline output fed to another pipeline: its ids and prefixed columns clashed
    # at the final join, after every stage was paid.
    with pytest.raises(PlanError) as exc:
        check_stages(_stages(), [*SOURCE, "pipeline_row_id", "answer_response_text"])
    assert "'pipeline_row_id', 'answer_response_text'" in str(exc.value)


@pytest.mark.parametrize(
    ("grade", "extra", "error", "words"),
    [
        ({"filter": "eror_code IS NULL"}, {}, PlanError, "eror_code"),
        # A ceiling needs every stage's price; stage 2's is checked before stage 1 is paid.
        (
            {"model_id": TITAN_EMBED},
            {"max_cost_usd": 1.0},
            CostCeilingError,
            rf"price of stage grade \({TITAN_EMBED}\) is unknown",
        ),
    ],
    ids=["typo in a filter", "unpriced model under a ceiling"],
)
def test_a_bad_stage_two_stops_the_pipeline_before_any_job(
    stack, tmp_path, grade, extra, error, words
):
    source = tmp_path / "simplecot.jsonl"
    simplecot(120).write_ndjson(source)
    params = PipelineParams(
        source=str(source),
        output_uri=str(tmp_path / "out"),
        run_name="pipe-refused",
        stages=_stages(**grade),
        **extra,
    )
    with pytest.raises(error, match=words):
        batch_pipeline(params)
    assert stack.ledger(name_contains="pipe-refused") == []
    # Not recorded: the corrected pipeline runs under the same name without a restart.
    assert not (tmp_path / "out" / "pipe-refused" / "pipeline.json").exists()


@pytest.mark.slow
def test_a_finished_pipeline_whose_template_or_source_changed_is_refused(
    stack, tmp_path, monkeypatch
):
    # The definition held prompt ids and the source's name only: after an edit of the
    # template's text, or of the source file, the re-run returned the old summary.
    import dataclasses

    import prompt_templates
    from tasks.errors import RunIdentityError

    source = tmp_path / "simplecot.jsonl"
    simplecot(120).write_ndjson(source)
    params = PipelineParams(
        source=str(source), output_uri=str(tmp_path / "out"), run_name="pipe-edit", stages=_stages()
    )
    first = batch_pipeline(params)
    assert first["rows"] == 120
    assert batch_pipeline(params) == first  # unchanged: reported, nothing paid
    jobs = len(stack.ledger(name_contains="pipe-edit"))

    grade = prompt_templates.prompt_id_to_template["grade_answer"]
    edited = dataclasses.replace(grade, text=grade.text + "\nBe strict.")
    monkeypatch.setitem(prompt_templates.prompt_id_to_template, "grade_answer", edited)
    with pytest.raises(RunIdentityError, match=r"changed: grade\)"):
        batch_pipeline(params)
    monkeypatch.setitem(prompt_templates.prompt_id_to_template, "grade_answer", grade)

    simplecot(130).write_ndjson(source)
    with pytest.raises(RunIdentityError, match=r"changed: source\)"):
        batch_pipeline(params)
    assert len(stack.ledger(name_contains="pipe-edit")) == jobs


def test_the_same_source_file_named_another_way_is_the_same_pipeline(tmp_path, monkeypatch):
    # Recorded with the file's absolute path, a re-run naming it from its folder was refused
    # as "started with another definition (changed: source)". An edited file still is.
    from tasks.errors import RunIdentityError
    from tasks.pipeline.stages import check_definition

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "simplecot.jsonl"
    simplecot(20).write_ndjson(source)
    base = str(tmp_path / "out" / "pipe")
    check_definition(base, _stages(), str(source), restart=False)

    for spelling in ("simplecot.jsonl", "./simplecot.jsonl", str(tmp_path / "." / source.name)):
        check_definition(base, _stages(), spelling, restart=False)

    simplecot(21).write_ndjson(source)
    with pytest.raises(RunIdentityError, match=r"changed: source\)"):
        check_definition(base, _stages(), "simplecot.jsonl", restart=False)


def test_the_join_is_a_task_and_the_stage_totals_are_unknown_when_one_is():
    # A helper slid between the decorator and the join made the sum the Prefect task: the
    # pipeline's join vanished from the UI and each total became two task runs.
    from prefect import Task

    from flows.pipeline import _total, join_and_report

    assert isinstance(join_and_report, Task) and not isinstance(_total, Task)
    assert _total(iter([3, 4])) == 7
    assert _total([3, None]) is None  # a Cohere stage's unknown tokens: the total too


def test_a_ceiling_is_kept_stage_by_stage_from_what_the_stages_before_cost():
    from flows.pipeline import over_ceiling, stage_ceiling

    assert stage_ceiling(None, "answer", []) is None
    assert stage_ceiling(0.05, "answer", []) == 0.05
    ran = [{"stage": "answer", "cost_usd": 0.002}]
    assert stage_ceiling(0.05, "grade", ran) == pytest.approx(0.048)
    # Nothing left (a re-run with a lower ceiling): the stage still runs, under a ceiling no
    # job fits, so a finished one reports itself and any other is refused by its own
    # estimate, which names the ceiling it needs. A refusal here named no figure, and refused
    # a stage that had finished before the pipeline's join (nothing left to pay).
    assert 0 < stage_ceiling(0.05, "grade", [{"stage": "answer", "cost_usd": 0.05}]) < 1e-6
    assert 0 < stage_ceiling(0.001, "grade", ran) < 1e-6
    # A stage whose cost is unknown (no price, no token counts) leaves nothing to keep under.
    with pytest.raises(CostCeilingError, match=r"before grade is unknown \(answer unknown\)"):
        stage_ceiling(0.05, "grade", [{"stage": "answer", "cost_usd": None}])

    # The stage's refusal names the ceiling the whole pipeline needs: spent + its upper bound.
    refused = CostCeilingError("over", upper_bound_usd=0.0613)
    said = over_ceiling(0.03, "grade", ran, refused)
    assert said.upper_bound_usd == pytest.approx(0.0633)
    assert "more than the $0.0280 the pipeline's max_cost_usd=0.03 leaves" in str(said)
    assert "at least 0.0633," in str(said)
    assert "nothing of stage grade was submitted" in str(said)
    lower = over_ceiling(0.001, "grade", ran, refused)
    assert "more than the $0.0000 the pipeline's max_cost_usd=0.001 leaves" in str(lower)
    assert "at least 0.0633," in str(lower)
    # A stage resumed after a crash had sent jobs: they are kept, not "nothing submitted".
    after_crash = CostCeilingError("over", upper_bound_usd=0.0613, jobs_created=3)
    resumed = str(over_ceiling(0.03, "grade", ran, after_crash))
    assert "nothing more of stage grade was submitted (the 3 jobs it sent" in resumed
    # The figure is the on-demand one for a stage too small for a batch job, said so; for a
    # stage with stages after it, the figure is what it needs, theirs are priced when reached.
    on_demand = CostCeilingError("over", upper_bound_usd=0.0613, on_demand=True)
    small = str(over_ceiling(0.03, "grade", ran, on_demand))
    assert "may cost up to $0.0613 at the on-demand price (fewer rows than" in small
    first = over_ceiling(
        0.01, "answer", [], CostCeilingError("over", upper_bound_usd=0.0151), later=["grade"]
    )
    assert "more than the pipeline's max_cost_usd=0.01; nothing of stage answer" in str(first)
    assert "at least 0.0151 for stage answer (stage grade after it is priced" in str(first)


def test_a_stage_that_held_rows_back_stops_the_pipeline():
    # The stages after it read its every answer: run on part of them they would be run (and
    # paid) again once the held rows are answered.
    from flows.pipeline import held_back

    held_back(0.05, "answer", {"cost": {"held_back_rows": 0, "total_usd": 0.01}}, ["grade"], [])
    held_back(None, "answer", {"not_run": True}, ["grade"], [])
    cost = {"held_back_rows": 1200, "total_usd": 0.049, "max_cost_usd": 0.05}
    summary = {"cost": {**cost, "held_back_usd": 0.0213}}
    with pytest.raises(CostCeilingError, match="Stage answer held back 1,200 rows at") as held:
        held_back(0.05, "answer", summary, ["grade"], [])
    assert "stage grade after it was not run, as it reads its every answer" in str(held.value)
    # What it cost plus the most the held rows may cost: the ceiling that sends them.
    assert "Raise max_cost_usd to at least 0.0703 for stage answer (stage grade" in str(held.value)
    # The last stage: no stage after it, but the joined output would lack the held rows; the
    # stages before it count in the figure.
    with pytest.raises(CostCeilingError, match="the pipeline's output was not joined") as last:
        held_back(0.06, "grade", summary, [], [{"stage": "answer", "cost_usd": 0.01}])
    assert "after it" not in str(last.value)
    needed = ceil_usd(0.01 + 0.049 + 0.0213)  # 0.0804: the float sum is just over 0.0803
    assert f"Raise max_cost_usd to at least {needed} and run" in str(last.value)
    # A bound unknown (an old run's summary): no figure rather than a wrong one.
    with pytest.raises(CostCeilingError, match=r"answer\. Raise max_cost_usd and run the same"):
        held_back(0.05, "answer", {"cost": cost}, ["grade"], [])


def test_the_ceiling_that_sends_held_rows_is_over_the_one_that_held_them():
    # A re-run sends held rows only under a higher ceiling than the one that held them, even
    # when what they may cost would fit under it (the run reserved more while it ran).
    from tasks.run.cost import ceiling_to_send_held

    cost = {"held_back_usd": 0.001, "total_usd": 0.002, "max_cost_usd": 0.025}
    assert ceiling_to_send_held(cost) == "0.0251"
    assert ceiling_to_send_held({**cost, "max_cost_usd": 0.02512345}) == "0.0252"
    assert ceiling_to_send_held({**cost, "held_back_usd": 0.03}) == "0.0320"
    assert ceiling_to_send_held({**cost, "held_back_usd": None}) is None
