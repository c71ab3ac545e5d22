"""Pipeline stages: where each stage lives, its input from the previous stage, the final join.

Every stage is a normal batch run (its own run folder and name). Stage N+1 reads all of stage
N's output parts, filters them, and carries the original row id (`pipeline_row_id`, stage 1's
record id) so the final output joins every stage per original row.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from pipelines import Stage
from prompt_templates import output_schema_for
from tasks.aws import storage
from tasks.errors import PlanError, RunIdentityError
from tasks.pipeline import columns as C
from tasks.pipeline.sources import load_source
from tasks.run import failpoints
from tasks.run.layout import (
    OUTPUT_DIR,
    PARQUET,
    REPLACED_MARK,
    expand_run_name,
    replaced_stamp,
)

ROW_ID = "pipeline_row_id"
SKIPPED_SUFFIX = "_skipped"
DEFINITION_FILE = "pipeline.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class StageLayout:
    """Where one stage of a pipeline run lives."""

    pipeline_dir: str
    run_name: str  # <pipeline run>--<stage>
    output_uri: str  # <output_uri>/<pipeline run>/stages/<stage>

    @property
    def run_dir(self) -> str:
        return storage.join(self.output_uri, self.run_name)

    @property
    def output_dir(self) -> str:
        return storage.join(self.run_dir, OUTPUT_DIR)

    @property
    def input_uri(self) -> str:
        """The stage's source when it reads a previous stage (a Parquet file)."""
        return storage.join(self.output_uri, "input" + PARQUET)


def pipeline_dir(output_uri: str, run_name: str) -> str:
    """`<output_uri>/<run_name>`: the pipeline's definition, stages and joined output."""
    return storage.join(output_uri, expand_run_name(run_name))


def stage_layout(output_uri: str, run_name: str, stage: Stage) -> StageLayout:
    """Where `stage` of the pipeline run `run_name` lives."""
    base = pipeline_dir(output_uri, run_name)
    return StageLayout(
        base,
        f"{expand_run_name(run_name)}--{stage.name}",
        storage.join(base, "stages", stage.name),
    )


def _read_parts(output_dir: str) -> pl.DataFrame:
    """Every Parquet part of a finished run's output, in part order."""
    uris = storage.list_files(output_dir, PARQUET)
    if not uris:
        msg = f"No output parts under {output_dir}; the previous stage did not finish."
        raise PlanError(msg)
    frames = [pl.read_parquet(io.BytesIO(storage.read_bytes(u))) for u in sorted(uris)]
    return pl.concat(frames, how="vertical_relaxed")


def result_columns(stage: Stage) -> list[str]:
    """The columns a text stage adds after its inputs (typed schema fields included)."""
    schema = output_schema_for(stage.prompt_id)
    typed = list(schema.columns) if schema is not None else []
    extra = ["schema_repaired"] if schema is not None else []
    return [C.RECORD_ID, *C.TEXT_RESULT_COLUMNS, *typed, *C.STATUS_COLUMNS, *extra]


def _template_of(prompt_id: str) -> dict[str, Any]:
    """What of a stage's template decides its answers (a prompt id alone does not)."""
    from prompt_templates import get_template

    t = get_template(prompt_id)
    schema = t.output_schema.schema_json() if t.output_schema is not None else None
    return {"text": t.text, "system": t.system, "params": t.inference_params(), "schema": schema}


