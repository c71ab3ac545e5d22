"""Merge: outputs joined onto shard rows, exactly once per input row."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.errors import PlanError
from tasks.pipeline import columns as C
from tasks.pipeline import outputs
from tasks.pipeline.merge import MergeStats, merge_offline, merge_shard
from tasks.pipeline.preprocess import preprocess
from tasks.settings import QuotaSettings

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"


def claude_ok(record_id: str, text: str, tokens=(10, 2), model_input=None) -> str:
    output = {
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": tokens[0], "output_tokens": tokens[1]},
    }
    echo = {"big": "echo"} if model_input is None else model_input
    return json.dumps({"recordId": record_id, "modelInput": echo, "modelOutput": output})


def sent(run_dir: Path, input_file: str) -> dict[str, dict]:
    """Each record's modelInput as the run wrote it: what Bedrock echoes in its output line."""
    lines = (run_dir / input_file).read_text().splitlines()
    return {(line := json.loads(text))["recordId"]: line["modelInput"] for text in lines}


def error_line(record_id: str, code=400, message="Malformed input") -> str:
    error = {"errorCode": code, "errorMessage": message}
    return json.dumps({"recordId": record_id, "modelInput": {}, "error": error})


@pytest.fixture
def rows_file(tmp_path) -> Path:
    path = tmp_path / "rows.parquet"
    pl.DataFrame({"topic": ["a", "b", "c"], C.RECORD_ID: ["R0", "R1", "R2"]}).write_parquet(path)
    return path


def merge(rows_file, lines, tmp_path, model_id=CLAUDE, **kwargs):
    dest = tmp_path / "out" / "part-00000.parquet"
    data = ("\n".join(lines) + "\n").encode()
    stats = merge_shard(rows_file, [data], model_id, "InvokeModel", dest, **kwargs)
    return stats, pl.read_parquet(dest)


def test_merge_shard_joins_outputs_and_marks_missing_records(rows_file, tmp_path):
    lines = [claude_ok("R2", "joke c", (7, 3)), claude_ok("R0", "joke a")]
    stats, frame = merge(rows_file, lines, tmp_path, job_id="job1")
    expected = pl.DataFrame(
        {
            "topic": ["a", "b", "c"],
            C.RECORD_ID: ["R0", "R1", "R2"],
            C.RESPONSE_TEXT: ["joke a", None, "joke c"],
            C.STOP_REASON: ["end_turn", None, "end_turn"],
            C.INPUT_TOKENS: [10, None, 7],
            C.OUTPUT_TOKENS: [2, None, 3],
            C.ERROR_CODE: [None, C.MISSING_OUTPUT, None],
            C.ERROR_MESSAGE: [
                None,
                "No output line for this record (attempt 1, job job1).",
                None,
            ],
            C.RAW_OUTPUT: pl.Series([None, None, None], dtype=pl.String),
            C.JOB_ID: ["job1"] * 3,
            C.SERVED_BY: [C.SERVED_BATCH] * 3,
            C.ATTEMPTS: pl.Series([1, 1, 1], dtype=pl.Int32),
        },
        schema_overrides={C.INPUT_TOKENS: pl.Int64, C.OUTPUT_TOKENS: pl.Int64},
    )
    assert_frame_equal(frame, expected)
    assert stats == MergeStats(records=3, succeeded=2, failed=1, input_tokens=17, output_tokens=5)


def test_merge_shard_without_a_job_id_names_no_job_in_the_missing_output_message(
    rows_file, tmp_path
):
    # Outputs merged offline without their job folder have no job id: the message must not
    # read "job None".
    _, frame = merge(rows_file, [claude_ok("R0", "joke a")], tmp_path)
    assert frame[C.ERROR_MESSAGE].to_list() == [
        None,
        "No output line for this record (attempt 1).",
        "No output line for this record (attempt 1).",
    ]
    assert frame[C.RESPONSE_TEXT].to_list() == ["joke a", None, None]


def test_merge_shard_record_errors_become_columns(rows_file, tmp_path):
    lines = [claude_ok("R0", "x"), error_line("R1", 400, "Bad body"), error_line("R2", 429, "Slow")]
    stats, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.ERROR_CODE].to_list() == [None, "400", "429"]
    assert frame[C.ERROR_MESSAGE].to_list() == [None, "Bad body", "Slow"]
    assert frame[C.RESPONSE_TEXT].to_list() == ["x", None, None]
    assert stats.failed == 2


