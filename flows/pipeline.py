"""The pipeline flow: one batch-inference subflow per stage, then the stages joined per row."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.batch_inference import batch_inference
from pipelines import Stage, get_pipeline
from prompt_templates import output_schema_for
from tasks.aws import storage
from tasks.bedrock.prices import ceil_usd, format_usd
from tasks.errors import CostCeilingError
from tasks.pipeline import stages as S
from tasks.run.cost import CEILING_SOURCE, ceiling_to_send_held, run_price
from tasks.run.params import BatchParams

# A stage's ceiling when the stages before it spent the pipeline's: no job fits under it, but
# the stage still runs, so a finished one reports itself and another is refused by its own
# estimate, which gives the figure to name.
NOTHING_LEFT_USD = 1e-9


class PipelineParams(BaseModel):
    """One pipeline run: a named pipeline, or stages given here (the UI form can define them)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="The first stage's source (like a batch run's).")
    output_uri: str = Field(..., description="s3://bucket/prefix or a local folder.")
    run_name: str = Field(..., description="Stable name: re-running it resumes or reports it.")
    pipeline_id: str | None = Field(None, description="A key of pipelines.pipeline_id_to_stages.")
    stages: list[Stage] | None = Field(None, description="Stages, when no pipeline_id is given.")
    max_concurrent_jobs: int = Field(10, ge=1, le=100, description="The gate, per stage model.")
    max_records_per_job: int | None = Field(None, ge=1, description="Cap per job, every stage.")
    max_attempts: int = Field(3, ge=1, le=10, description="Tries per record (repairs included).")
    role_arn: str | None = Field(None, description="Bedrock service role.")
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        description=(
            "Cost ceiling in USD for all stages together. Each stage runs under what the "
            "stages before it left (its run refuses before any job when its estimate may pass "
            "that); the pipeline stops after a stage that held rows back at it. A re-run with "
            "a higher ceiling goes on where it stopped, paying nothing twice."
        ),
    )
    restart: bool = Field(False, description="Start the pipeline (and each stage) again.")
    restart_from: str | None = Field(
        None,
        description=(
            "Run this stage and the ones after it again from scratch (their definitions may "
            "have changed); the stages before it keep their answers and are not paid again."
        ),
    )

    @model_validator(mode="after")
    def _one_definition(self) -> PipelineParams:
        if bool(self.pipeline_id) == bool(self.stages):
            msg = "Give pipeline_id (a named pipeline) or stages, exactly one of them."
            raise ValueError(msg)
        if self.restart and self.restart_from:
            msg = "Give restart (every stage) or restart_from (a stage and the ones after it)."
            raise ValueError(msg)
        return self

    def restarts(self, index: int, stages: list[Stage]) -> bool:
        """Whether stage `index` starts again from scratch."""
        if self.restart_from is None:
            return self.restart
        return index >= [s.name for s in stages].index(self.restart_from)

    def resolved_stages(self) -> list[Stage]:
        """The stages to run."""
        return list(self.stages or get_pipeline(self.pipeline_id))


def _stage_params(
    params: PipelineParams,
    stages: list[Stage],
    stage: Stage,
    index: int,
    max_cost_usd: float | None = None,
) -> BatchParams:
    layout = S.stage_layout(params.output_uri, params.run_name, stage)
    return BatchParams(
        source=params.source if index == 0 else layout.input_uri,
        prompt_id=stage.prompt_id,
        model_id=stage.model_id,
        invocation_type=stage.invocation_type,
        output_uri=layout.output_uri,
        run_name=layout.run_name,
        id_column=None if index == 0 else S.ROW_ID,
        inference=stage.inference,
        max_concurrent_jobs=params.max_concurrent_jobs,
        max_records_per_job=stage.max_records_per_job or params.max_records_per_job,
        max_attempts=params.max_attempts,
        role_arn=params.role_arn,
        restart=params.restarts(index, stages),
        max_cost_usd=max_cost_usd,
    )


def _spent(reports: list[dict[str, Any]]) -> float | None:
    """What the stages run so far cost, None when one of their costs is unknown."""
    return _total(r["cost_usd"] for r in reports)