def check_definition(
    base: str, stages: list[Stage], source: str, restart: bool, restart_from: str | None = None
) -> None:
    """Record the pipeline's definition, or refuse a changed one before anything is spent.

    The definition holds what decides the answers: the source's content (as a batch run's
    identity has it), and each stage with its template's text, system prompt, parameters
    and schema. With the prompt id and the source's name alone, a finished pipeline whose
    template or source file was edited returned its old summary as if nothing changed.
    ``restart_from`` lets the stages from that one on change (or be added) while the source
    and the stages before it, whose answers are kept, must not.
    """
    from tasks.run.identity import answers_alike, comparable, source_fingerprint

    names = [s.name for s in stages]
    if restart_from is not None and restart_from not in names:
        msg = (
            f"restart_from={restart_from!r} is not a stage of this pipeline "
            f"({', '.join(names)}); name the first stage to run again."
        )
        raise PlanError(msg)
    uri = storage.join(base, DEFINITION_FILE)
    recorded = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    known = (
        recorded.get("source") if recorded and isinstance(recorded.get("source"), dict) else None
    )
    current = {
        "source": source_fingerprint(source, known),
        "stages": [
            {**s.model_dump(mode="json"), "template": _template_of(s.prompt_id)} for s in stages
        ],
    }
    if recorded is not None and not restart and isinstance(recorded.get("source"), str):
        # Recorded before the definition held contents: compared as it was then, then kept
        # in today's form, so a pipeline started earlier resumes instead of being refused.
        before = {"source": source, "stages": [s.model_dump(mode="json") for s in stages]}
        if recorded == before:
            recorded = current
            storage.write_bytes(uri, json.dumps(current, indent=1).encode())
    if recorded is not None and not restart:
        # The same local file named another way (`data/x.csv`, its absolute path) is the same
        # source: compared by its files' contents, as a batch run's identity is.
        before, now = answers_alike(recorded), answers_alike(current)
        keep = len(stages) if restart_from is None else names.index(restart_from)
        changed = [
            s.get("name", "?")
            for s, r in zip(now["stages"][:keep], before["stages"] + [{}] * keep, strict=False)
            if comparable(s) != comparable(r)
        ]
        if before["source"] != now["source"]:
            changed.insert(0, "source")
        elif restart_from is None and len(before["stages"]) != len(now["stages"]):
            changed = changed or ["stages"]
        if changed and restart_from is not None:
            msg = (
                f"Pipeline run {base}: restart_from={restart_from!r} keeps the answers of the "
                f"stages before it, but changed: {', '.join(changed)}; nothing was submitted. "
                + (
                    "Use a new run name, or restart."
                    if changed[0] == "source"
                    else f"Restart from {changed[0]!r}, or restart."
                )
            )
            raise RunIdentityError(msg)
        if changed:
            msg = (
                f"Pipeline run {base} was started with another definition (changed: "
                f"{', '.join(changed)}); nothing was submitted. Use a new run name, "
                + (
                    "or restart."
                    if changed[0] == "source"
                    else f"restart_from={changed[0]!r} (keeps the stages before it), or restart."
                )
            )
            raise RunIdentityError(msg)
        if restart_from is None:
            return
    if recorded is not None:
        _move_aside(base)
    storage.write_bytes(uri, json.dumps(current, indent=1).encode())


def _move_aside(base: str) -> None:
    """A restarted pipeline's joined output and summary go to a sibling folder, kept.

    Left in place, a restart that crashed was reported as finished by the next plain re-run,
    with the old summary and output, and the restarted stages' jobs in flight never merged.
    The summary goes first: a crash between the two leaves a pipeline that resumes.
    """
    aside = base.rstrip("/") + REPLACED_MARK + replaced_stamp()
    summary = storage.join(base, SUMMARY_FILE)
    tagged = storage.read_tagged(summary)
    if tagged is not None:
        storage.write_bytes(storage.join(aside, SUMMARY_FILE), tagged.data)
        storage.delete_if_match(summary, tagged.tag)
    storage.move_tree(storage.join(base, OUTPUT_DIR), storage.join(aside, OUTPUT_DIR))


def check_stages(stages: list[Stage], source: list[str]) -> None:
    """What can be known wrong in any stage before stage 1 is paid, one line each.

    Each stage's template, model and options, its filter's SQL and columns, its carried
    columns and its template's columns, against the columns each stage will have. Before,
    such a mistake in stage 2 showed only after stage 1's jobs were paid, and fixing it meant
    a restart that paid stage 1 again.
    """
    from prompt_templates import get_template
    from tasks.bedrock.families import family_for

    names = [s.name for s in stages]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        msg = (
            f"Stage name(s) {', '.join(doubled)} used more than once: each stage needs its own "
            "name (it names the stage's run and prefixes its columns)."
        )
        raise PlanError(msg)
    taken = [c for c in source if c == ROW_ID or any(c.startswith(f"{n}_") for n in names)]
    if taken:
        msg = (
            f"The source has column(s) {', '.join(repr(c) for c in taken)}, which the pipeline "
            f"writes itself ({ROW_ID}, and <stage>_<column> for its stages "
            f"{', '.join(names)}). Rename them in the source (a joined pipeline output fed to "
            "another pipeline carries them)."
        )
        raise PlanError(msg)
    columns = list(source)
    for index, stage in enumerate(stages):
        template = get_template(stage.prompt_id)
        family = family_for(stage.model_id, stage.invocation_type)
        family.options(template.inference_params(), stage.inference.as_dict())
        if index > 0:
            columns = _next_stage_columns(stages[index - 1], stage, columns)
        missing = [c for c in template.columns if c not in columns]
        if missing:
            msg = (
                f"Stage {stage.name}'s template {stage.prompt_id!r} needs column(s) "
                f"{', '.join(repr(c) for c in missing)}, which its input does not have "
                f"({', '.join(columns)}). "
                + (
                    "Carry them from the stage before (Stage.carry)."
                    if index
                    else "Rename the source's columns or pick another template."
                )
            )
            raise PlanError(msg)


