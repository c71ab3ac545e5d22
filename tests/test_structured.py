"""Structured outputs: extraction and validation of real-looking answers into typed columns."""

from __future__ import annotations

import json
from typing import Literal

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from pydantic import BaseModel

from prompt_templates import PromptTemplate, get_template
from tasks.bedrock.families import family_for
from tasks.errors import TemplateError
from tasks.pipeline import columns as C
from tasks.pipeline.lines import ROW, compile_line
from tasks.pipeline.outputs import parse_outputs
from tasks.pipeline.structured import SCHEMA_VALIDATION_ERROR, OutputSchema, apply_schema

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"


class Label(BaseModel):
    """A label with a confidence."""

    label: Literal["positive", "negative", "neutral"]
    confidence: float
    correct: bool
    tags: list[str] = []


SCHEMA = OutputSchema.from_model(Label, name="record_label")


def _apply(texts: list[str | None], stops: list[str] | None = None) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            C.RESPONSE_TEXT: texts,
            C.STOP_REASON: stops or ["end_turn"] * len(texts),
            C.ERROR_CODE: [None] * len(texts),
            C.ERROR_MESSAGE: [None] * len(texts),
        },
        schema={
            C.RESPONSE_TEXT: pl.String,
            C.STOP_REASON: pl.String,
            C.ERROR_CODE: pl.String,
            C.ERROR_MESSAGE: pl.String,
        },
    )
    return apply_schema(frame, SCHEMA)


CLEAN = '{"label": "positive", "confidence": 0.9, "correct": true, "tags": ["a"]}'


def test_apply_schema_clean_json_gives_typed_columns():
    out = _apply([CLEAN])
    expected = pl.DataFrame(
        {"label": ["positive"], "confidence": [0.9], "correct": [True], "tags": [["a"]]},
        schema={
            "label": pl.String,
            "confidence": pl.Float64,
            "correct": pl.Boolean,
            "tags": pl.List(pl.String),
        },
    )
    assert_frame_equal(out.select(expected.columns), expected)
    assert out[C.ERROR_CODE].to_list() == [None]


def test_apply_schema_json_in_prose_and_fenced_block_are_found():
    prose = f"Sure! Here is my assessment: {CLEAN} Let me know if you need more."
    fenced = f"My answer:\n```json\n{CLEAN}\n```\nThanks."
    out = _apply([prose, fenced])
    assert out[C.ERROR_CODE].to_list() == [None, None]
    assert out["label"].to_list() == ["positive", "positive"]
    assert out["correct"].to_list() == [True, True]


def test_apply_schema_finds_the_answer_among_other_braces():
    # Good answers were refused ("Extra data at character 91") and retried, paid again.
    texts = [
        f"{CLEAN}\n\nI hope this helps.",
        f"Here it is: {CLEAN} Note: I used {{braces}} in my reasoning.",
        f'The input was {{"label": "unsure"}}. Answer: {CLEAN}',
        f"{CLEAN}\n\nThe echoed row was {{x}}",
        f"{CLEAN} and, redone, {CLEAN}",
    ]
    out = _apply(texts)
    assert out[C.ERROR_CODE].to_list() == [None] * len(texts), out[C.ERROR_MESSAGE].to_list()
    assert out["label"].to_list() == ["positive"] * len(texts)
    assert out["confidence"].to_list() == [0.9] * len(texts)


class Inner(BaseModel):
    """A nested object."""

    label: Literal["a", "b"]
    score: int


class Nested(BaseModel):
    """Nested objects, arrays of enums and integers: what Polars decodes leniently."""

    inner: Inner
    tags: list[Literal["x", "y"]]
    count: int