def _spent_by_stage(reports: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['stage']} {format_usd(r['cost_usd'])}" for r in reports)


def stage_ceiling(ceiling: float | None, stage: str, reports: list[dict[str, Any]]) -> float | None:
    """What the pipeline's ``ceiling`` leaves for ``stage``: less what the stages before cost.

    A later stage's cost cannot be known before the stages it reads have answered (its rows
    and prompts are theirs), so the ceiling is kept stage by stage: each run under the rest.
    With nothing left (a re-run under a lower ceiling) the stage still runs, under
    `NOTHING_LEFT_USD`: a stage that finished reports itself (a pipeline killed before its
    join is joined), another is refused by its own estimate, which names the figure.
    """
    if ceiling is None:
        return None
    spent = _spent(reports)
    if spent is None:
        msg = (
            f"The cost of the stages before {stage} is unknown ({_spent_by_stage(reports)}), "
            f"so the pipeline cannot be kept under max_cost_usd={ceiling}; nothing of stage "
            f"{stage} was submitted. Give their models' prices in BEDROCK_BATCH_PRICES_FILE "
            "or run it without max_cost_usd."
        )
        raise CostCeilingError(msg)
    return max(ceiling - spent, NOTHING_LEFT_USD)


def over_ceiling(
    ceiling: float,
    stage: str,
    reports: list[dict[str, Any]],
    refused: CostCeilingError,
    later: list[str] | None = None,
) -> CostCeilingError:
    """The stage's refusal in the pipeline's terms: the whole ceiling it would need.

    ``later``: the stages after it, priced only when reached. What the stage's run knew (its
    upper bound, its price basis, the jobs a resumed run created before) comes on ``refused``.
    """
    high = refused.upper_bound_usd
    if high is None:
        return CostCeilingError(f"Stage {stage}: {refused}")
    spent = _spent(reports) or 0.0
    after = (
        f"the {format_usd(max(ceiling - spent, 0.0))} the pipeline's max_cost_usd={ceiling} "
        f"leaves after the stages before it ({_spent_by_stage(reports)})"
        if reports
        else f"the pipeline's max_cost_usd={ceiling}"
    )
    on_demand = " at the on-demand price (fewer rows than a batch job's minimum)"
    price = on_demand if refused.on_demand else ""
    sent = refused.jobs_created
    submitted = (
        f"nothing more of stage {stage} was submitted (the {sent} jobs it sent before it "
        "stopped are kept for its next run, not sent again)"
        if sent
        else f"nothing of stage {stage} was submitted"
    )
    rest = _priced_later(stage, later)
    msg = (
        f"Stage {stage} may cost up to {format_usd(high)}{price}, more than {after}; "
        f"{submitted}. Raise max_cost_usd to at least {ceil_usd(spent + high)}{rest}, lower the "
        "stage's max_tokens or send fewer rows, and run the same pipeline again"
        + (": the stages before it are kept, not paid again." if reports else ".")
    )
    return CostCeilingError(msg, upper_bound_usd=spent + high)


def _names(stages: list[str]) -> str:
    return f"stage{'s' * (len(stages) > 1)} {', '.join(stages)}"


def _priced_later(stage: str, later: list[str] | None) -> str:
    """What a stage's figure leaves out: the stages after it, priced only when reached."""
    if not later:
        return ""
    verb = "is" if len(later) == 1 else "are"
    return f" for stage {stage} ({_names(later)} after it {verb} priced when reached)"


