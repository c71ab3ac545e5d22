"""Combining a shard's attempts: latest attempt wins, retryable failures are picked for retry."""

from __future__ import annotations

import json

import polars as pl
import pytest
from pydantic import BaseModel

from tasks.pipeline import columns as C
from tasks.pipeline.attempts import AttemptOutput, retry_ids, settle
from tasks.pipeline.merge import write_part
from tasks.pipeline.structured import SCHEMA_REPAIRED, SCHEMA_VALIDATION_ERROR, OutputSchema

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"


def _ok(record_id: str, text: str) -> dict:
    return {
        "recordId": record_id,
        "modelInput": {},
        "modelOutput": {
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 2},
        },
    }


def _err(record_id: str, code: int) -> dict:
    return {
        "recordId": record_id,
        "modelInput": {},
        "error": {"errorCode": code, "errorMessage": "x"},
    }


def _lines(*records: dict) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.parquet"
    pl.DataFrame(
        {"topic": ["a", "b", "c", "d"], C.RECORD_ID: ["R1", "R2", "R3", "R4"]}
    ).write_parquet(path)
    return path


def test_retry_ids_takes_throttled_and_missing_not_bad_requests(rows_file):
    first = AttemptOutput(
        1, [_lines(_ok("R1", "x"), _err("R2", 429), _err("R3", 400))], job_id="j1"
    )

    retry = retry_ids(settle(rows_file, [first], CLAUDE, "InvokeModel").frame)

    assert sorted(retry) == ["R2", "R4"]


def test_settled_attempts_latest_attempt_decides_and_counts_attempts(rows_file, tmp_path):
    first = AttemptOutput(
        1, [_lines(_ok("R1", "one"), _err("R2", 429), _err("R3", 400))], job_id="j1"
    )
    second = AttemptOutput(
        2, [_lines(_ok("R2", "two"))], record_ids=["R2", "R4"], job_id=None, served_by="on_demand"
    )
    dest = tmp_path / "part.parquet"

    stats = write_part(settle(rows_file, [first, second], CLAUDE, "InvokeModel").frame, dest)

    out = pl.read_parquet(dest).sort(C.RECORD_ID)
    assert out[C.RECORD_ID].to_list() == ["R1", "R2", "R3", "R4"]
    assert out[C.RESPONSE_TEXT].to_list() == ["one", "two", None, None]
    assert out[C.ATTEMPTS].to_list() == [1, 2, 1, 2]
    assert out[C.SERVED_BY].to_list() == ["batch", "on_demand", "batch", "on_demand"]
    assert out[C.ERROR_CODE].to_list() == [None, None, "400", C.MISSING_OUTPUT]
    assert (stats.records, stats.succeeded, stats.failed) == (4, 2, 2)


def test_settled_attempts_do_not_count_a_retry_the_cost_ceiling_held_back(rows_file):
    # A held-back retry sent nothing: its records read attempts 2 after one try, and a shard
    # held whole read 1 where nothing was ever sent.
    held = ("CostCeilingReached", "Not sent: max_cost_usd")
    first = AttemptOutput(1, [_lines(_ok("R1", "one"), _err("R2", 429))], job_id="j1")
    kept_back = AttemptOutput(
        2, [], record_ids=["R2", "R3", "R4"], served_by=C.SERVED_SKIPPED, job_error=held
    )
    whole = AttemptOutput(1, [], served_by=C.SERVED_SKIPPED, job_error=held)

    retried = settle(rows_file, [first, kept_back], CLAUDE, "InvokeModel").frame
    never_sent = settle(rows_file, [whole], CLAUDE, "InvokeModel").frame

    assert retried[C.ATTEMPTS].to_list() == [1, 1, 1, 1]
    assert retried[C.ERROR_CODE].to_list() == [None, *[held[0]] * 3]
    assert retried[C.SERVED_BY].to_list() == ["batch", *[C.SERVED_SKIPPED] * 3]
    assert never_sent[C.ATTEMPTS].to_list() == [0, 0, 0, 0]
    assert never_sent[C.ERROR_CODE].unique().to_list() == [held[0]]


class _Grade(BaseModel):
    """A structured answer: the rows get a typed `correct` column."""

    correct: bool


GRADE = OutputSchema.from_model(_Grade, name="record_grade")


