"""Bad input stops the run before any job exists, with an error that names the problem and fix."""

from __future__ import annotations

import threading
from pathlib import Path

import boto3
import polars as pl
import pytest

from flows.batch_inference import batch_inference
from tasks.errors import (
    DuplicateIdError,
    EmptyDatasetError,
    InputValidationError,
    MissingColumnsError,
    MissingValuesError,
    OutputUriError,
    RecordTooLargeError,
    RunSettingsError,
    SourceEncodingError,
    SourceError,
    UnknownModelError,
)
from tasks.pipeline.sources import load_source
from tasks.run.params import BatchParams

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"


def _csv(path: Path, frame: pl.DataFrame) -> str:
    frame.write_csv(path)
    return str(path)


def _topics(n: int = 150) -> pl.DataFrame:
    return pl.DataFrame({"topic": [f"topic {i}" for i in range(n)]})


def _case(name: str, tmp: Path) -> tuple[dict, type[Exception], list[str]]:
    """Parameters, the error class and the words its message must carry."""
    if name == "missing-columns":
        src = _csv(tmp / "a.csv", pl.DataFrame({"subject": ["x"] * 150}))
        return {"source": src}, MissingColumnsError, ["topic", "subject"]
    if name == "nulls":
        frame = _topics().with_columns(
            pl.when(pl.int_range(pl.len()) < 3).then(None).otherwise("topic").alias("topic")
        )
        src = _csv(tmp / "a.csv", frame)
        return {"source": src}, MissingValuesError, ["3", "topic", "on_missing"]
    if name == "empty-dataset":
        src = _csv(tmp / "a.csv", _topics(0))
        return {"source": src}, EmptyDatasetError, ["no rows"]
    if name == "non-utf8-csv":
        path = tmp / "latin1.csv"
        path.write_bytes(b"topic\n" + "caf\xe9 cr\xe8me\n".encode("latin-1") * 150)
        return {"source": str(path)}, SourceEncodingError, ["UTF-8", "latin1.csv"]
    if name == "duplicate-ids":
        frame = _topics().with_columns(pl.Series("id", [i % 140 for i in range(150)]))
        src = _csv(tmp / "a.csv", frame)
        return {"source": src, "id_column": "id"}, DuplicateIdError, ["id", "duplicate"]
    if name == "oversize-record":
        frame = pl.DataFrame({"input_text": ["x"] * 149 + ["word " * 20_000]})
        src = str(tmp / "a.jsonl")
        frame.write_ndjson(src)
        return (
            {"source": src, "prompt_id": None, "model_id": TITAN},
            RecordTooLargeError,
            ["R0000000149"],
        )
    if name == "unknown-model":
        src = _csv(tmp / "a.csv", _topics())
        return {"source": src, "model_id": "acme.unknown-v1"}, UnknownModelError, ["anthropic"]
    if name == "invalid-role-arn":
        src = _csv(tmp / "a.csv", _topics())
        return {"source": src, "role_arn": "my-role"}, RunSettingsError, ["my-role", "arn:aws:iam"]
    if name == "nested-prompt-column":
        src = str(tmp / "a.jsonl")
        pl.DataFrame({"topic": [["a", "b"]] * 150}).write_ndjson(src)
        return {"source": src}, InputValidationError, ["'topic'", "list", "flatten"]
    if name == "glob-different-columns":
        _csv(tmp / "a.csv", _topics())
        _csv(tmp / "b.csv", _topics().rename({"topic": "subject"}))
        return (
            {"source": str(tmp / "*.csv")},
            SourceError,
            ["a.csv", "b.csv", "subject", "same columns"],
        )
    if name == "ragged-csv":
        path = tmp / "ragged.csv"
        path.write_text("topic\n" + "a topic\n" * 120 + "one, too many\n" + "b\n" * 30)
        return {"source": str(path)}, SourceError, ["line 122", "2 fields", "header has 1"]
    if name == "bad-jsonl-line":
        path = tmp / "bad.jsonl"
        path.write_text('{"topic": "a"}\n' * 140 + '{"topic": "b",}\n' + '{"topic": "c"}\n' * 9)
        return {"source": str(path)}, SourceError, ["line 141 is not JSON"]
    if name == "csv-header-twice":
        path = tmp / "twice.csv"
        path.write_text("topic,topic\n" + "a,b\n" * 150)
        return {"source": str(path)}, SourceError, ["'topic' more than once"]
    if name == "blank-csv-line":
        path = tmp / "blank.csv"
        path.write_text("topic,n\n" + "a,1\n" * 150 + "\n")
        return {"source": str(path)}, MissingValuesError, ["R0000000150", "delete blank lines"]
    if name == "semicolon-csv":
        path = tmp / "excel.csv"
        path.write_text("topic;n\n" + "a;1\n" * 150)
        return {"source": str(path)}, MissingColumnsError, ["separated by ';'", "commas"]
    if name == "missing-bucket":
        src = _csv(tmp / "a.csv", _topics())
        return (
            {"source": src, "output_uri": "s3://no-such-bucket-here/runs"},
            OutputUriError,
            ["no-such-bucket-here", "does not exist"],
        )
    raise AssertionError(name)