NESTED = OutputSchema.from_model(Nested, name="nested")
NESTED_OK = {"inner": {"label": "a", "score": 1}, "tags": ["x"], "count": 3}
COLUMNS = (C.RESPONSE_TEXT, C.STOP_REASON, C.ERROR_CODE, C.ERROR_MESSAGE)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({**NESTED_OK, "inner": {"label": "zzz", "score": 1}}, "$.inner.label: zzz is not one of"),
        ({**NESTED_OK, "inner": {"label": "a"}}, "$.inner.score: required field is missing"),
        ({**NESTED_OK, "inner": {}}, "$.inner.label: required field is missing"),
        ({**NESTED_OK, "tags": ["x", "nope"]}, "$.tags[]: an item is not one of"),
        ({**NESTED_OK, "tags": "x"}, "$.tags: expected array, got a single value"),
        ({**NESTED_OK, "count": 3.7}, "$.count: expected integer, got 3.7"),
        ({**NESTED_OK, "inner": {"label": "a", "score": 1.5}}, "$.inner.score: expected integer"),
    ],
)
def test_apply_schema_checks_nested_fields_and_what_polars_decodes_leniently(answer, reason):
    # Each passed before, some with a wrong value (3.7 written as 3, "x" as ["x"]).
    frame = pl.DataFrame(
        {
            C.RESPONSE_TEXT: [json.dumps(NESTED_OK), json.dumps(answer)],
            C.STOP_REASON: ["end_turn"] * 2,
            C.ERROR_CODE: [None, None],
            C.ERROR_MESSAGE: [None, None],
        },
        schema=dict.fromkeys(COLUMNS, pl.String),
    )
    out = apply_schema(frame, NESTED)
    assert out[C.ERROR_CODE].to_list() == [None, "SchemaValidationError"]
    assert reason in out[C.ERROR_MESSAGE][1], out[C.ERROR_MESSAGE][1]
    assert out["count"].to_list() == [3, None] and out["inner"][0] == {"label": "a", "score": 1}


def test_apply_schema_extra_fields_are_ignored_and_kept_in_the_text():
    text = '{"label": "neutral", "confidence": 1, "correct": false, "mood": "calm"}'
    out = _apply([text])
    assert out[C.ERROR_CODE].to_list() == [None]
    assert out["confidence"].to_list() == [1.0]
    assert "mood" not in out.columns
    assert out[C.RESPONSE_TEXT].to_list() == [text]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            '{"label": "positive", "confidence": 0.5, "correct": "yes"}',
            "$.correct: expected boolean, got string",
        ),
        ('{"label": 5, "confidence": 0.5, "correct": true}', "$.label: expected string"),
        ('{"label": "positive", "correct": true}', "$.confidence: required field is missing"),
        ('{"label": "great", "confidence": 0.5, "correct": true}', "$.label: great is not one of"),
        ("I think it is positive.", "The answer holds no JSON object"),
        ('["positive"]', "holds no JSON object"),
    ],
    ids=["wrong-type", "number-for-string", "missing-field", "enum", "non-json", "array"],
)
def test_apply_schema_invalid_answer_gets_schema_validation_error(text, reason):
    out = _apply([CLEAN, text])
    assert out[C.ERROR_CODE].to_list() == [None, SCHEMA_VALIDATION_ERROR]
    assert reason in out[C.ERROR_MESSAGE][1], out[C.ERROR_MESSAGE][1]
    assert out[C.RESPONSE_TEXT][1] == text  # the raw text is kept
    assert out["label"][1] is None
    assert out["label"][0] == "positive"  # one bad row does not spoil the others


def test_apply_schema_truncated_json_names_max_tokens():
    cut = '{"label": "positive", "confidence": 0.9, "corr'
    out = _apply([cut], stops=["max_tokens"])
    assert out[C.ERROR_CODE].to_list() == [SCHEMA_VALIDATION_ERROR]
    assert "does not parse" in out[C.ERROR_MESSAGE][0]
    assert "max_tokens" in out[C.ERROR_MESSAGE][0]


def test_apply_schema_rows_that_already_failed_keep_their_error():
    frame = pl.DataFrame(
        {
            C.RESPONSE_TEXT: [None],
            C.STOP_REASON: [None],
            C.ERROR_CODE: ["429"],
            C.ERROR_MESSAGE: ["ThrottlingException"],
        },
        schema=dict.fromkeys(COLUMNS, pl.String),
    )
    out = apply_schema(frame, SCHEMA)
    assert out[C.ERROR_CODE].to_list() == ["429"]
    assert out["correct"].dtype == pl.Boolean


def _line(record_id: str, output: dict) -> str:
    return json.dumps({"modelInput": {}, "modelOutput": output, "recordId": record_id})


def test_parse_outputs_reads_anthropic_tool_use_input():
    usage = {"input_tokens": 10, "output_tokens": 5}
    tool = {"type": "tool_use", "id": "toolu_1", "name": "record_label"}

    def called(content, stop="tool_use"):
        return {"content": content, "stop_reason": stop, "usage": usage}

    lines = [
        _line("R0000000000", called([{**tool, "input": json.loads(CLEAN)}])),
        _line("R0000000001", called([{**tool, "input": {"label": "positive"}}])),
        _line("R0000000002", called([{"type": "text", "text": CLEAN}], "end_turn")),
    ]
    family = family_for(CLAUDE)
    out = (
        parse_outputs([("\n".join(lines) + "\n").encode()], family, SCHEMA)
        .collect()
        .sort(C.RECORD_ID)
    )
    assert out[C.ERROR_CODE].to_list() == [None, SCHEMA_VALIDATION_ERROR, None]
    assert out["correct"].to_list() == [True, None, True]
    assert json.loads(out[C.RESPONSE_TEXT][0])["label"] == "positive"
    assert "$.confidence: required field is missing" in out[C.ERROR_MESSAGE][1]