def _next_stage_columns(previous: Stage, stage: Stage, inputs: list[str]) -> list[str]:
    """The input columns of `stage`, from those of the stage before it (as build_stage_input)."""
    results = result_columns(previous)
    outputs = [ROW_ID, *[c for c in inputs if c != ROW_ID], *results]
    if stage.filter:
        try:
            used = pl.sql_expr(stage.filter).meta.root_names()
        except Exception as exc:  # noqa: BLE001 - Polars' SQL errors have several types
            reason = str(exc).strip().splitlines()[0]
            msg = f"Stage {stage.name}'s filter {stage.filter!r} is not SQL Polars reads: {reason}"
            raise PlanError(msg) from None
        unknown = sorted(set(used) - set(outputs))
        if unknown:
            msg = (
                f"Stage {stage.name}'s filter {stage.filter!r} names {', '.join(unknown)}, not "
                f"columns of stage {previous.name}'s output ({', '.join(outputs)})."
            )
            raise PlanError(msg)
    return [ROW_ID, *[name for _, name in _carried(previous, inputs, stage, outputs)]]


def _carried(
    previous: Stage, inputs: list[str], stage: Stage, available: list[str]
) -> list[tuple[str, str]]:
    """(column of `previous`'s output, its name in `stage`'s input) for each carried column.

    Carried: `stage.carry`, else `previous`'s inputs, its answer and its typed fields; its
    result columns arrive prefixed with its name. One rule for the check before stage 1 and
    for the input the stage is given.
    """
    schema = output_schema_for(previous.prompt_id)
    default = [c for c in inputs if c != ROW_ID] + [C.RESPONSE_TEXT]
    default += list(schema.columns) if schema is not None else []
    carry = stage.carry if stage.carry is not None else default
    missing = sorted(set(carry) - set(available))
    if missing:
        msg = (
            f"Stage {stage.name} carries {missing}, not columns of stage {previous.name}'s "
            f"output ({', '.join(available)})."
        )
        raise PlanError(msg)
    results = set(result_columns(previous))
    return [(c, f"{previous.name}_{c}" if c in results else c) for c in carry]


def source_columns(source: str) -> list[str]:
    """The columns of the pipeline's source."""
    return load_source(source).collect_schema().names()


def build_stage_input(
    previous: StageLayout,
    previous_stage: Stage,
    previous_inputs: list[str],
    stage: Stage,
    dest: StageLayout,
) -> dict[str, Any]:
    """Write stage `stage`'s source from all of `previous`'s output parts, filtered.

    Returns:
        Rows read, rows kept, and the columns the next stage's rows carry.
    """
    frame = _read_parts(previous.output_dir)
    if ROW_ID not in frame.columns:  # the first stage: its record id is the row id
        frame = frame.with_columns(pl.col(C.RECORD_ID).alias(ROW_ID))
    kept = frame.filter(pl.sql_expr(stage.filter)) if stage.filter else frame
    carried = _carried(previous_stage, previous_inputs, stage, frame.columns)
    renamed = [pl.col(column).alias(name) for column, name in carried]
    rows = kept.select(pl.col(ROW_ID), *renamed).sort(ROW_ID)
    buffer = io.BytesIO()
    rows.write_parquet(buffer, compression="zstd", statistics=False)
    data = buffer.getvalue()
    # Same rows, same bytes: a resume finds the input the stage's run identity recorded.
    if storage.digest_of(dest.input_uri) != storage.sha256_bytes(data):
        storage.write_bytes(dest.input_uri, data, digest=storage.sha256_bytes(data))
    return {"rows_in": frame.height, "rows_kept": rows.height, "columns": rows.columns}