CASES = [
    "missing-columns",
    "nulls",
    "empty-dataset",
    "non-utf8-csv",
    "duplicate-ids",
    "oversize-record",
    "unknown-model",
    "invalid-role-arn",
    "missing-bucket",
    "nested-prompt-column",
    "glob-different-columns",
    "ragged-csv",
    "bad-jsonl-line",
    "csv-header-twice",
    "blank-csv-line",
    "semicolon-csv",
]


@pytest.mark.parametrize("case", CASES)
def test_batch_inference_bad_input_fails_before_any_job(stack, tmp_path, case):
    overrides, error, words = _case(case, tmp_path)
    run_name = f"bad-{case}"
    params = BatchParams(
        **{
            "prompt_id": "joke_about_topic",
            "model_id": CLAUDE,
            "output_uri": str(tmp_path / "out"),
            "run_name": run_name,
            **overrides,
        }
    )

    with pytest.raises(error) as excinfo:
        batch_inference(params)

    message = str(excinfo.value)
    for word in words:
        assert word.lower() in message.lower(), message
    assert stack.ledger(name_contains=run_name) == []


def test_batch_params_trims_spaces_around_the_model_id():
    params = BatchParams(source=" data.csv ", model_id="  " + CLAUDE + " ", output_uri="out")
    assert params.model_id == CLAUDE
    assert params.source == "data.csv"


def test_batch_inference_bad_line_of_an_s3_glob_names_object_and_line(stack, tmp_path):
    s3 = boto3.client("s3", endpoint_url=stack.moto_url)
    good = '{"topic": "a"}\n' * 100
    s3.put_object(Bucket=stack.bucket, Key="in/part-0.jsonl", Body=good.encode())
    s3.put_object(Bucket=stack.bucket, Key="in/part-1.jsonl", Body=(good + "{oops\n").encode())
    params = BatchParams(
        source=f"s3://{stack.bucket}/in/part-*.jsonl",
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name="bad-s3-line",
    )

    with pytest.raises(SourceError) as excinfo:
        batch_inference(params)

    message = str(excinfo.value)
    assert f"s3://{stack.bucket}/in/part-1.jsonl" in message, message
    assert "line 101 is not JSON" in message, message
    assert stack.ledger(name_contains="bad-s3-line") == []