def test_compile_line_forces_the_tool_for_anthropic():
    template = get_template("grade_answer")
    family = family_for(CLAUDE)
    line = compile_line(family, template, family.options(template.inference_params()))
    row = pl.DataFrame({ROW: [0], "source": ["Q"], "target": ["A"], "answer_response_text": ["x"]})
    body = json.loads(row.select(line.expr(pl.lit("R0000000000"))).item())["modelInput"]
    assert body["tool_choice"] == {"type": "tool", "name": "record_grade"}
    assert body["tools"][0]["input_schema"]["properties"]["correct"]["type"] == "boolean"
    assert "JSON object only" not in body["messages"][0]["content"]


def test_compile_line_asks_for_json_where_there_is_no_forced_tool():
    template = get_template("grade_answer")
    family = family_for("amazon.nova-lite-v1:0")
    line = compile_line(family, template, family.options(template.inference_params()))
    row = pl.DataFrame({ROW: [0], "source": ["Q"], "target": ["A"], "answer_response_text": ["x"]})
    body = json.loads(row.select(line.expr(pl.lit("R0000000000"))).item())["modelInput"]
    text = body["messages"][0]["content"][0]["text"]
    assert "Answer with a single JSON object only" in text
    assert '"required":["correct","reason"]' in text
    assert "tools" not in body


def test_output_schema_clashing_with_output_columns_is_refused():
    schema = OutputSchema("x", {"type": "object", "properties": {"error_code": {"type": "string"}}})
    with pytest.raises(TemplateError, match="clash with output columns"):
        PromptTemplate(text="{a}", output_schema=schema).check("t")


def test_answer_whose_repair_came_back_without_one_is_kept_in_its_row(stack, tmp_path):
    # Every answer of the first job broke the schema (paid for); the repair job failed and
    # max_attempts ended there: the rows showed only the job's failure, the answers gone.
    from helpers import graded_source

    from flows.batch_inference import batch_inference
    from tasks.bedrock import prices
    from tasks.run.params import BatchParams

    stack.set_faults(
        schema_error_rate=1.0,
        schema_error_job_names_containing="-a1",
        fail_job_names_containing="repair-failed-shard-00000-a2",
    )
    source = graded_source(tmp_path, 100)
    params = BatchParams(
        source=str(source), prompt_id="grade_answer", model_id=CLAUDE, max_attempts=2,
        output_uri=str(tmp_path / "out"), run_name="repair-failed", max_records_per_job=100,
    )  # fmt: skip

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    first, repair = stack.ledger("repair-failed")
    assert (first["status"], repair["status"]) == ("Completed", "Failed")
    assert out[C.ERROR_CODE].unique().to_list() == ["Failed"]
    assert out[C.RESPONSE_TEXT].null_count() == out[C.INPUT_TOKENS].null_count() == 0
    assert out[C.JOB_ID].unique().to_list() == [first["jobId"]]
    assert out[C.SERVED_BY].unique().to_list() == ["batch"]
    assert out[C.ATTEMPTS].unique().to_list() == [2]
    assert out["correct"].null_count() == 100 and not out["schema_repaired"].any()
    messages = out[C.ERROR_MESSAGE]
    kept = "Kept the paid answer of attempt 1, which failed validation (SchemaValidationError)"
    assert messages.str.contains(kept, literal=True).all()
    assert messages.str.contains("does not fit output schema", literal=True).all()
    # Its tokens are counted once: in the row, not again as an answer a later one replaced.
    s3 = stack.client("s3")
    bucket, prefix = first["outputUri"].removeprefix("s3://").split("/", 1)
    key = f"{prefix.rstrip('/')}/{first['jobId']}/manifest.json.out"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    paid = (manifest["inputTokenCount"], manifest["outputTokenCount"])
    assert (summary["tokens"]["input"], summary["tokens"]["output"]) == paid
    price = prices.price_for(CLAUDE)
    assert summary["cost"]["batch_usd"] == pytest.approx(price.cost(*paid, "batch"))