def test_merge_shard_duplicate_lines_collapse_preferring_success(rows_file, tmp_path):
    lines = [error_line("R0"), claude_ok("R0", "won"), claude_ok("R1", "b"), error_line("R2")]
    lines += [error_line("R2", 500, "again")]
    _, frame = merge(rows_file, lines, tmp_path)
    assert frame.height == 3
    assert frame[C.RECORD_ID].to_list() == ["R0", "R1", "R2"]
    assert frame[C.RESPONSE_TEXT].to_list() == ["won", "b", None]
    assert frame[C.ERROR_CODE][2] in ("400", "500")


def test_merge_shard_names_records_answered_twice(rows_file, tmp_path, caplog):
    # Two answers for one record in one job's output: the row kept the first success and
    # nobody heard of the other. The rows keep their own answers, and the user learns which.
    lines = [
        claude_ok("R0", "first"),
        claude_ok("R1", "b"),
        claude_ok("R0", "second"),
        error_line("R2"),
        error_line("R2", 500, "again"),
    ]
    with caplog.at_level("WARNING", logger="tasks.pipeline.merge"):
        stats, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.RESPONSE_TEXT].to_list() == ["first", "b", None]
    assert (stats.records, stats.succeeded, stats.stray_lines) == (3, 2, 0)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("2 records of part-00000 have more than one line")
    assert "(e.g. R0, R2)" in warning


def test_merge_shard_reads_output_lines_whatever_their_key_order(rows_file, tmp_path):
    output = json.loads(claude_ok("R0", "first"))["modelOutput"]
    error = {"errorCode": 400, "errorMessage": "Bad body"}
    lines = [
        json.dumps({"modelOutput": output, "modelInput": {"x": 1}, "recordId": "R0"}),
        json.dumps({"error": error, "recordId": "R1", "modelInput": {}}),
        '{ "modelInput" : {} , "recordId" : "R2" , "modelOutput" : '
        + json.dumps({**output, "content": [{"type": "text", "text": "spaced"}]})
        + " }",
    ]
    _, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.RESPONSE_TEXT].to_list() == ["first", None, "spaced"]
    assert frame[C.ERROR_CODE].to_list() == [None, "400", None]


def test_merge_shard_ignores_output_like_text_inside_the_echoed_input(rows_file, tmp_path):
    # The prompt quotes output-shaped JSON: escaped quotes and braces must not be read as keys.
    prompt = 'Repeat: {"recordId":"R2","modelOutput":{"content":[]},"error":{"errorCode":1}}'
    line = json.loads(error_line("R0", 400, 'Bad "body" {x}'))
    line["modelInput"] = {"messages": [{"role": "user", "content": prompt}]}
    lines = [json.dumps(line), claude_ok("R1", 'said "}{"')]
    _, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.ERROR_CODE].to_list() == ["400", None, C.MISSING_OUTPUT]
    assert frame[C.ERROR_MESSAGE][0] == 'Bad "body" {x}'
    assert frame[C.RESPONSE_TEXT].to_list() == [None, 'said "}{"', None]


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")], ids=["compact", "spaced"])
def test_merge_shard_output_keys_nested_in_the_echoed_input_are_not_the_record_s(
    rows_file, tmp_path, separators
):
    # Compact lines (Bedrock's) have the echo cut out before decoding; a body whose tool schema
    # names properties "error" and "modelOutput" must not be cut there, nor read as the record's.
    schema = {"properties": {"error": {"type": "string"}, "modelOutput": {"type": "object"}}}
    body = {"tools": [{"name": "t", "input_schema": schema}], "messages": ["a\\", '"}{,"']}
    output = json.loads(claude_ok("R0", "ok"))["modelOutput"]
    error = {"errorCode": 400, "errorMessage": "Bad body"}
    records = [
        {"recordId": "R0", "modelInput": body, "modelOutput": output},
        {"recordId": "R1", "modelInput": body, "error": error},
        {"recordId": "R2", "modelInput": {"text": ',"modelOutput":{'}, "modelOutput": output},
    ]
    lines = [json.dumps(r, separators=separators, ensure_ascii=False) for r in records]
    _, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.RESPONSE_TEXT].to_list() == ["ok", None, "ok"]
    assert frame[C.ERROR_CODE].to_list() == [None, "400", None]
    assert frame[C.ERROR_MESSAGE].to_list() == [None, "Bad body", None]


