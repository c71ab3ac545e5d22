"""A run folder damaged between two runs (files deleted, emptied or cut), then the same run again:
it finishes with every row answered once and nothing paid twice, or stops naming the file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from helpers import assert_answers_match_rows

from flows.batch_inference import batch_inference
from tasks.aws import storage
from tasks.aws.clients import client
from tasks.errors import OutputsLostError, PlanError, RunIdentityError
from tasks.run.identity import RunIdentity
from tasks.run.layout import RunLayout, layout_for, shard_state_file, state_file_in
from tasks.run.params import BatchParams

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
ROWS = 300  # three shards of 100
SHARD = "shard-00001"


def _params(stack, tmp_path: Path, run_name: str, where: str, **overrides) -> BatchParams:
    """question_answering over rows whose prompts start with their own text (Q0000 ...)."""
    source = tmp_path / "questions.csv"
    pl.DataFrame({"source": [f"Q{i:04d} what is {i} + 1?" for i in range(ROWS)]}).write_csv(source)
    out = str(tmp_path / "out") if where == "local" else f"s3://{stack.bucket}/{tmp_path.name}"
    return BatchParams(
        source=str(source),
        prompt_id="question_answering",
        model_id=CLAUDE,
        output_uri=out,
        run_name=run_name,
        max_records_per_job=100,
        **overrides,
    )


def _finished(stack, tmp_path: Path, run_name: str, where: str) -> tuple[BatchParams, RunLayout]:
    params = _params(stack, tmp_path, run_name, where)
    batch_inference(params)
    return params, layout_for(params.output_uri, params.run_name)


def _remove(uri: str) -> None:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        client("s3").delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink()


def _output(layout: RunLayout) -> pl.DataFrame:
    parts = storage.list_files(layout.output_dir, ".parquet")
    frames = [pl.read_parquet(storage.read_bytes(uri)) for uri in parts]
    return pl.concat(frames, how="diagonal_relaxed")


def _jobs(stack, run_name: str) -> list[str]:
    """The run's jobs by shard and attempt, from the emulator's ledger of created jobs."""
    return sorted(job["jobName"].split("-", 1)[1] for job in stack.ledger(name_contains=run_name))


def _first_jobs(run_name: str) -> list[str]:
    return [f"{run_name}-shard-0000{i}-a1" for i in range(3)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_rerun_of_a_finished_run_whose_part_was_deleted_merges_it_again(stack, tmp_path, where):
    # The re-run said "already finished" and returned, its output short of the part's rows.
    params, layout = _finished(stack, tmp_path, f"part-gone-{where}", where)
    _remove(layout.part_uri(1))

    batch_inference(params)

    assert_answers_match_rows(_output(layout), ROWS)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


class _Killed(Exception):
    """Stands for a kill of the process, in process: nothing after it is written."""


def test_rerun_killed_before_merging_a_deleted_part_again_merges_it_next_time(
    stack, tmp_path, monkeypatch
):
    # The re-run that merges a deleted part again was killed before writing it: the next
    # re-run read the run as finished, returned the old summary and left the part missing.
    from tasks.run import shard as shard_module

    params, layout = _finished(stack, tmp_path, "part-gone-killed", "local")
    _remove(layout.part_uri(1))

    def killed(*args) -> None:
        raise _Killed

    with monkeypatch.context() as patched:
        patched.setattr(shard_module, "merge_shard_output", killed)
        with pytest.raises(_Killed):
            batch_inference(params)
    batch_inference(params)

    assert_answers_match_rows(_output(layout), ROWS)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


@pytest.mark.parametrize(("where", "cut"), [("local", "empty"), ("s3", "half")])
def test_rerun_with_a_shard_state_emptied_or_cut_adopts_its_job(stack, tmp_path, where, cut):
    # A disk that filled or a sync tool left state/shard-N.json empty or cut: the re-run
    # ended with a JSONDecodeError traceback. The compacted state.json is cut too.
    params, layout = _finished(stack, tmp_path, f"state-{cut}-{where}", where)
    for uri in (shard_state_file(layout.run_dir, SHARD), state_file_in(layout.run_dir)):
        data = storage.read_bytes(uri)
        storage.write_bytes(uri, b"" if cut == "empty" else data[: len(data) // 2])
    _remove(layout.part_uri(1))

    batch_inference(params)

    assert_answers_match_rows(_output(layout), ROWS)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


def _delete_job_outputs(layout: RunLayout, shard: str) -> str:
    """Delete a shard's `.jsonl.out` files (a lifecycle rule); the prefix they were under."""
    prefix = layout.bedrock_output_prefix(shard)
    outs = storage.list_files(prefix, ".jsonl.out")
    assert outs
    for uri in outs:
        _remove(uri)
    return prefix