def held_back(
    ceiling: float | None,
    stage: str,
    summary: dict[str, Any],
    later: list[str],
    reports: list[dict[str, Any]],
) -> None:
    """Stop the pipeline after a stage whose run held rows back at the ceiling.

    The stages after it (``later``) read its every answer: run on part of them, they would
    need running again (and paying again) once the held rows are answered; the joined output
    of a last stage would lack them. ``reports``: the stages before it.
    """
    cost = summary.get("cost") or {}
    rows = cost.get("held_back_rows") or 0
    if not rows:
        return
    stopped = (
        f"{_names(later)} after it {'was' if len(later) == 1 else 'were'} not run, as "
        f"{'it reads' if len(later) == 1 else 'they read'} its every answer"
        if later
        else "the pipeline's output was not joined, as it would lack them"
    )
    spent = _spent(reports)
    needed = None if spent is None else ceiling_to_send_held(cost, spent)
    rest = _priced_later(stage, later)
    raise_to = f"Raise max_cost_usd to at least {needed}{rest}" if needed else "Raise max_cost_usd"
    msg = (
        f"Stage {stage} held back {rows:,} rows at the pipeline's max_cost_usd={ceiling} "
        f"(it cost {format_usd(cost.get('total_usd'))}); {stopped}. {raise_to} and run the "
        "same pipeline again: the held rows are sent and the pipeline goes on; nothing "
        "answered is paid again."
    )
    raise CostCeilingError(msg)


def _check_prices(ceiling: float | None, stages: list[Stage]) -> None:
    """A ceiling needs every stage's price, known before stage 1 is paid."""
    if ceiling is None:
        return
    prices = {s.name: run_price(s.model_id) for s in stages}
    unknown = [
        f"{s.name} ({s.model_id})"
        for s in stages
        if prices[s.name] is None or prices[s.name].per_million("batch")[0] is None
    ]
    if unknown:
        msg = (
            f"max_cost_usd={ceiling} is set but the price of stage {', '.join(unknown)} is "
            "unknown, so the pipeline cannot be kept under it; nothing was submitted. Set the "
            "price in BEDROCK_BATCH_PRICES_FILE or the Prefect Variable bedrock-batch-prices."
        )
        raise CostCeilingError(msg)


@task(cache_policy=NO_CACHE)
def record_definition(params: PipelineParams, stages: list[Stage]) -> dict[str, Any] | None:
    """Record the pipeline's definition (or refuse a changed one); a finished run's summary."""
    base = S.pipeline_dir(params.output_uri, params.run_name)
    # Every stage checked before the definition is recorded and stage 1 is paid.
    S.check_stages(stages, S.source_columns(params.source))
    _check_prices(params.max_cost_usd, stages)
    S.check_definition(base, stages, params.source, params.restart, params.restart_from)
    summary_uri = storage.join(base, S.SUMMARY_FILE)
    if not params.restart and not params.restart_from and storage.exists(summary_uri):
        return json.loads(storage.read_bytes(summary_uri))
    return None


@task(cache_policy=NO_CACHE)
def prepare_stage_input(
    params: PipelineParams, stages: list[Stage], index: int, previous_inputs: list[str]
) -> dict[str, Any]:
    """Stage `index`'s source: every output part of the stage before it, filtered."""
    previous, stage = stages[index - 1], stages[index]
    return S.build_stage_input(
        S.stage_layout(params.output_uri, params.run_name, previous),
        previous,
        previous_inputs,
        stage,
        S.stage_layout(params.output_uri, params.run_name, stage),
    )