def test_settled_repair_held_by_the_ceiling_keeps_the_paid_answer(rows_file):
    # R2's answer broke the schema, was paid for, and its repair was held back: the row lost
    # the answer (no text, no tokens, served_by skipped) and the cost counted it only aside.
    held = ("CostCeilingReached", "Not sent: max_cost_usd=0.01 would be passed (attempt 2).")
    first = AttemptOutput(
        1,
        [_lines(_ok("R1", '{"correct": true}'), _ok("R2", "no JSON here"), _err("R3", 429))],
        job_id="j1",
    )
    kept_back = AttemptOutput(
        2, [], record_ids=["R2", "R3", "R4"], served_by=C.SERVED_SKIPPED, job_error=held
    )

    settled = settle(rows_file, [first, kept_back], CLAUDE, "InvokeModel", GRADE)

    row = settled.frame.row(1, named=True)
    assert (row[C.RESPONSE_TEXT], row[C.INPUT_TOKENS], row[C.OUTPUT_TOKENS]) == (
        "no JSON here",
        3,
        2,
    )
    assert (row[C.JOB_ID], row[C.SERVED_BY], row[C.ATTEMPTS]) == ("j1", C.SERVED_BATCH, 1)
    assert row[C.ERROR_CODE] == held[0] and row["correct"] is None
    assert row[C.ERROR_MESSAGE].startswith(held[1])
    assert "attempt 1" in row[C.ERROR_MESSAGE] and SCHEMA_VALIDATION_ERROR in row[C.ERROR_MESSAGE]
    assert "does not fit output schema" in row[C.ERROR_MESSAGE]
    assert row[SCHEMA_REPAIRED] is False
    # Rows whose held retry had no paid answer before are as they were: nothing to keep.
    rest = settled.frame.filter(pl.col(C.RECORD_ID).is_in(["R3", "R4"]))
    assert rest[C.ERROR_CODE].to_list() == [held[0]] * 2
    assert rest[C.ERROR_MESSAGE].to_list() == [held[1]] * 2
    assert rest[C.SERVED_BY].to_list() == [C.SERVED_SKIPPED] * 2
    assert rest[C.INPUT_TOKENS].null_count() == 2
    # The kept answer is in the part, so it is not counted again as replaced.
    assert settled.superseded == []


def test_settled_repair_that_came_back_without_an_answer_keeps_the_paid_answer(rows_file):
    # The last attempt answered R2 with a throttling error and had no line for R4: the rows
    # showed only those, and the answers that failed the schema, paid for, were gone. R3's
    # repair was answered (a refusal, paid too): that answer stays and the first one is
    # counted as replaced.
    first = AttemptOutput(
        1,
        [_lines(_ok("R1", '{"correct": true}'), *[_ok(r, "no JSON") for r in ("R2", "R3", "R4")])],
        job_id="j1",
    )
    refusal = _ok("R3", "I can't")
    refusal["modelOutput"]["stop_reason"] = "refusal"
    repair = AttemptOutput(
        2, [_lines(_err("R2", 429), refusal)], record_ids=["R2", "R3", "R4"], job_id="j2"
    )

    settled = settle(rows_file, [first, repair], CLAUDE, "InvokeModel", GRADE)

    frame = settled.frame
    assert frame[C.ERROR_CODE].to_list() == [None, "429", "ContentFiltered", C.MISSING_OUTPUT]
    assert frame[C.RESPONSE_TEXT].to_list() == [
        '{"correct": true}',
        "no JSON",
        "I can't",
        "no JSON",
    ]
    assert frame[C.JOB_ID].to_list() == ["j1", "j1", "j2", "j1"]
    assert frame[C.ATTEMPTS].to_list() == [1, 2, 2, 2]
    kept = frame.filter(pl.col(C.RECORD_ID).is_in(["R2", "R4"]))[C.ERROR_MESSAGE]
    assert kept[0].startswith("x Kept the paid answer of attempt 1, which failed validation")
    assert kept[1].startswith("No output line for this record (attempt 2, job j2). Kept the")
    assert [(s["attempt"], s["rows"]) for s in settled.superseded] == [(1, 1)]


def test_settled_attempts_failed_job_error_applies_to_its_records(rows_file, tmp_path):
    failed = AttemptOutput(1, [], job_id="j1", job_error=("Failed", "internal error"))
    dest = tmp_path / "part.parquet"

    write_part(settle(rows_file, [failed], CLAUDE, "InvokeModel").frame, dest)

    out = pl.read_parquet(dest)
    assert out[C.ERROR_CODE].unique().to_list() == ["Failed"]
    assert out[C.ERROR_MESSAGE].unique().to_list() == ["internal error"]


def test_settled_attempts_count_retry_lines_of_records_the_retry_did_not_send(rows_file):
    # A retry's output naming a record answered by the first attempt must not replace that
    # answer, and is counted as a line that reached no row.
    first = AttemptOutput(1, [_lines(_ok("R1", "one"), _err("R2", 429))], job_id="j1")
    second = AttemptOutput(
        2, [_lines(_ok("R2", "two"), _ok("R1", "not sent"))], record_ids=["R2"], job_id="j2"
    )

    settled = settle(rows_file, [first, second], CLAUDE, "InvokeModel")

    assert settled.frame[C.RESPONSE_TEXT].to_list() == ["one", "two", None, None]
    assert (settled.stray_lines, settled.stray_examples) == (1, ("R1",))


def test_settled_attempts_count_records_one_attempt_answered_twice(rows_file):
    # A record in two attempts (its retry) is not a repeat; a record with two lines in one
    # attempt's outputs is, whichever file of the attempt holds them.
    first = AttemptOutput(
        1, [_lines(_ok("R1", "one"), _err("R2", 429)), _lines(_ok("R1", "again"))], job_id="j1"
    )
    second = AttemptOutput(2, [_lines(_ok("R2", "two"))], record_ids=["R2"], job_id="j2")

    settled = settle(rows_file, [first, second], CLAUDE, "InvokeModel")

    assert settled.frame[C.RESPONSE_TEXT].to_list() == ["one", "two", None, None]
    assert (settled.repeated, settled.repeated_examples) == (1, ("R1",))
    assert settled.stray_lines == 0