def test_merge_shard_compact_lines_of_every_kind_keep_their_own_results(
    rows_file, tmp_path, monkeypatch
):
    # The fast path: every line is cut; results, errors and the unparseable raw output hold,
    # and the lenient plan (whole lines by JSON path, many times slower) is never needed.
    def lenient(*args, **kwargs):
        raise AssertionError("compact lines fell back to the lenient plan")

    monkeypatch.setattr(outputs, "_lenient_lines", lenient)

    def compact(line: str) -> str:
        return json.dumps(json.loads(line), separators=(",", ":"), ensure_ascii=False)

    bad = {"recordId": "R2", "modelInput": {"p": "\u00e9 \U0001f600"}, "modelOutput": {"x": 1}}
    # A structured-output body: its tool schema names an "error" property, in every echo.
    ok = json.loads(claude_ok("R1", 'caf\u00e9 \U0001f600 "q"', (5, 6)))
    ok["modelInput"] = {"tools": [{"input_schema": {"properties": {"answer": {}, "error": {}}}}]}
    lines = [
        json.dumps(ok, separators=(",", ":"), ensure_ascii=False),
        json.dumps(
            {**json.loads(error_line("R0", 429, "Slow")), "modelInput": ok["modelInput"]},
            separators=(",", ":"),
        ),
        json.dumps(bad, separators=(",", ":"), ensure_ascii=False),
    ]
    stats, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.RESPONSE_TEXT].to_list() == [None, 'caf\u00e9 \U0001f600 "q"', None]
    assert frame[C.ERROR_CODE].to_list() == ["429", None, C.UNPARSEABLE_OUTPUT]
    assert json.loads(frame[C.RAW_OUTPUT][2]) == {"x": 1}
    assert (frame[C.INPUT_TOKENS][1], frame[C.OUTPUT_TOKENS][1]) == (5, 6)
    assert stats.succeeded == 1


def test_merge_shard_nested_error_key_in_model_output_is_not_a_record_error(rows_file, tmp_path):
    output = json.loads(claude_ok("R0", "ok"))["modelOutput"]
    output["content"].append({"type": "tool_use", "input": {"error": {"errorCode": "x"}}})
    lines = [json.dumps({"recordId": "R0", "modelInput": {}, "modelOutput": output})]
    _, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.ERROR_CODE][0] is None
    assert frame[C.RESPONSE_TEXT][0] == "ok"


def test_merge_shard_counts_and_names_output_lines_of_records_not_in_the_shard(
    rows_file, tmp_path, caplog
):
    # Lines of records the shard never sent (another job's outputs in its folder) reached no
    # row and were dropped without a word; a cut line without its recordId (Bedrock writes it
    # last) too. The rows keep their own answers, and the user learns how many and which.
    lines = [
        claude_ok("R9", "stray"),
        claude_ok("R0", "a"),
        claude_ok("RX1", "other"),
        '{"modelInput": {}, "modelOutput": {"content": [',
    ]
    with caplog.at_level("WARNING", logger="tasks.pipeline.merge"):
        stats, frame = merge(rows_file, lines, tmp_path)
    assert frame[C.RECORD_ID].to_list() == ["R0", "R1", "R2"]
    assert frame[C.RESPONSE_TEXT].to_list() == ["a", None, None]
    assert frame[C.ERROR_CODE].to_list() == [None, C.MISSING_OUTPUT, C.MISSING_OUTPUT]
    assert stats.stray_lines == 3
    warning = caplog.records[-1].getMessage()
    assert "3 output lines" in warning and "R9, RX1" in warning
    assert "1 without a readable recordId" in warning


