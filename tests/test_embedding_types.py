"""Embedding types other than float (Cohere int8/uint8/binary/ubinary, Titan binary), end to end."""

from __future__ import annotations

import polars as pl
import pytest
from helpers import job_output_lines

from flows.batch_inference import batch_inference
from tasks.bedrock.families import family_for
from tasks.errors import InvalidOptionsError
from tasks.pipeline.columns import EMBEDDING, ERROR_CODE, RECORD_ID
from tasks.run.params import BatchParams, InferenceOverrides

ROWS = 100  # one job


def _source(tmp_path) -> str:
    path = tmp_path / "texts.jsonl"
    pl.DataFrame({"input_text": [f"text {i} " + "x " * (i % 5) for i in range(ROWS)]}).write_ndjson(
        path
    )
    return str(path)


def _run(tmp_path, model_id: str, run_name: str, types: list[str]) -> pl.DataFrame:
    params = BatchParams(
        source=_source(tmp_path), model_id=model_id, output_uri=str(tmp_path / "out"),
        run_name=run_name, inference=InferenceOverrides(embedding_types=types),
    )  # fmt: skip
    summary = batch_inference(params)
    assert summary["counts"]["succeeded"] == ROWS
    return pl.read_parquet(summary["parts"]).sort(RECORD_ID)


def test_cohere_int8_and_ubinary_land_in_integer_columns_as_the_job_wrote_them(stack, tmp_path):
    # embedding_types took only "float": a user asking for int8 was refused with "Input should
    # be 'float'", and the BatchParams form had no field for it at all.
    out = _run(tmp_path, "cohere.embed-english-v3", "types-cohere", ["int8", "ubinary"])

    assert out.schema["embedding_int8"] == pl.List(pl.Int8)
    assert out.schema["embedding_ubinary"] == pl.List(pl.UInt8)
    assert EMBEDDING not in out.columns  # floats were not asked for
    written = job_output_lines(stack, "types-cohere")
    for row in out.iter_rows(named=True):
        line = written[row[RECORD_ID]]
        assert line["modelInput"]["texts"] == [row["input_text"]]  # the row's own text
        embeddings = line["modelOutput"]["embeddings"]
        assert row["embedding_int8"] == embeddings["int8"][0]
        assert row["embedding_ubinary"] == embeddings["ubinary"][0]
    assert out[ERROR_CODE].null_count() == ROWS


def test_titan_float_and_binary_land_in_their_columns_as_the_job_wrote_them(stack, tmp_path):
    out = _run(tmp_path, "amazon.titan-embed-text-v2:0", "types-titan", ["float", "binary"])

    assert out.schema[EMBEDDING] == pl.List(pl.Float32)
    assert out.schema["embedding_binary"] == pl.List(pl.UInt8)
    written = job_output_lines(stack, "types-titan")
    for row in out.iter_rows(named=True):
        line = written[row[RECORD_ID]]
        assert line["modelInput"]["inputText"] == row["input_text"]  # the row's own text
        by_type = line["modelOutput"]["embeddingsByType"]
        assert row["embedding_binary"] == by_type["binary"]
        assert row[EMBEDDING] == pytest.approx(by_type["float"], rel=1e-6)


def test_an_embedding_type_the_model_does_not_answer_is_refused_naming_the_setting():
    family = family_for("amazon.titan-embed-text-v2:0")
    with pytest.raises(InvalidOptionsError) as raised:
        family.options(None, {"embedding_types": ["int8"]})
    assert "embedding_types" in str(raised.value) and "'binary'" in str(raised.value)
