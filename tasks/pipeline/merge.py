"""Merge Bedrock batch outputs onto a shard's input rows: one Parquet row per input row."""

from __future__ import annotations

import functools
import json
import logging
import mmap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from prompt_templates import output_schema_for
from tasks.bedrock.families import family_for
from tasks.bedrock.manifest import MANIFEST_FILE, parse_manifest, token_totals
from tasks.errors import PlanError
from tasks.files import write_parquet_atomic
from tasks.pipeline import columns as C
from tasks.pipeline import tokens
from tasks.pipeline.attempts import AttemptOutput, Settled, settle
from tasks.pipeline.outputs import result_schema
from tasks.pipeline.plan import RunPlan
from tasks.pipeline.structured import SCHEMA_REPAIRED, OutputSchema
from tasks.pipeline.tokens import JobTokens
from tasks.run.layout import (
    JSONL,
    OUT_SUFFIX,
    OUTPUT_DIR,
    SKIPPED_FILE,
    input_file,
    output_file_name,
    part_name,
    shard_name,
)
from tasks.settings import get_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeStats:
    """Counts of one merged shard."""

    records: int
    succeeded: int
    failed: int
    # None where no count exists: rows without tokens and no manifest of their job.
    input_tokens: int | None
    output_tokens: int | None
    # Output lines that reached no row (records the job did not carry, unreadable ids).
    stray_lines: int = 0