@pytest.mark.parametrize("where", ["local", "s3"])
def test_rerun_whose_job_outputs_were_deleted_stops_before_paying_again(stack, tmp_path, where):
    # The state of a shard was lost and its job's outputs deleted: the re-run adopted the job,
    # found no answers and sent all 100 records again as a new job, paid twice, unsaid.
    params, layout = _finished(stack, tmp_path, f"outs-gone-{where}", where)
    _remove(shard_state_file(layout.run_dir, SHARD))
    _remove(state_file_in(layout.run_dir))
    _remove(layout.part_uri(1))
    prefix = _delete_job_outputs(layout, SHARD)

    with pytest.raises(OutputsLostError) as excinfo:
        batch_inference(params)

    message = str(excinfo.value)
    assert prefix in message and "lack 100 of the 100 records" in message
    assert "--resend-lost-outputs" in message
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)

    resent = params.model_copy(update={"resend_lost_outputs": True})
    batch_inference(resent)

    assert_answers_match_rows(_output(layout), ROWS)
    assert _jobs(stack, params.run_name) == sorted(
        [*_first_jobs(params.run_name), f"{params.run_name}-{SHARD}-a2"]
    )


def test_outputs_lost_are_found_when_the_jobs_end_came_without_counters(
    stack, tmp_path, monkeypatch
):
    # A job's end seen by its state-change event carries no counters: the check had no
    # processedRecordCount, and the deleted outputs' records were sent and paid again.
    from tasks.run import shard as shard_module

    params, layout = _finished(stack, tmp_path, "outs-gone-event", "local")
    _remove(shard_state_file(layout.run_dir, SHARD))
    _remove(state_file_in(layout.run_dir))
    _remove(layout.part_uri(1))
    _delete_job_outputs(layout, SHARD)
    watch = shard_module._watch

    def seen_by_event(ctx, shard, attempt, *args):
        watch(ctx, shard, attempt, *args)
        attempt.counters = {}  # as on_change leaves them for an event's job

    monkeypatch.setattr(shard_module, "_watch", seen_by_event)

    with pytest.raises(OutputsLostError, match="lack 100 of the 100 records"):
        batch_inference(params)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