def test_merge_shard_without_stray_lines_warns_nothing(rows_file, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tasks.pipeline.merge"):
        stats, _ = merge(rows_file, [claude_ok("R0", "a")], tmp_path)
    assert stats.stray_lines == 0
    assert not caplog.records


def test_merge_shard_job_error_marks_rows_without_output(rows_file, tmp_path):
    job_error = ("Expired", "The job expired before these records were processed.")
    stats, frame = merge(rows_file, [claude_ok("R1", "done")], tmp_path, job_error=job_error)
    assert frame[C.ERROR_CODE].to_list() == ["Expired", None, "Expired"]
    assert frame[C.ERROR_MESSAGE][0] == job_error[1]
    assert stats.succeeded == 1 and stats.failed == 2


def test_merge_shard_with_no_outputs_keeps_every_row(rows_file, tmp_path):
    dest = tmp_path / "p.parquet"
    stats = merge_shard(rows_file, [], CLAUDE, "InvokeModel", dest, job_error=("Failed", "x"))
    assert pl.read_parquet(dest)[C.ERROR_CODE].to_list() == ["Failed"] * 3
    assert stats.records == 3 and stats.succeeded == 0


def test_merge_shard_embeddings_are_float32_lists(rows_file, tmp_path):
    lines = [
        json.dumps(
            {
                "recordId": r,
                "modelOutput": {"embedding": [0.5, 1.5] * 128, "inputTextTokenCount": 2},
            }
        )
        for r in ("R0", "R1", "R2")
    ]
    stats, frame = merge(rows_file, lines, tmp_path, model_id=TITAN)
    assert frame.schema[C.EMBEDDING] == pl.List(pl.Float32)
    assert frame[C.EMBEDDING].to_list() == [[0.5, 1.5] * 128] * 3
    assert C.RESPONSE_TEXT not in frame.columns
    assert stats == MergeStats(records=3, succeeded=3, failed=0, input_tokens=6, output_tokens=0)


def test_merge_shard_writes_atomically_leaving_no_temp_file(rows_file, tmp_path):
    merge(rows_file, [claude_ok("R0", "a")], tmp_path)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-00000.parquet"]


def test_merge_offline_matches_outputs_to_shards_at_any_depth(tmp_path):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(9)]}).write_csv(source)
    quotas = QuotaSettings(min_records_per_job=3)
    run_dir = tmp_path / "run"
    plan = preprocess(
        str(source),
        model_id=CLAUDE,
        prompt_id="joke_about_topic",
        out_dir=run_dir,
        max_concurrent_jobs=3,
        quotas=quotas,
    )
    outputs = tmp_path / "outputs"
    for shard in plan.shards[:2]:
        job_dir = outputs / "prefix" / f"job{shard.index}"
        job_dir.mkdir(parents=True)
        ids = pl.read_parquet(run_dir / shard.rows_file)[C.RECORD_ID].to_list()
        echo = sent(run_dir, shard.input_file)
        lines = [claude_ok(r, f"joke {r}", model_input=echo[r]) for r in ids]
        (job_dir / (Path(shard.input_file).name + ".out")).write_text("\n".join(lines) + "\n")
    (outputs / "prefix" / "job0" / "manifest.json.out").write_text("{}")
    written = merge_offline(run_dir, outputs)
    assert [p.name for p in written] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    merged = pl.concat([pl.read_parquet(p) for p in written])
    assert merged.height == 9 and merged[C.RECORD_ID].n_unique() == 9
    assert merged[C.JOB_ID].to_list() == ["job0"] * 3 + ["job1"] * 3 + [None] * 3
    assert merged[C.ERROR_CODE].to_list() == [None] * 6 + [C.MISSING_OUTPUT] * 3


def test_merge_offline_writes_skipped_rows_with_their_error(tmp_path):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": ["a", None, "b", "c"]}).write_csv(source)
    run_dir = tmp_path / "run"
    plan = preprocess(
        str(source),
        model_id=CLAUDE,
        prompt_id="joke_about_topic",
        out_dir=run_dir,
        on_missing="skip",
        max_concurrent_jobs=1,
        quotas=QuotaSettings(min_records_per_job=1),
    )
    outputs = tmp_path / "outputs" / "j"
    outputs.mkdir(parents=True)
    echo = sent(run_dir, plan.shards[0].input_file)
    lines = [claude_ok(r, "ok", model_input=echo[r]) for r in echo]
    (outputs / "shard-00000.jsonl.out").write_text("\n".join(lines))
    written = merge_offline(run_dir, tmp_path / "outputs")
    assert [p.name for p in written] == ["part-00000.parquet", "skipped.parquet"]
    skipped = pl.read_parquet(written[1])
    assert skipped[C.RECORD_ID].to_list() == ["R0000000001"]
    assert skipped[C.SERVED_BY].to_list() == [C.SERVED_SKIPPED]
    assert skipped.columns == pl.read_parquet(written[0]).columns
    assert plan.skipped_records == 1


