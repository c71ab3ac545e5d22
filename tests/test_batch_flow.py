"""End-to-end runs of the batch flow on the local stack (moto + the Bedrock emulator)."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path

import boto3
import polars as pl
import pytest
from helpers import assert_answers_match_rows, eventually, job_spans, peak_in_flight
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, LogFilter
from prefect.client.schemas.sorting import ArtifactSort

from flows.batch_inference import batch_inference
from tasks.aws.clients import reset_clients
from tasks.errors import MissingColumnsError
from tasks.monitoring.events import (
    JOB_MERGED,
    JOB_RESOURCE_PREFIX,
    JOB_STATUS_CHANGED,
    JOB_SUBMITTED,
    RUN_FINISHED,
    RUN_RESOURCE_PREFIX,
    read_events,
)
from tasks.pipeline import attempts as attempts_module
from tasks.pipeline.columns import (
    ATTEMPTS,
    EMBEDDING,
    ERROR_CODE,
    ERROR_MESSAGE,
    RECORD_ID,
    RESPONSE_TEXT,
    SERVED_BY,
)
from tasks.run import gate
from tasks.run import shard as shard_module
from tasks.run.params import BatchParams, InferenceOverrides

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"


def _topics(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic number {i} {{with braces}}" for i in range(n)]}).write_csv(path)
    return path


def _text_params(tmp_path: Path, run_name: str, rows: int, **overrides) -> BatchParams:
    """A joke_about_topic run over `rows` generated topics, written under tmp_path/out."""
    return BatchParams(
        source=str(_topics(tmp_path, rows)),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name=run_name,
        **overrides,
    )


def _question_params(tmp_path: Path, run_name: str, rows: int, **overrides) -> BatchParams:
    """A question_answering run whose every prompt starts with its row's own text (Q0000 ...),
    so ``assert_answers_match_rows`` can tell each row's answer from another's."""
    source = tmp_path / "questions.csv"
    pl.DataFrame({"source": [f"Q{i:04d} what is {i} + 1?" for i in range(rows)]}).write_csv(source)
    return BatchParams(
        source=str(source),
        prompt_id="question_answering",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name=run_name,
        **overrides,
    )


def _artifacts(key: str) -> list:
    """Every version of an artifact, newest first."""
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key={"any_": [key]}), sort=ArtifactSort.CREATED_DESC
        )


def _artifact(key: str):
    return _artifacts(key)[0]


def test_batch_inference_text_never_exceeds_gate_and_returns_every_row(stack, tmp_path):
    # Each 100-record job takes ~4 s: two overlap even on a loaded machine, and without the
    # gate all three would. (At ~2 s they once did not: the busy test server answered the
    # second shard's slot ask with a 503 after 1.8 s, and its job began as the first ended.)
    stack.configure(records_per_second=25)
    # Slots an earlier test of this worker left on the shared model gate (a run killed on the
    # test server, which frees no expired lease) are not this run's: it must give back its own.
    model_gate, _, run_gate = gate.ensure_gates(CLAUDE, "gate-test", 2)
    left_before = gate.active_slots(model_gate)
    params = _text_params(
        tmp_path,
        "gate-test",
        300,
        max_concurrent_jobs=2,
        max_records_per_job=100,
    )

    summary = batch_inference(params)

    jobs = stack.ledger(name_contains="gate-test")
    assert len(jobs) == 3
    assert peak_in_flight(job_spans(stack, [job["jobArn"] for job in jobs])) == 2
    assert (gate.active_slots(model_gate), gate.active_slots(run_gate)) == (left_before, 0)
    out = pl.read_parquet(summary["parts"])
    assert out.height == 300
    assert out[RECORD_ID].n_unique() == 300
    assert out["topic"].sort().to_list() == sorted(
        f"topic number {i} {{with braces}}" for i in range(300)
    )
    assert out[RESPONSE_TEXT].null_count() == 0
    assert summary["counts"] == {"records": 300, "succeeded": 300, "failed": 0, "unparseable": 0}
    assert all(job["duration_s"] is not None and job["duration_s"] >= 0 for job in summary["jobs"])
    versions = _artifacts("bedrock-batch-gate-test-jobs")
    assert len(versions) >= 2  # published while the jobs ran, not only at the end
    *rows, total = json.loads(versions[0].data)
    assert [row["ok"] for row in rows] == ["100", "100", "100"]
    assert (total["ok"], total["status"]) == ("300", "3 of 3 merged")
    output_note = _artifact("bedrock-batch-gate-test-output").data
    assert f"{(tmp_path / 'out' / 'gate-test' / 'output').resolve()}/" in output_note
    assert "data:image/svg+xml;base64," in _artifact("bedrock-batch-gate-test-timeline").data
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(
            next(a.flow_run_id for a in versions if a.flow_run_id is not None)
        )
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                type={"any_": ["progress"]}, flow_run_id={"any_": [flow_run.id]}
            )
        )
    assert flow_run.name == "gate-test"
    assert [p.data for p in progress] == [100.0]
    assert summary["tokens"]["input"] > 0 and summary["tokens"]["output"] > 0


def test_batch_inference_embeddings_are_float32_lists(stack, tmp_path):
    source = tmp_path / "reviews.jsonl"
    pl.DataFrame({"input_text": [f"review {i}: fine product" for i in range(120)]}).write_ndjson(
        source
    )
    params = BatchParams(
        source=str(source),
        model_id=TITAN,
        output_uri=str(tmp_path / "out"),
        run_name="embed-test",
        inference=InferenceOverrides(dimensions=256),
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert out.height == 120
    assert out.schema[EMBEDDING] == pl.List(pl.Float32)
    assert out[EMBEDDING].list.len().unique().to_list() == [256]


def test_batch_inference_record_errors_become_columns(stack, tmp_path):
    stack.set_faults(record_error_rate=0.2, seed=7)
    params = _text_params(
        tmp_path,
        "record-errors",
        200,
        max_attempts=1,
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    failed = out.filter(pl.col(ERROR_CODE).is_not_null())
    assert out.height == 200
    assert 10 < failed.height < 80
    assert failed[RESPONSE_TEXT].null_count() == failed.height
    assert failed[ERROR_MESSAGE].null_count() == 0
    assert summary["counts"]["failed"] == failed.height


def test_batch_inference_retries_throttled_records_on_demand(stack, tmp_path):
    stack.set_faults(record_error_rate=0.1, seed=3)
    params = _text_params(
        tmp_path,
        "retry-on-demand",
        200,
        on_demand_rps=100,
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    on_demand = out.filter(pl.col(SERVED_BY) == "on_demand")
    assert out.height == 200
    assert out[ERROR_CODE].null_count() == 200
    assert 0 < on_demand.height < 60
    assert on_demand[ATTEMPTS].unique().to_list() == [2]
    jobs = stack.ledger(name_contains="retry-on-demand")
    assert [job["jobName"].rsplit("-", 1)[-1] for job in jobs] == ["a1", "a1"]


def test_batch_inference_retry_of_large_remainder_is_a_batch_job(stack, tmp_path):
    stack.set_faults(partial_job_names_containing="-a1", partial_fraction=0.5)
    params = _text_params(
        tmp_path,
        "retry-batch",
        300,
        max_concurrent_jobs=1,
        on_demand=False,
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert out.height == 300
    assert out[ERROR_CODE].null_count() == 300
    assert out.filter(pl.col(ATTEMPTS) == 2).height == 150
    jobs = stack.ledger(name_contains="retry-batch")
    assert sorted(j["recordCount"] for j in jobs) == [150, 300]


def test_batch_inference_failed_job_marks_its_rows(stack, tmp_path):
    stack.set_faults(fail_job_names_containing="shard-00001")
    params = _text_params(
        tmp_path,
        "failed-job",
        200,
        max_records_per_job=100,
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert out.height == 200
    failed = out.filter(pl.col(ERROR_CODE) == "Failed")
    assert failed.height == 100
    assert failed[ATTEMPTS].unique().to_list() == [3]
    assert {job["status"] for job in summary["jobs"]} == {"Completed", "Failed"}
    assert len(stack.ledger(name_contains="failed-job-shard-00001")) == 3


def test_records_still_failed_after_the_last_attempt_are_a_warning(stack, tmp_path):
    # The run completes with these rows failed; at INFO among the job statuses the one line
    # that says so was not there at all.
    stack.set_faults(
        fail_job_names_containing="gave-up-shard-00001", fail_message="Boom (emulated)"
    )
    params = _text_params(tmp_path, "gave-up", 200, max_records_per_job=100, max_attempts=2)

    state = batch_inference(params, return_state=True)

    flow_run_id = state.state_details.flow_run_id
    log_filter = LogFilter(flow_run_id={"any_": [flow_run_id]}, level={"ge_": logging.WARNING})
    with get_client(sync_client=True) as client:

        def gave_up() -> list[str]:
            logs = client.read_logs(log_filter=log_filter, limit=50)
            return [log.message for log in logs if "after 2 attempts" in log.message]

        said = eventually(gave_up, what="the warning reaching the server")
    assert len(said) == 1
    assert "100 records of shard-00001" in said[0]
    assert "Failed ×100" in said[0]
    assert "Boom (emulated)" in said[0]


def test_progress_of_a_resumed_run_counts_the_shards_merged_before(stack, tmp_path, monkeypatch):
    # A resumed run's bar started at 0 % however many shards were merged before the crash,
    # and moved only with the new jobs until it jumped to 100 % at the end.
    from tasks.run import progress as progress_module

    params = _text_params(tmp_path, "resumed-bar", 200, max_records_per_job=100)
    merge = shard_module.merge_shard_output

    def crash_one(ctx, shard, *args):
        if shard.name == "shard-00001":
            raise RuntimeError("crash while merging shard-00001")
        return merge(ctx, shard, *args)

    monkeypatch.setattr(shard_module, "merge_shard_output", crash_one)
    with pytest.raises(RuntimeError, match="crash while merging"):
        batch_inference(params)
    monkeypatch.setattr(shard_module, "merge_shard_output", merge)
    created: list[float] = []
    real_create = progress_module.create_progress_artifact

    def record_create(progress, **kwargs):
        created.append(progress)
        return real_create(progress=progress, **kwargs)

    monkeypatch.setattr(progress_module, "create_progress_artifact", record_create)

    batch_inference(params)

    assert created == [50.0]  # shard-00000 of two was merged before the crash


def test_batch_inference_rerun_of_finished_run_creates_no_job(stack, tmp_path):
    params = _text_params(tmp_path, "rerun", 150)
    first = batch_inference(params)

    second = batch_inference(params)

    assert len(stack.ledger(name_contains="rerun")) == 1
    assert second["parts"] == first["parts"]


def test_batch_inference_missing_column_creates_no_job(stack, tmp_path):
    source = tmp_path / "wrong.csv"
    pl.DataFrame({"subject": ["a"] * 150}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name="bad-input",
    )

    with pytest.raises(MissingColumnsError, match="topic") as excinfo:
        batch_inference(params)

    assert "subject" in str(excinfo.value)
    assert stack.ledger(name_contains="bad-input") == []


def _wait_for_events(resource_id: str, expected: dict[str, int]) -> dict[str, list]:
    """Events are stored by the server shortly after they are emitted: poll, bounded."""
    by_name: dict[str, list] = {}

    def probe() -> bool:
        by_name.clear()
        for event in read_events(prefixes=["bedrock.batch."], resource_ids=[resource_id]):
            by_name.setdefault(event.event, []).append(event)
        return all(len(by_name.get(name, [])) >= n for name, n in expected.items())

    eventually(probe, fail=False)
    return by_name


def test_batch_inference_emits_lifecycle_events(stack, tmp_path):
    params = _text_params(
        tmp_path,
        "events-test",
        200,
        max_records_per_job=100,
    )

    summary = batch_inference(params)

    resource = RUN_RESOURCE_PREFIX + "events-test"
    by_name = _wait_for_events(resource, {JOB_SUBMITTED: 2, JOB_MERGED: 2, RUN_FINISHED: 1})
    assert len(by_name[JOB_SUBMITTED]) == 2
    assert len(by_name[JOB_MERGED]) == 2
    finished = by_name[RUN_FINISHED]
    assert len(finished) == 1
    assert finished[0].payload["counts"] == summary["counts"]
    assert finished[0].payload["output_uri"] == summary["output_uri"]
    statuses = {e.payload["status"] for e in by_name[JOB_STATUS_CHANGED]}
    assert "Completed" in statuses
    job_ids = {r.id for e in by_name[JOB_SUBMITTED] for r in e.related}
    assert any(i.startswith(JOB_RESOURCE_PREFIX) for i in job_ids)


def test_job_merged_event_names_the_job_and_model_after_an_on_demand_tail(stack, tmp_path):
    # Record errors leave each shard a tail under the job minimum, served on demand: the
    # shard's latest attempt has no job ARN, and its merged event named the job "" once.
    stack.set_faults(record_error_rate=0.1)
    params = _text_params(tmp_path, "merged-tail", 200, max_records_per_job=100)

    batch_inference(params)

    resource = RUN_RESOURCE_PREFIX + "merged-tail"
    merged = _wait_for_events(resource, {JOB_MERGED: 2})[JOB_MERGED]
    jobs = {j["jobArn"]: j["jobName"] for j in stack.ledger(name_contains="merged-tail")}
    assert len(merged) == 2
    for event in merged:
        assert event.payload["job_arn"] in jobs
        assert jobs[event.payload["job_arn"]].endswith(f"{event.payload['shard']}-a1")
        assert event.resource.get("bedrock.model-id") == CLAUDE
        related = {r.id for r in event.related}
        assert JOB_RESOURCE_PREFIX + event.payload["job_arn"].rsplit("/", 1)[-1] in related
        assert "bedrock.model." + CLAUDE in related
        assert JOB_RESOURCE_PREFIX not in related  # no job resource with an empty id


def test_batch_inference_s3_source_and_output(stack, tmp_path):
    s3 = boto3.client("s3", endpoint_url=stack.moto_url)
    body = _topics(tmp_path, 150).read_bytes()
    s3.put_object(Bucket=stack.bucket, Key="sources/topics.csv", Body=body)
    params = BatchParams(
        source=f"s3://{stack.bucket}/sources/topics.csv",
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=f"s3://{stack.bucket}/runs",
        run_name="s3-run",
    )

    summary = batch_inference(params)

    assert summary["output_uri"] == f"s3://{stack.bucket}/runs/s3-run/output"
    keys = {
        obj["Key"]
        for obj in s3.list_objects_v2(Bucket=stack.bucket, Prefix="runs/s3-run/")["Contents"]
    }
    assert "runs/s3-run/output/part-00000.parquet" in keys
    assert {"runs/s3-run/plan.json", "runs/s3-run/state.json"} <= keys
    part = s3.get_object(Bucket=stack.bucket, Key="runs/s3-run/output/part-00000.parquet")
    out = pl.read_parquet(part["Body"].read())
    assert out.height == 150
    assert out[ERROR_CODE].null_count() == 150


def test_batch_inference_logs_and_artifacts_hold_no_prompt_or_secret(stack, tmp_path, monkeypatch):
    secret = "sk-ExampleSecretValue-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    reset_clients()
    source = tmp_path / "private.csv"
    pl.DataFrame({"topic": [f"PRIVATE-PROMPT-{i}" for i in range(120)]}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name="no-leaks",
    )

    state = batch_inference(params, return_state=True)

    flow_run_id = state.state_details.flow_run_id
    log_filter = LogFilter(flow_run_id={"any_": [flow_run_id]})
    with get_client(sync_client=True) as client:

        def finished_logs() -> list:
            logs = client.read_logs(log_filter=log_filter, limit=200)
            return logs if any("Finished in state" in log.message for log in logs) else []

        logs = eventually(finished_logs, what="the flow's logs reaching the server")
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id={"any_": [flow_run_id]})
        )
    text = "\n".join([log.message for log in logs] + [str(a.data) for a in artifacts])
    assert "PRIVATE-PROMPT" not in text
    assert secret not in text
    assert "no-leaks" in text


def test_batch_inference_run_name_date_placeholder_names_folder_and_jobs(stack, tmp_path):
    today = datetime.now(timezone.utc).strftime("%Y%m%d")

    summary = batch_inference(_text_params(tmp_path, "dated-{date}", 120))

    assert summary["run_name"] == f"dated-{today}"
    assert (tmp_path / "out" / f"dated-{today}" / "output").is_dir()
    # A job name is a digest of the run's identity, then the run name, shard and attempt.
    names = [job["jobName"].split("-", 1)[1] for job in stack.ledger(name_contains="dated-")]
    assert names == [f"dated-{today}-shard-00000-a1"]


def test_batch_inference_kms_key_encrypts_every_object_of_the_run(stack, tmp_path):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    s3 = boto3.client("s3", endpoint_url=stack.moto_url)
    params = BatchParams(
        source=str(_topics(tmp_path, 120)),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=f"s3://{stack.bucket}/kms-runs",
        run_name="kms-run",
        kms_key_id=key,
    )

    batch_inference(params)

    listing = s3.list_objects_v2(Bucket=stack.bucket, Prefix="kms-runs/kms-run/")["Contents"]
    keys = [obj["Key"] for obj in listing]
    assert any(k.endswith(".jsonl.out") for k in keys)  # Bedrock's own outputs
    assert any(k.endswith("part-00000.parquet") for k in keys)
    for name in keys:
        head = s3.head_object(Bucket=stack.bucket, Key=name)
        assert head.get("ServerSideEncryption") == "aws:kms", name
        assert head.get("SSEKMSKeyId") == key, name


def test_jobs_that_end_together_merge_one_turn_at_a_time(stack, tmp_path, environment, monkeypatch):
    """A shard holds its job's outputs in memory from their reading to its part's write: with
    BEDROCK_BATCH_MERGE_WORKERS=1 no two shards of the process do at once, however many of
    their jobs end together, and every row still comes back once."""
    environment({"BEDROCK_BATCH_MERGE_WORKERS": "1"})
    stack.configure(records_per_second=25)  # 100-record jobs of ~4 s: they overlap
    holding: set[str] = set()
    peak = 0
    changed = threading.Condition()
    read_outputs, merge_output = shard_module._attempt_output, shard_module.merge_shard_output

    def read(ctx, shard, attempt, files):
        nonlocal peak
        with changed:
            holding.add(shard.name)
            peak = max(peak, len(holding))
            changed.notify_all()
        return read_outputs(ctx, shard, attempt, files)

    def merge(ctx, shard, *args):
        with changed:  # a job that ended meanwhile has this long to read its outputs too
            changed.wait_for(lambda: len(holding) > 1, timeout=2)
        try:
            return merge_output(ctx, shard, *args)
        finally:
            with changed:
                holding.discard(shard.name)

    monkeypatch.setattr(shard_module, "_attempt_output", read)
    monkeypatch.setattr(shard_module, "merge_shard_output", merge)
    params = _question_params(
        tmp_path, "merge-turns", 300, max_concurrent_jobs=3, max_records_per_job=100
    )

    summary = batch_inference(params)

    jobs = stack.ledger(name_contains="merge-turns")
    # (A busy test server may answer a slot ask late, so not all three need overlap.)
    assert peak_in_flight(job_spans(stack, [job["jobArn"] for job in jobs])) >= 2
    assert peak == 1
    assert_answers_match_rows(pl.read_parquet(summary["parts"]), 300)


def test_a_shard_holds_no_job_output_while_its_retry_job_runs(stack, tmp_path, monkeypatch):
    """A retry job may queue for hours: its shard reads the first job's outputs again once the
    retry ends instead of holding them all that time. Each reading is parsed once, for the
    retry decision and the part alike, from files deleted right after (a parse from bytes in
    memory held twice as much)."""
    stack.set_faults(partial_job_names_containing="-a1", partial_fraction=0.5)
    parsed: list[int] = []  # the outputs parsed, one entry a job's
    parse = attempts_module.parse_outputs

    def counted(outputs, *args, **kwargs):
        parsed.append(len(outputs))
        return parse(outputs, *args, **kwargs)

    monkeypatch.setattr(attempts_module, "parse_outputs", counted)
    first_files: list[Path] = []
    while_retrying: list[list[bool]] = []  # whether each first output file is still there
    read_outputs, watch = shard_module._attempt_output, shard_module._watch

    def read(ctx, shard, attempt, files):
        output = read_outputs(ctx, shard, attempt, files)
        if attempt.attempt == 1 and not first_files:
            first_files.extend(output.outputs)
            assert all(path.stat().st_size for path in first_files)
        return output

    def watching(ctx, shard, attempt, look_now, logger):
        if attempt.attempt == 2:
            while_retrying.append([path.exists() for path in first_files])
        return watch(ctx, shard, attempt, look_now, logger)

    monkeypatch.setattr(shard_module, "_attempt_output", read)
    monkeypatch.setattr(shard_module, "_watch", watching)
    params = _question_params(tmp_path, "retry-memory", 300, max_concurrent_jobs=1, on_demand=False)
    stack.reset_api_calls()

    summary = batch_inference(params)

    assert first_files and all(isinstance(path, Path) for path in first_files)
    assert while_retrying == [[False] * len(first_files)]
    # The first job's outputs once to plan the retry, then both jobs' once for the part.
    assert len(parsed) == 3
    out = pl.read_parquet(summary["parts"])
    assert_answers_match_rows(out, 300)
    # The 150 records the first job failed were paid once more, by the retry job alone.
    assert out.filter(pl.col(ATTEMPTS) == 2).height == 150
    jobs = stack.ledger(name_contains="retry-memory")
    assert sorted(job["recordCount"] for job in jobs) == [150, 300]
    runtime = stack.api_calls()["operations"]
    assert [runtime.get(name, {}).get("calls", 0) for name in ("InvokeModel", "Converse")] == [0, 0]


def test_a_failed_shard_lets_the_jobs_in_flight_finish_and_merge(stack, tmp_path, monkeypatch):
    """One shard failing (here its create refused for good) while another's job runs.

    The flow raised at the first failure and closed the run's watcher under the shard still
    waiting on its job: that wait never ended, the task runner waited for it at the flow's
    exit, and the process hung for good (its job, hours long on Bedrock, ended unseen).
    """
    create = shard_module.create_job

    def refuse_one(request, backoff, logger, *args, **kwargs):
        if "shard-00001" in request.job_name:
            raise RuntimeError("refused for good")
        return create(request, backoff, logger, *args, **kwargs)

    monkeypatch.setattr(shard_module, "create_job", refuse_one)
    stack.configure(records_per_second=25.0)  # 100 records: ~4 s, long after the refusal
    params = _text_params(
        tmp_path, "failed-shard", 200, max_concurrent_jobs=2, max_records_per_job=100
    )
    outcome: dict = {}

    def run() -> None:
        try:
            batch_inference(params)
        except Exception as exc:  # noqa: BLE001 - what the flow raised is the test's subject
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(90)

    assert not thread.is_alive(), "the flow never returned after a shard failed"
    assert "refused for good" in str(outcome.get("error"))
    parts = sorted((tmp_path / "out" / "failed-shard" / "output").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet"]  # the job that ran was merged


def test_a_quota_held_by_a_running_job_longer_than_the_backoff_is_waited_out(
    stack, tmp_path, monkeypatch
):
    """Bedrock's quota below the gate, its one slot held by a job that outlasts the create
    backoff (Bedrock jobs run for hours; the default backoff spends ~35 min): the second
    shard's create failed with ServiceQuotaExceededException and so did the run."""
    from tasks.settings import get_settings

    monkeypatch.setenv("BEDROCK_BATCH_POLL_CREATE_BACKOFF_SECONDS", "0.0005")  # 2-3 s of retries
    get_settings.cache_clear()
    stack.set_faults(quota=1)
    stack.configure(records_per_second=25.0)  # 100 records: ~4 s
    params = _text_params(
        tmp_path, "quota-held", 200, max_concurrent_jobs=2, max_records_per_job=100
    )
    try:
        summary = batch_inference(params)
    finally:
        get_settings.cache_clear()

    assert pl.read_parquet(summary["parts"]).height == 200
    jobs = stack.ledger(name_contains="quota-held")
    assert sorted(job["jobName"][-14:] for job in jobs) == ["shard-00000-a1", "shard-00001-a1"]