def test_outputs_lost_of_a_retry_the_ceiling_held_then_admitted_stop_before_paying_again(
    stack, tmp_path, monkeypatch
):
    # The lost-outputs check counts a job's missing lines by the rows' `attempts`, which leaves
    # out a retry the ceiling held back: a held retry that a later run admits keeps its number
    # and is counted once it is sent, so its deleted outputs are found, not sent again.
    from tasks.pipeline.estimate import estimate_from_dir
    from tasks.pipeline.preprocess import preprocess_params
    from tasks.run import shard as shard_module
    from tasks.run.params import InferenceOverrides

    stack.set_faults(fail_job_names_containing=f"held-lost-{SHARD}-a1")
    params = _params(
        stack, tmp_path, "held-lost", "local", max_concurrent_jobs=1,
        inference=InferenceOverrides(max_tokens=20),
    )  # fmt: skip
    plan = preprocess_params(params, tmp_path / "probe")
    high = estimate_from_dir(plan, tmp_path / "probe", stack.client("bedrock-runtime")).cost_high
    held = params.model_copy(update={"max_cost_usd": round(high * 1.01, 8)})
    assert batch_inference(held)["cost"]["held_back_shards"] == [SHARD]
    layout = layout_for(params.output_uri, params.run_name)
    _remove(layout.part_uri(1))
    watch = shard_module._watch

    def outputs_deleted_after_the_job(ctx, shard, attempt, *args):
        watch(ctx, shard, attempt, *args)
        if attempt.attempt == 2:
            _delete_job_outputs(layout, SHARD)

    monkeypatch.setattr(shard_module, "_watch", outputs_deleted_after_the_job)
    admitted = params.model_copy(update={"max_cost_usd": round(high * 10, 8)})

    with pytest.raises(OutputsLostError, match="lack 100 of the 100 records"):
        batch_inference(admitted)
    assert _jobs(stack, params.run_name) == sorted(
        [*_first_jobs(params.run_name), f"{params.run_name}-{SHARD}-a2"]
    )


def test_rerun_whose_on_demand_answers_were_deleted_stops_before_paying_again(stack, tmp_path):
    # The kept answers of a shard's on-demand tail were deleted with its part: the re-run
    # merged the tail's records as MissingOutput and served them on demand again, paid twice
    # and unsaid (the lost-outputs check looked at batch jobs only).
    from tasks.run.state import RunStateStore

    stack.set_faults(record_error_rate=0.3, seed=5, record_error_job_names_containing="-a1")
    params = _params(stack, tmp_path, "tail-gone", "local", on_demand_rps=200)
    batch_inference(params)
    layout = layout_for(params.output_uri, params.run_name)
    tail = RunStateStore(layout.run_dir, params.run_name).state.shards[SHARD].attempts[-1]
    assert (tail.attempt, tail.served_by, tail.status) == (2, "on_demand", "Completed")
    prefix = layout.on_demand_prefix(tail.job_name)
    for uri in storage.list_files(prefix, ".jsonl.out"):
        _remove(uri)
    _remove(layout.part_uri(1))

    with pytest.raises(OutputsLostError) as excinfo:
        batch_inference(params)

    message = str(excinfo.value)
    assert prefix in message and f"lack {tail.records} of the {tail.records} records" in message
    assert len(RunStateStore(layout.run_dir, params.run_name).state.shards[SHARD].attempts) == 2


def test_rerun_whose_first_jobs_outputs_were_deleted_under_a_retry_stops_before_paying_again(
    stack, tmp_path
):
    # The check looked at the shard's last attempt only: with the first job's outputs deleted
    # and an on-demand tail after it, the re-run served the first job's answered records on
    # demand again, paid twice and unsaid.
    from tasks.run.state import RunStateStore

    stack.set_faults(record_error_rate=0.3, seed=5, record_error_job_names_containing="-a1")
    params = _params(stack, tmp_path, "first-gone", "local", on_demand_rps=200)
    batch_inference(params)
    layout = layout_for(params.output_uri, params.run_name)
    attempts = RunStateStore(layout.run_dir, params.run_name).state.shards[SHARD].attempts
    assert [a.served_by for a in attempts] == ["batch", "on_demand"]
    prefix = _delete_job_outputs(layout, SHARD)  # the first job's; the tail's are kept
    _remove(layout.part_uri(1))

    with pytest.raises(OutputsLostError) as excinfo:
        batch_inference(params)

    answered = 100 - attempts[1].records
    assert prefix in str(excinfo.value)
    assert f"lack {answered} of the 100 records" in str(excinfo.value)
    assert len(RunStateStore(layout.run_dir, params.run_name).state.shards[SHARD].attempts) == 2
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