def _total(values: Iterable[float | None]) -> float | None:
    """The sum of the stages' counts or costs, None when one of them is unknown."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


@task(cache_policy=NO_CACHE)
def join_and_report(
    params: PipelineParams, stages: list[Stage], reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """Join the stages per original row, summarise counts, tokens and cost, write summary.json."""
    not_run = {r["stage"]: r["emptied_by"] for r in reports if r.get("not_run")}
    joined = S.join_stages(params.output_uri, params.run_name, stages, params.source, not_run)
    frame: pl.DataFrame = joined.pop("frame")
    for report, stage in zip(reports, stages, strict=True):
        schema = output_schema_for(stage.prompt_id)
        if schema is not None and stage.name not in not_run:
            repaired = frame.get_column(f"{stage.name}_schema_repaired").sum()
            report["schema_repaired"] = int(repaired or 0)
    booleans = [c for c in frame.columns if c.endswith("correct") and frame[c].dtype == pl.Boolean]
    accuracy = None
    if booleans:
        graded = frame.get_column(booleans[-1]).drop_nulls()
        accuracy = {
            "column": booleans[-1],
            "graded": graded.len(),
            "correct": int(graded.sum()),
            "accuracy": round(float(graded.mean()), 4) if graded.len() else None,
        }
    summary = {
        "run_name": params.run_name,
        "output_uri": storage.join(S.pipeline_dir(params.output_uri, params.run_name), "output"),
        "parts": joined["parts"],
        "rows": joined["rows"],
        "stages": reports,
        # None when a stage's tokens are unknown (rows without counts nor manifests).
        "tokens": {
            key: _total(r["tokens"].get(key, 0) for r in reports) for key in ("input", "output")
        },
        # Unrounded, as each stage's: a rounded total differed from the stages' sum.
        "cost_usd": _spent(reports),
        "max_cost_usd": params.max_cost_usd,
        "accuracy": accuracy,
    }
    base = S.pipeline_dir(params.output_uri, params.run_name)
    storage.write_bytes(storage.join(base, S.SUMMARY_FILE), json.dumps(summary, indent=1).encode())
    return summary


@flow(name="batch-pipeline")
def batch_pipeline(params: PipelineParams) -> dict[str, Any]:
    """Run a pipeline: each stage a resumable batch run over the previous stage's output.

    Re-running with the same run name resumes at the stage that did not finish (finished
    stages report their output, nothing is paid twice); a finished pipeline reports its
    summary; a changed definition is refused before anything is spent, unless the changed
    stages are run again (`restart_from`, or `restart` for all). With ``max_cost_usd`` each
    stage runs under what the stages before it left (`stage_ceiling`), and a stage refused by
    it, or holding rows back at it, stops the pipeline there until a re-run raises it.
    """
    logger = get_run_logger()
    stages = params.resolved_stages()

    # 1. The definition: recorded, or checked against the recorded one.
    finished = record_definition(params, stages)
    if finished is not None:
        logger.info(
            "Pipeline %s already finished; output in %s", params.run_name, finished["output_uri"]
        )
        return finished

    # 2. Each stage, in order: its input from every part of the previous stage, then its run.
    # A stage whose filter keeps no row has nothing to send: it and the stages after it are
    # not run (a batch run of no record is refused), and every row says why in the output.
    reports: list[dict[str, Any]] = []
    inputs = S.source_columns(params.source)
    arm = S.stage_failpoints()
    emptied_by: str | None = None
    for index, stage in enumerate(stages):
        arm(stage.name)
        extra: dict[str, Any] = {}
        if index > 0 and emptied_by is None:
            extra = prepare_stage_input(params, stages, index, inputs)
            inputs = extra.pop("columns")
            if extra["rows_kept"] == 0:
                emptied_by = stage.name
        if emptied_by is not None:
            logger.warning(
                "Stage %s is not run: the filter of stage %s kept no row", stage.name, emptied_by
            )
            # The stages after it received no row (`rows_in` 0); the CLI and the summary say
            # which filter emptied them.
            why = {"rows_in": 0, "rows_kept": 0, **extra, "emptied_by": emptied_by}
            reports.append(S.stage_report(stage, S.NOT_RUN, why))
            continue
        ceiling = stage_ceiling(params.max_cost_usd, stage.name, reports)
        stage_params = _stage_params(params, stages, stage, index, ceiling)
        run_stage = batch_inference.with_options(flow_run_name=stage_params.run_name)
        later = [s.name for s in stages[index + 1 :]]
        source = (
            f"that pipeline {params.run_name}'s max_cost_usd={params.max_cost_usd} leaves for "
            f"stage {stage.name}"
            if ceiling is not None
            else None
        )
        token = CEILING_SOURCE.set(source)
        try:
            summary = run_stage(stage_params)
        except CostCeilingError as refused:
            if params.max_cost_usd is None:
                raise
            raise over_ceiling(params.max_cost_usd, stage.name, reports, refused, later) from None
        finally:
            CEILING_SOURCE.reset(token)
        held_back(params.max_cost_usd, stage.name, summary, later, reports)
        reports.append(S.stage_report(stage, summary, extra))
        logger.info("Stage %s: %s", stage.name, summary.get("counts"))

    # 3. Every original row once, each stage's columns prefixed by its name.
    return join_and_report(params, stages, reports)