def test_merge_offline_without_matching_outputs_names_expected_files(tmp_path):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": ["a", "b"]}).write_csv(source)
    run_dir = tmp_path / "run"
    preprocess(
        str(source),
        model_id=CLAUDE,
        prompt_id="joke_about_topic",
        out_dir=run_dir,
        quotas=QuotaSettings(min_records_per_job=1),
    )
    (tmp_path / "outputs").mkdir()
    with pytest.raises(PlanError, match="shard-00000.jsonl.out"):
        merge_offline(run_dir, tmp_path / "outputs")


def test_merge_offline_without_plan_says_to_run_preprocess(tmp_path):
    with pytest.raises(PlanError, match="run preprocess"):
        merge_offline(tmp_path, tmp_path)


def test_merge_offline_truncated_output_line_is_unparseable_and_the_rest_merge(tmp_path):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(9)]}).write_csv(source)
    run_dir = tmp_path / "run"
    plan = preprocess(
        str(source),
        model_id=CLAUDE,
        prompt_id="joke_about_topic",
        out_dir=run_dir,
        max_concurrent_jobs=3,
        quotas=QuotaSettings(min_records_per_job=3),
    )
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    broken = None
    for shard in plan.shards:
        ids = pl.read_parquet(run_dir / shard.rows_file)[C.RECORD_ID].to_list()
        echo = sent(run_dir, shard.input_file)
        lines = [claude_ok(r, "joke", model_input=echo[r]) for r in ids]
        if shard.index == 1:
            broken, lines[1] = ids[1], lines[1][:-5]  # a truncated line
        (outputs / (Path(shard.input_file).name + ".out")).write_text("\n".join(lines) + "\n")
    parts = merge_offline(run_dir, outputs)
    frame = pl.read_parquet(parts)
    bad = frame.filter(pl.col(C.ERROR_CODE).is_not_null())
    assert bad[C.RECORD_ID].to_list() == [broken]
    assert bad[C.ERROR_CODE].item() == C.UNPARSEABLE_OUTPUT
    assert bad[C.ERROR_MESSAGE].item() == "The output line is not valid JSON."
    assert bad[C.RAW_OUTPUT].item().startswith('{"recordId": "' + broken)
    assert frame.height == 9 and frame[C.RESPONSE_TEXT].null_count() == 1