def test_rerun_of_a_run_folder_copied_to_another_output_uri_reads_its_jobs_outputs(stack, tmp_path):
    # A local run folder copied elsewhere has a job prefix of its own: its shards looked for
    # their jobs' outputs there, found none and took the paid answers for lost.
    params, layout = _finished(stack, tmp_path, "copied", "local")
    moved = tmp_path / "elsewhere"
    shutil.copytree(layout.run_dir, moved / params.run_name)
    params = params.model_copy(update={"output_uri": str(moved)})
    copy = layout_for(params.output_uri, params.run_name)
    assert copy.job_prefix != layout.job_prefix
    _remove(copy.part_uri(1))  # merged again, from the outputs where its job wrote them

    batch_inference(params)

    assert_answers_match_rows(_output(copy), ROWS)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


@pytest.mark.parametrize(("where", "damage"), [("local", "deleted"), ("s3", "shard-0s")])
def test_rerun_whose_rows_file_was_deleted_or_replaced_rebuilds_it_from_the_source(
    stack, tmp_path, where, damage
):
    # A deleted rows/shard-N.parquet stopped the merge with "No such file or directory"; one
    # replaced by shard-0's file made two jobs of 0 records, then failed with "100 duplicated".
    params, layout = _finished(stack, tmp_path, f"rows-{damage}-{where}", where)
    rows = layout.rows_uri(SHARD)
    if damage == "deleted":
        _remove(rows)
    else:
        storage.write_bytes(rows, storage.read_bytes(layout.rows_uri("shard-00000")))
    _remove(layout.part_uri(1))

    batch_inference(params)

    assert_answers_match_rows(_output(layout), ROWS)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


def test_rerun_whose_rows_file_cannot_be_rebuilt_stops_naming_it(stack, tmp_path):
    # The source was edited in place with its size and time kept (the fingerprint trusts
    # them): the rows rebuilt from it are not the rows the jobs read, and must not be used.
    params, layout = _finished(stack, tmp_path, "rows-unprovable", "local")
    source = Path(params.source)
    stat = source.stat()
    source.write_text(source.read_text().replace("Q0150", "X0150"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _remove(layout.rows_uri(SHARD))
    _remove(layout.part_uri(1))

    with pytest.raises(PlanError) as excinfo:
        batch_inference(params)

    message = str(excinfo.value)
    assert layout.rows_uri(SHARD) in message and "nothing was sent" in message
    assert "put the file back" in message
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_rerun_whose_run_json_was_deleted_recovers_it_from_plan_and_state(stack, tmp_path, where):
    # The re-run stopped with "no recorded identity (made by an older version)" and pointed
    # at --restart, which pays for every shard again; plan and state still prove the run.
    params, layout = _finished(stack, tmp_path, f"identity-gone-{where}", where)
    key = stack.ledger(name_contains=params.run_name)[0]["jobName"].split("-", 1)[0]
    _remove(layout.identity_uri)
    _remove(layout.part_uri(1))

    batch_inference(params)

    assert_answers_match_rows(_output(layout), ROWS)
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)
    assert RunIdentity.from_json(storage.read_bytes(layout.identity_uri)).run_key == key


def test_rerun_whose_run_json_and_a_jobs_record_were_deleted_stops_naming_run_json(stack, tmp_path):
    # Without its state a shard would look for its job under a new incarnation's name and pay
    # again: run.json cannot be recovered, and the message names it and the way on.
    params, layout = _finished(stack, tmp_path, "identity-and-state-gone", "local")
    for uri in (layout.identity_uri, shard_state_file(layout.run_dir, SHARD)):
        _remove(uri)
    _remove(state_file_in(layout.run_dir))

    with pytest.raises(RunIdentityError) as excinfo:
        batch_inference(params)

    message = str(excinfo.value)
    assert layout.identity_uri in message and "nothing was sent" in message
    assert f"-{SHARD}-a1" in message and "Put run.json back" in message
    assert _jobs(stack, params.run_name) == _first_jobs(params.run_name)