@functools.cache
def _turns(workers: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(workers)


class MergeTurn:
    """One of this process's ``BEDROCK_BATCH_MERGE_WORKERS`` turns to merge a shard.

    A shard takes a turn before it reads its job's outputs into memory and gives it back once
    its part is written (or while a retry job of its runs), so jobs that end together (a run
    resumed after they all finished) merge a few at a time instead of all at once: memory
    bounded by the turns, not the gate, and the threads that submit the next jobs are not
    starved by a crowd of merges.
    """

    def __init__(self) -> None:
        self._turns = _turns(get_settings().merge.workers)
        self._held = False

    def take(self) -> None:
        """Wait for a turn, unless this one holds it already."""
        if not self._held:
            self._turns.acquire()
            self._held = True

    def give_back(self) -> None:
        """Let the next shard merge (a no-op when no turn is held)."""
        if self._held:
            self._held = False
            self._turns.release()

    def __enter__(self) -> MergeTurn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.give_back()


def write_part(
    frame: pl.DataFrame, dest: Path, stray_lines: int = 0, usage: pl.DataFrame | None = None
) -> MergeStats:
    """Write a merged part atomically and count what it holds (and the lines it could not).

    ``usage``: the part's tokens as the run counts them (`tokens.tally`, with the manifest
    totals of jobs whose rows carry no counts and the paid answers a later attempt replaced);
    a shard's merge prices the same table. By default the rows' own counts.
    """
    write_parquet_atomic(frame, dest)
    if usage is None:
        usage = tokens.tally(frame.lazy()).collect()
    return replace(_stats(frame, usage), stray_lines=stray_lines)


def settle_warnings(settled: Settled, where: str) -> list[str]:
    """What to tell the user of output lines that reached no row of `where`, or that a record
    had twice."""
    said = []
    if settled.stray_lines:
        examples = ", ".join(settled.stray_examples)
        unreadable = (
            f"{settled.unreadable_ids} without a readable recordId"
            if settled.unreadable_ids
            else ""
        )
        detail = "; ".join(d for d in (f"e.g. {examples}" if examples else "", unreadable) if d)
        said.append(
            f"{settled.stray_lines} output lines of {where} name no record its job sent "
            f"({detail}): their answers are not in the output. Outputs of another job or run in "
            "this job's output folder?"
        )
    if settled.repeated:
        # AWS documents one output line a record; the row keeps one of them, and which one
        # was not the user's choice, so they hear of it.
        said.append(
            f"{settled.repeated} records of {where} have more than one line in their job's "
            f"output (e.g. {', '.join(settled.repeated_examples)}): each row keeps its record's "
            "first answer that succeeded (else its first error); the others are not in the "
            "output."
        )
    return said


def _stats(frame: pl.DataFrame, usage: pl.DataFrame) -> MergeStats:
    row = frame.select(
        pl.len().alias("records"),
        pl.col(C.ERROR_CODE).is_null().sum().alias("succeeded"),
    ).row(0, named=True)
    # Cohere Embed's rows carry no tokens: a sum of their nulls said 0 tokens.
    tokens_in, tokens_out = tokens.totals(usage)
    return MergeStats(
        records=row["records"],
        succeeded=row["succeeded"],
        failed=row["records"] - row["succeeded"],
        input_tokens=tokens_in,
        output_tokens=tokens_out,
    )


def merge_shard(
    rows_file: Path,
    outputs: list[Path | bytes],
    model_id: str,
    invocation_type: str,
    dest: Path,
    job_id: str | None = None,
    job_error: tuple[str, str] | None = None,
    output_schema: OutputSchema | None = None,
    options: dict | None = None,
    job_tokens: JobTokens | None = None,
) -> MergeStats:
    """Write `dest` Parquet: every row of `rows_file` once, with its output or its error.

    Args:
        rows_file: the shard's rows Parquet written by preprocess.
        outputs: the job's `.out` JSONL files (paths or their bytes); may be empty.
        model_id: the model the job ran, to pick the output parser.
        invocation_type: "InvokeModel" or "Converse".
        dest: Parquet file to write (atomically: a temp file, then a rename).
        job_id: the Bedrock job id, written to the job_id column.
        job_error: (code, message) for rows without output, e.g. a Failed or Expired job.
        output_schema: the template's output schema, if any.
        options: the plan's inference options (the embedding types to read).
        job_tokens: the manifest totals of jobs whose rows carry no token counts.

    Returns:
        Counts of records, successes, failures and tokens.
    """
    attempt = AttemptOutput(1, outputs, job_id=job_id, job_error=job_error)
    settled = settle(rows_file, [attempt], model_id, invocation_type, output_schema, options)
    for warning in settle_warnings(settled, dest.stem):
        logger.warning("%s", warning)
    usage = tokens.with_manifests(tokens.tally(settled.frame.lazy()).collect(), job_tokens)
    return write_part(settled.frame, dest, settled.stray_lines, usage)


def merge_skipped(
    rows_file: Path,
    model_id: str,
    invocation_type: str,
    dest: Path,
    output_schema: OutputSchema | None = None,
    options: dict | None = None,
) -> MergeStats:
    """Write the rows preprocess skipped (on_missing="skip") with the output's columns."""
    family = family_for(model_id, invocation_type, options)
    rows = pl.scan_parquet(rows_file)
    names = rows.collect_schema().names()
    schema = result_schema(family, output_schema)
    if output_schema is not None:
        schema[SCHEMA_REPAIRED] = pl.Boolean()
    frame = (
        rows.with_columns(
            pl.lit(C.SERVED_SKIPPED).alias(C.SERVED_BY), pl.lit(0, dtype=pl.Int32).alias(C.ATTEMPTS)
        )
        .select(
            *[c for c in names if c not in schema],
            *[
                (pl.col(n) if n in names or n in (C.SERVED_BY, C.ATTEMPTS) else pl.lit(None))
                .cast(dtype)
                .alias(n)
                for n, dtype in schema.items()
            ],
        )
        .collect()
    )
    return write_part(frame, dest)


ECHO_SAMPLE = 2


def _sent_line(input_file: Path, record_id: str) -> dict | None:
    """The input line of ``record_id``, found by its start (our lines begin with their id;
    a quote inside a JSON string is escaped, so the prefix cannot occur elsewhere)."""
    prefix = f'{{"recordId":{json.dumps(record_id)},'.encode()
    with (
        open(input_file, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm,
    ):
        start = mm.find(prefix)
        if start < 0:
            return None
        end = mm.find(b"\n", start)
        return json.loads(mm[start : end if end >= 0 else len(mm)])


def _check_echo(input_file: Path, output_file: Path) -> None:
    """A few output lines must echo the modelInput this run sent for their record id.

    Outputs are matched to shards by file name and record ids are row positions, so every
    run has the same ones: outputs of another run (another prompt, model or source order)
    filled the rows with other prompts' answers and the merge said every row had an output.
    A memory-mapped search for each sampled id's line, ~10 ms a 70 MB shard.
    """
    echoed: dict[str, object] = {}
    with open(output_file, "rb") as handle:
        for raw in handle:
            if len(echoed) == ECHO_SAMPLE:
                break
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # the merge reports bad lines as it parses them
            if isinstance(line, dict) and isinstance(line.get("recordId"), str):
                echoed[line["recordId"]] = line.get("modelInput")
    if not echoed or input_file.stat().st_size == 0:
        return
    for rid, body in echoed.items():
        sent = _sent_line(input_file, rid)
        if sent is None or (body is not None and body != sent.get("modelInput")):
            why = (
                "is not a record of it"
                if sent is None
                else "echoes a modelInput other than the one this run sent"
            )
            msg = (
                f"{output_file} is not the output of {input_file.name}: record {rid} {why} "
                "(outputs of another run, prompt or model?). Point --outputs at this run's "
                "job outputs."
            )
            raise PlanError(msg)


@dataclass(frozen=True)
class OfflineMerge:
    """What an offline merge wrote: its parts, and each part's counts in the same order."""

    parts: list[Path]
    stats: list[MergeStats]

    @property
    def tokens(self) -> tuple[int | None, int | None]:
        """(input, output) tokens of every part; None where any part's are unknown."""
        ins = [s.input_tokens for s in self.stats]
        outs = [s.output_tokens for s in self.stats]
        if None in ins or None in outs:
            return None, None
        return sum(ins), sum(outs)  # type: ignore[arg-type]


def _manifest_tokens(job_dir: Path, job_id: str) -> JobTokens:
    """The job's manifest totals, when its downloaded ``manifest.json.out`` is readable.

    As the flow does (`tasks.run.shard._read_manifest`): one read a job, for families whose
    rows count no tokens; a missing or unreadable manifest leaves the job's tokens unknown.
    """
    path = job_dir / MANIFEST_FILE
    try:
        manifest = parse_manifest(path.read_bytes())
    except OSError:
        manifest = None
    if manifest is None:
        logger.warning("No readable manifest at %s: the tokens of job %s are unknown", path, job_id)
        return {}
    return {job_id: token_totals(manifest)}


def merge_offline(
    run_dir: Path, outputs_dir: Path, on_part: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Merge the `*.jsonl.out` files under `outputs_dir` onto the shards of `run_dir`.

    The Parquet files written (see `merge_offline_run`).
    """
    return merge_offline_run(run_dir, outputs_dir, on_part).parts


def merge_offline_run(
    run_dir: Path, outputs_dir: Path, on_part: Callable[[int, int], None] | None = None
) -> OfflineMerge:
    """Merge the `*.jsonl.out` files under `outputs_dir` onto the shards of `run_dir`.

    Outputs are found at any depth (Bedrock writes `<jobId>/<input file>.out`) and matched to
    shards by input file name; the job id is the folder they sit in. A shard without output
    gets MissingOutput errors, so every input row is in `run_dir/output/`. ``on_part`` is
    called with (parts done, parts in all) as each part is written, for progress. For a
    family whose outputs count no tokens (Cohere Embed), each job's tokens are those of the
    ``manifest.json.out`` Bedrock wrote beside its outputs, when it was downloaded too.

    Returns:
        The Parquet files written (`output/part-NNNNN.parquet` per shard, plus
        `output/skipped.parquet` when preprocess skipped rows) and their counts.
    """
    run_dir, outputs_dir = Path(run_dir), Path(outputs_dir)
    plan = RunPlan.load(run_dir)
    if not outputs_dir.is_dir():
        msg = f"Outputs folder {outputs_dir} does not exist; point --outputs at the job outputs."
        raise PlanError(msg)
    by_name = {output_file_name(s.input_file): s for s in plan.shards}
    found: dict[int, list[Path]] = {}
    job_ids: dict[int, str] = {}
    for path in sorted(outputs_dir.rglob(f"*{JSONL}{OUT_SUFFIX}")):
        shard = by_name.get(path.name)
        if shard is None:
            logger.warning("%s matches no shard of %s; skipped", path, run_dir)
            continue
        found.setdefault(shard.index, []).append(path)
        if path.parent != outputs_dir:
            job_ids[shard.index] = path.parent.name
    for index, paths in found.items():
        shard = plan.shards[index]
        if len(paths) > 1:
            # Two jobs' outputs for one shard (a job and its resubmission): merged together, the
            # rows took the last folder's job id, and answers of both.
            msg = (
                f"{len(paths)} output files under {outputs_dir} are for {shard.input_file}: "
                f"{', '.join(str(p) for p in paths)}. Keep the one job's outputs to merge."
            )
            raise PlanError(msg)
        for path in paths:
            _check_echo(run_dir / shard.input_file, path)
    if not found:
        msg = (
            f"No output under {outputs_dir} matches the shards of {run_dir} (expected files "
            f"named like {next(iter(by_name), output_file_name(input_file(shard_name(0))))})."
        )
        raise PlanError(msg)
    written = [run_dir / OUTPUT_DIR / part_name(shard.index) for shard in plan.shards]
    # Parts of an earlier plan in the same folder (preprocessed again with fewer shards) were
    # left beside the new ones: reading the folder gave their rows twice.
    keep = {p.name for p in written} | ({SKIPPED_FILE} if plan.skipped_file else set())
    for stale in (run_dir / OUTPUT_DIR).glob("*.parquet"):
        if stale.name not in keep:
            logger.warning("%s is not a part of this plan; removed", stale)
            stale.unlink()
    # One shard's plan does not keep every core busy (decoding, joining and writing Parquet
    # are partly serial), so shards are merged side by side; memory grows with the workers,
    # not with the number of shards.
    reports_tokens = family_for(plan.model_id, plan.invocation_type).reports_tokens
    manifests: dict[int, JobTokens] = {}
    if not reports_tokens:
        for index, job_id in job_ids.items():
            manifests[index] = _manifest_tokens(found[index][0].parent, job_id)
    workers = get_settings().merge.workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
        merges = [
            pool.submit(
                merge_shard,
                run_dir / shard.rows_file,
                found.get(shard.index, []),
                plan.model_id,
                plan.invocation_type,
                dest,
                job_id=job_ids.get(shard.index),
                output_schema=output_schema_for(plan.prompt_id),
                options=plan.options,
                job_tokens=manifests.get(shard.index),
            )
            for shard, dest in zip(plan.shards, written, strict=True)
        ]
        stats: list[MergeStats] = []
        try:
            for done, merge in enumerate(merges, start=1):
                stats.append(merge.result())
                if on_part:
                    on_part(done, len(merges))
        except BaseException:
            for merge in merges:
                merge.cancel()
            raise
    if plan.skipped_file:
        dest = run_dir / OUTPUT_DIR / SKIPPED_FILE
        skipped = merge_skipped(
            run_dir / plan.skipped_file,
            plan.model_id,
            plan.invocation_type,
            dest,
            output_schema_for(plan.prompt_id),
            plan.options,
        )
        written.append(dest)
        stats.append(skipped)
    return OfflineMerge(written, stats)