def test_an_s3_glob_whose_files_differ_in_columns_is_refused_like_a_local_one(stack):
    # One Polars scan of the glob took the first file's columns: customer_id, only in the
    # second file, was dropped from every row without a word.
    s3 = boto3.client("s3", endpoint_url=stack.moto_url)
    s3.put_object(Bucket=stack.bucket, Key="cols/a.jsonl", Body=b'{"topic": "a"}\n')
    s3.put_object(
        Bucket=stack.bucket, Key="cols/b.jsonl", Body=b'{"topic": "b", "customer_id": "C-17"}\n'
    )
    s3.put_object(Bucket=stack.bucket, Key="cols/c.jsonl", Body=b'{"topic": "c"}\n')

    with pytest.raises(SourceError) as excinfo:
        load_source(f"s3://{stack.bucket}/cols/*.jsonl")
    message = str(excinfo.value)
    assert f"'s3://{stack.bucket}/cols/b.jsonl' has customer_id" in message, message

    frame = load_source(f"s3://{stack.bucket}/cols/[ac].jsonl").collect()
    assert sorted(frame["topic"].to_list()) == ["a", "c"]
    with pytest.raises(SourceError, match="No object matches"):
        load_source(f"s3://{stack.bucket}/cols/*.csv")


def test_a_run_that_skips_rows_finishes_with_every_row_once(stack, tmp_path):
    # The exactly-once check scanned rows/skipped.parquet (with its error columns) together
    # with the shards' rows files, and Polars refused the extra columns: every run with a
    # skipped row failed at its last step. Missing rows first, in the middle and last.
    source = tmp_path / "topics.csv"
    topics = [None if i in (0, 1, 57, 119) else f"topic {i}" for i in range(120)]
    pl.DataFrame({"topic": topics, "n": list(range(120))}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name="skips",
        on_missing="skip",
    )

    summary = batch_inference(params)

    assert (summary["counts"]["records"], summary["counts"]["failed"]) == (120, 4)
    out = pl.read_parquet(summary["parts"]).sort(pl.col("n").cast(pl.Int64))
    assert out["n"].cast(pl.Int64).to_list() == list(range(120))
    skipped = out.filter(pl.col("error_code").is_not_null())
    assert skipped["n"].cast(pl.Int64).to_list() == [0, 1, 57, 119]
    assert set(skipped["error_code"]) == {"MissingInput"}
    answered = out.filter(pl.col("error_code").is_null())
    assert (
        answered.select(
            pl.col("response_text").str.contains("Reply to: Tell me a short, family-friendly joke")
        )
        .to_series()
        .all()
    )


def test_a_create_that_fails_frees_its_slot_and_the_run_ends(stack, tmp_path):
    # A model id Bedrock refuses at create (ValidationException) through a gate of one: the
    # failed shard kept its slot, renewed for ever, and the shard behind it waited for ever.
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(200)]}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id="anthropic.claude-not-a-batch-model-v1:0",
        output_uri=str(tmp_path / "out"),
        run_name="refused",
        max_concurrent_jobs=1,
        max_records_per_job=100,
    )
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            batch_inference(params)
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)  # a bound on a hang, not a wait for something to happen

    assert not worker.is_alive(), "the run hung behind a slot its failed shard kept"
    assert outcome and outcome[0] is not None and "ValidationException" in repr(outcome[0])
    assert stack.ledger(name_contains="refused") == []


def test_a_bad_run_name_fails_the_flow_run_with_its_reason(stack, tmp_path):
    # Raised in Prefect's run setup (the flow run's name), it crashed the run ("Process exited
    # with status code: 1") with the reason only in the worker's traceback.
    from tasks.errors import RunSettingsError

    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"topic {i}" for i in range(120)]}).write_csv(source)
    params = BatchParams(
        source=str(source),
        prompt_id="joke_about_topic",
        model_id=CLAUDE,
        output_uri=str(tmp_path / "out"),
        run_name="bad name/with slash",
    )
    state = batch_inference(params, return_state=True)
    assert state.is_failed() and not state.is_crashed(), state
    with pytest.raises(RunSettingsError, match="run_name 'bad name/with slash' is not usable"):
        state.result()