def _run_with_outputs(tmp_path: Path, topics: list[str], name: str) -> tuple[Path, Path]:
    """A preprocessed run of ``topics`` and Bedrock-shaped outputs that echo its inputs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / f"{name}.csv"
    pl.DataFrame({"topic": topics}).write_csv(source)
    run_dir = tmp_path / name
    plan = preprocess(
        str(source),
        model_id=CLAUDE,
        prompt_id="joke_about_topic",
        out_dir=run_dir,
        max_concurrent_jobs=1,
        quotas=QuotaSettings(min_records_per_job=1),
    )
    outputs = tmp_path / f"{name}-outputs" / "job0"
    outputs.mkdir(parents=True)
    echo = sent(run_dir, plan.shards[0].input_file)
    lines = [claude_ok(r, f"{name} {r}", model_input=body) for r, body in echo.items()]
    (outputs / "shard-00000.jsonl.out").write_text("\n".join(reversed(lines)) + "\n")
    return run_dir, outputs.parent


def test_merge_offline_refuses_the_outputs_of_another_run(tmp_path):
    # Record ids are row positions, the same in every run: another run's outputs (the same
    # topics in another order) filled every row with another row's answer, and exit 0.
    run_dir, _ = _run_with_outputs(tmp_path, ["cats", "dogs", "owls"], "mine")
    _, theirs = _run_with_outputs(tmp_path, ["owls", "dogs", "cats"], "theirs")
    with pytest.raises(PlanError) as exc:
        merge_offline(run_dir, theirs)
    assert "echoes a modelInput other than the one this run sent" in str(exc.value)
    assert not (run_dir / "output").exists()
    _, own = _run_with_outputs(tmp_path / "again", ["cats", "dogs", "owls"], "mine")
    merged = pl.read_parquet(merge_offline(run_dir, own)[0])
    assert merged["response_text"].to_list() == [f"mine R000000000{i}" for i in range(3)]


def test_merge_offline_refuses_two_jobs_outputs_for_one_shard(tmp_path):
    run_dir, outputs = _run_with_outputs(tmp_path, ["cats", "dogs", "owls"], "mine")
    (outputs / "job1").mkdir()
    (outputs / "job1" / "shard-00000.jsonl.out").write_text(
        (outputs / "job0" / "shard-00000.jsonl.out").read_text()
    )
    with pytest.raises(PlanError, match="2 output files under .* are for input/shard-00000.jsonl"):
        merge_offline(run_dir, outputs)


def test_merge_offline_removes_parts_an_earlier_plan_left(tmp_path):
    # Preprocessed again into the same folder with fewer shards: the old part-00001 stayed,
    # and reading output/ gave its rows twice.
    run_dir, outputs = _run_with_outputs(tmp_path, ["cats", "dogs", "owls"], "mine")
    stale = run_dir / "output" / "part-00001.parquet"
    stale.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"topic": ["dogs"], C.RECORD_ID: ["R0000000001"]}).write_parquet(stale)
    merge_offline(run_dir, outputs)
    assert not stale.exists()
    assert pl.read_parquet(run_dir / "output" / "*.parquet").height == 3


COHERE = "cohere.embed-english-v3"


def cohere_line(record_id: str, counts: dict | None = None) -> str:
    """A Cohere Embed answer, as an on-demand tail keeps it (with its header counts)."""
    line = {
        "recordId": record_id,
        "modelInput": {"texts": ["x"], "input_type": "search_document"},
        "modelOutput": {"embeddings": [[0.5] * 1024], "response_type": "embeddings_floats"},
    }
    if counts is not None:
        line[outputs.HEADER_TOKENS] = counts
    return json.dumps(line)


def test_merge_shard_takes_an_answer_s_header_tokens_where_its_body_has_none(rows_file, tmp_path):
    # On-demand Cohere answers kept null tokens: their counts come in InvokeModel's headers.
    stats, out = merge(
        rows_file,
        [cohere_line("R0", {"input": 12}), cohere_line("R1", {"input": 7, "output": 0})],
        tmp_path,
        model_id=COHERE,
    )
    assert out[C.INPUT_TOKENS].to_list() == [12, 7, None]
    assert (stats.input_tokens, stats.output_tokens) == (19, 0)


def test_merge_shard_without_header_tokens_leaves_cohere_tokens_unknown(rows_file, tmp_path):
    stats, out = merge(
        rows_file, [cohere_line("R0"), cohere_line("R1"), cohere_line("R2")], tmp_path, COHERE
    )
    assert out[C.INPUT_TOKENS].null_count() == 3
    assert (stats.input_tokens, stats.output_tokens) == (None, None)


def test_merge_shard_body_tokens_win_over_header_tokens(rows_file, tmp_path):
    line = json.loads(claude_ok("R0", "hi", tokens=(10, 2)))
    line[outputs.HEADER_TOKENS] = {"input": 99, "output": 98}
    failed = json.loads(error_line("R1"))
    failed[outputs.HEADER_TOKENS] = {"input": 5}
    _, out = merge(rows_file, [json.dumps(line), json.dumps(failed)], tmp_path)
    assert out[C.INPUT_TOKENS].to_list()[:2] == [10, None]
    assert out[C.OUTPUT_TOKENS].to_list()[:2] == [2, None]


def test_merge_shard_header_tokens_survive_the_lenient_parse(rows_file, tmp_path):
    # One line that is not JSON sends the file to the lenient plan (JSON paths).
    lines = [cohere_line("R0", {"input": 12}), '{"recordId": "R1", "modelOutput": {']
    _, out = merge(rows_file, lines, tmp_path, model_id=COHERE)
    assert out[C.INPUT_TOKENS].to_list()[0] == 12
