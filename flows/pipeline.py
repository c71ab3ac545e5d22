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
from tasks.pipeline import stages as S
from tasks.run.params import BatchParams


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
    params: PipelineParams, stages: list[Stage], stage: Stage, index: int
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
    )


@task(cache_policy=NO_CACHE)
def record_definition(params: PipelineParams, stages: list[Stage]) -> dict[str, Any] | None:
    """Record the pipeline's definition (or refuse a changed one); a finished run's summary."""
    base = S.pipeline_dir(params.output_uri, params.run_name)
    # Every stage checked before the definition is recorded and stage 1 is paid.
    S.check_stages(stages, S.source_columns(params.source))
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


def _total(values: Iterable[int | None]) -> int | None:
    """The sum of the stages' counts, None when one of them is unknown."""
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
    costs = [r["cost_usd"] for r in reports]
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
        "cost_usd": None if any(c is None for c in costs) else sum(costs),
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
    stages are run again (`restart_from`, or `restart` for all).
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
        stage_params = _stage_params(params, stages, stage, index)
        summary = batch_inference.with_options(flow_run_name=stage_params.run_name)(stage_params)
        reports.append(S.stage_report(stage, summary, extra))
        logger.info("Stage %s: %s", stage.name, summary.get("counts"))

    # 3. Every original row once, each stage's columns prefixed by its name.
    return join_and_report(params, stages, reports)