def join_stages(
    output_uri: str,
    run_name: str,
    stages: list[Stage],
    source: str,
    not_run: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The final output: every original row once, each stage's columns prefixed by its name.

    A stage in ``not_run`` (stage -> the stage whose filter kept no row) adds only its skipped
    column, which says why for every row.

    Returns:
        The output parts written and the row count.
    """
    layouts = [stage_layout(output_uri, run_name, s) for s in stages]
    first = _read_parts(layouts[0].output_dir)
    inputs = [c for c in first.columns if c not in set(result_columns(stages[0]))]
    base = first.select(pl.col(C.RECORD_ID).alias(ROW_ID), *inputs)
    not_run = not_run or {}
    for index, (stage, layout) in enumerate(zip(stages, layouts, strict=True)):
        if stage.name in not_run:
            out = pl.DataFrame(schema={ROW_ID: base.schema[ROW_ID]})
        else:
            out = _read_parts(layout.output_dir)
        if index == 0:
            out = out.with_columns(pl.col(C.RECORD_ID).alias(ROW_ID))
        wanted = [c for c in result_columns(stage) if c in out.columns]
        prefixed = out.select(
            ROW_ID,
            *[pl.col(c).alias(f"{stage.name}_{c}") for c in wanted],
            pl.lit(True).alias("__in"),
        )
        emptied_by = not_run.get(stage.name)
        if emptied_by not in (None, stage.name):
            # Its own filter never ran: the rows stopped at the stage that kept none.
            reason = not_run_reason(stage.name, emptied_by)
        elif stage.filter:
            reason = f"filtered out before stage {stage.name} ({stage.filter})"
        else:
            reason = f"not sent to stage {stage.name}"
        base = (
            base.join(prefixed, on=ROW_ID, how="left", maintain_order="left")
            .with_columns(
                pl.when(pl.col("__in").is_null())
                .then(pl.lit(reason))
                .otherwise(pl.lit(None, dtype=pl.String))
                .alias(f"{stage.name}{SKIPPED_SUFFIX}")
            )
            .drop("__in")
        )
    out_dir = storage.join(pipeline_dir(output_uri, run_name), OUTPUT_DIR)
    part = storage.join(out_dir, "part-00000" + PARQUET)
    buffer = io.BytesIO()
    base.write_parquet(buffer, compression="zstd")
    storage.write_bytes(part, buffer.getvalue())
    return {"parts": [part], "rows": base.height, "frame": base}


KILL_STAGE_ENV = "BEDROCK_BATCH_KILL_STAGE"


def stage_failpoints():
    """With BEDROCK_BATCH_KILL_STAGE set, the crash point (tasks.run.failpoints) is armed only
    while that stage runs, so the fault-injection tests can kill a pipeline inside stage N."""
    target = os.environ.get(KILL_STAGE_ENV)
    point = os.environ.get(failpoints.ENV)

    def arm(stage_name: str) -> None:
        if not target or not point:
            return
        if stage_name == target:
            os.environ[failpoints.ENV] = point
        else:
            os.environ.pop(failpoints.ENV, None)

    return arm


# The batch summary of a stage that is not run: nothing sent, nothing paid.
NOT_RUN: dict[str, Any] = {
    "not_run": True,
    "counts": {"records": 0, "succeeded": 0, "failed": 0, "unparseable": 0},
    "tokens": {"input": 0, "output": 0},
    "cost": {"total_usd": 0.0},
}


def not_run_reason(stage: str, emptied_by: str | None) -> str:
    """Why a stage was not run: its filter, or the filter of a stage before it, kept no row."""
    if emptied_by is None:  # a summary written before `emptied_by` was recorded
        return f"stage {stage} not run: a filter kept no row"
    if emptied_by == stage:
        return f"stage {stage} not run: its filter kept no row"
    return f"stage {stage} not run: the filter of stage {emptied_by} kept no row"


def stage_report(stage: Stage, summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A stage's counts, tokens and cost for the pipeline summary."""
    return {
        **({"not_run": True} if summary.get("not_run") else {}),
        "stage": stage.name,
        "model_id": stage.model_id,
        "prompt_id": stage.prompt_id,
        "filter": stage.filter,
        "counts": summary.get("counts", {}),
        "tokens": summary.get("tokens", {}),
        "cost_usd": (summary.get("cost") or {}).get("total_usd"),
        **extra,
    }
