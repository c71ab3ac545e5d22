"""One model of each family end to end on the local stack: dry run, batch run, strict merge."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from helpers import job_output_lines

from flows.batch_inference import batch_inference
from tasks.pipeline.columns import EMBEDDING, ERROR_CODE, RECORD_ID, RESPONSE_TEXT
from tasks.run.lifecycle import preprocess_params
from tasks.run.params import BatchParams

pytestmark = pytest.mark.slow

ROWS = 100  # the minimum records of one job

# (model id as a user writes it for batch, invocation type, a key its request body must have)
MODELS = [
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "InvokeModel", "anthropic_version"),
    ("us.amazon.nova-2-lite-v1:0", "InvokeModel", "schemaVersion"),
    ("us.meta.llama4-scout-17b-instruct-v1:0", "InvokeModel", "max_gen_len"),
    ("mistral.mistral-small-2402-v1:0", "InvokeModel", "prompt"),
    ("mistral.mistral-large-2407-v1:0", "InvokeModel", "messages"),
    ("openai.gpt-oss-20b-1:0", "InvokeModel", "max_completion_tokens"),
    ("qwen.qwen3-32b-v1:0", "InvokeModel", "max_tokens"),
    ("deepseek.v3-v1:0", "Converse", "inferenceConfig"),
]
EMBEDDERS = [
    ("amazon.titan-embed-text-v2:0", 1024, "inputText"),
    ("cohere.embed-v4:0", 1536, "texts"),
]


def _first_body(plan_dir: Path, plan) -> dict:
    with (plan_dir / plan.shards[0].input_file).open() as f:
        return json.loads(f.readline())["modelInput"]


def _name(model_id: str) -> str:
    return "e2e-" + "".join(c if c.isalnum() else "-" for c in model_id.split(".", 1)[-1])[:30]


@pytest.mark.parametrize(("model_id", "invocation_type", "body_key"), MODELS)
def test_text_model_dry_run_and_batch_run_parse_every_row(
    stack, tmp_path, model_id, invocation_type, body_key
):
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(ROWS)]}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=model_id,
        invocation_type=invocation_type,
        output_uri=str(tmp_path / "out"),
        run_name=_name(model_id),
    )

    plan = preprocess_params(params, tmp_path / "dry")
    summary = batch_inference(params)

    assert plan.batch_records == ROWS and body_key in _first_body(tmp_path / "dry", plan)
    out = pl.read_parquet(summary["parts"])
    assert summary["counts"] == {"records": ROWS, "succeeded": ROWS, "failed": 0, "unparseable": 0}
    assert out[ERROR_CODE].null_count() == ROWS
    assert out[RESPONSE_TEXT].str.starts_with("[emulated").all()
    # Each row's answer is to its own prompt: the emulator's reply quotes the prompt's end
    # (the system prompt, and Llama's or Mistral's chat markup, left out).
    own_end = pl.concat_str(pl.lit(" "), pl.col("topic"), pl.lit(". Reply with the joke only. | "))
    assert out.select(pl.col(RESPONSE_TEXT).str.contains(own_end, literal=True).all()).item()
    # Mistral's responses carry no token counts; every other family reports them.
    assert summary["tokens"]["input"] > 0 or model_id.startswith("mistral.")


@pytest.mark.parametrize(("model_id", "dims", "body_key"), EMBEDDERS)
def test_embedding_model_dry_run_and_batch_run_parse_every_row(
    stack, tmp_path, model_id, dims, body_key
):
    source = tmp_path / "reviews.jsonl"
    pl.DataFrame({"input_text": [f"review {i}" for i in range(ROWS)]}).write_ndjson(source)
    params = BatchParams(
        source=str(source),
        model_id=model_id,
        output_uri=str(tmp_path / "out"),
        run_name=_name(model_id),
    )

    plan = preprocess_params(params, tmp_path / "dry")
    summary = batch_inference(params)

    assert body_key in _first_body(tmp_path / "dry", plan)
    out = pl.read_parquet(summary["parts"])
    assert summary["counts"]["succeeded"] == ROWS and summary["counts"]["unparseable"] == 0
    assert out[EMBEDDING].list.len().unique().to_list() == [dims]
    # Each row's vector is the one its own text was given (Bedrock echoes the request body).
    written = job_output_lines(stack, _name(model_id))
    for row in out.iter_rows(named=True):
        line = written[row[RECORD_ID]]
        body, answer = line["modelInput"], line["modelOutput"]
        assert body.get("inputText", (body.get("texts") or [None])[0]) == row["input_text"]
        vector = answer.get("embedding") or answer["embeddings"]["float"][0]
        assert row[EMBEDDING] == pytest.approx(vector, rel=1e-6)


def test_cohere_v4_run_with_dimensions_writes_vectors_of_that_length(stack, tmp_path):
    # `dimensions` in the run's overrides (the CLI's --dimensions) is v4's output_dimension.
    source = tmp_path / "reviews.jsonl"
    pl.DataFrame({"input_text": [f"review {i}" for i in range(ROWS)]}).write_ndjson(source)
    params = BatchParams(
        source=str(source),
        model_id="cohere.embed-v4:0",
        output_uri=str(tmp_path / "out"),
        run_name="e2e-cohere-v4-dims",
        inference={"dimensions": 512},
    )

    summary = batch_inference(params)

    out = pl.read_parquet(summary["parts"])
    assert summary["counts"]["succeeded"] == ROWS
    assert out[EMBEDDING].list.len().unique().to_list() == [512]
