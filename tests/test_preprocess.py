"""Preprocess: validation messages, stable ids, JSONL lines, shards on disk, the plan."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from prompt_templates import PromptTemplate, get_template
from tasks.bedrock.families import family_for
from tasks.errors import (
    DuplicateIdError,
    EmptyDatasetError,
    InputValidationError,
    MissingColumnsError,
    MissingValuesError,
    RecordTooLargeError,
    TooFewRecordsError,
    UnknownModelError,
)
from tasks.pipeline import columns as C
from tasks.pipeline.lines import ROW as _ROW
from tasks.pipeline.lines import compile_line, record_id_expr
from tasks.pipeline.plan import RunPlan, format_plan
from tasks.pipeline.preprocess import SAMPLE_FILE, preprocess
from tasks.settings import QuotaSettings, get_settings

CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"
QUOTAS = QuotaSettings(min_records_per_job=3, max_records_per_job=1000)
TRICKY = ["plain", 'quote " and \\ back', "new\nline\ttab", "ctrl \x01 \x1f", "é 中 😀", "{x} }{"]


def write_csv(tmp_path: Path, frame: pl.DataFrame, name="src.csv") -> str:
    path = tmp_path / name
    frame.write_csv(path)
    return str(path)


def topics(n: int) -> pl.DataFrame:
    return pl.DataFrame({"topic": [f"topic {i}" for i in range(n)], "n": list(range(n))})


def run(tmp_path, source, folder="run", **kwargs):
    kwargs.setdefault("model_id", CLAUDE)
    kwargs.setdefault("prompt_id", "joke_about_topic")
    kwargs.setdefault("quotas", QUOTAS)
    return preprocess(source, out_dir=tmp_path / folder, **kwargs)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_preprocess_writes_shards_rows_and_plan(tmp_path):
    plan = run(tmp_path, write_csv(tmp_path, topics(10)), max_concurrent_jobs=3)
    out = tmp_path / "run"
    assert [s.records for s in plan.shards] == [3, 3, 4]
    assert plan.total_records == 10 and plan.skipped_records == 0
    assert plan.family == "anthropic" and plan.columns == ["topic", "n"]
    for shard in plan.shards:
        lines = read_lines(out / shard.input_file)
        rows = pl.read_parquet(out / shard.rows_file)
        assert len(lines) == shard.records == rows.height
        assert [line["recordId"] for line in lines] == rows[C.RECORD_ID].to_list()
        assert shard.bytes == (out / shard.input_file).stat().st_size
    assert RunPlan.load(out) == plan


def test_preprocess_line_is_model_body_with_rendered_prompt(tmp_path):
    plan = run(tmp_path, write_csv(tmp_path, topics(3)))
    line = read_lines(tmp_path / "run" / plan.shards[0].input_file)[1]
    template = get_template("joke_about_topic")
    assert line == {
        "recordId": "R0000000001",
        "modelInput": {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": template.max_tokens,
            "system": template.system,
            "messages": [{"role": "user", "content": template.text.format(topic="topic 1")}],
            "temperature": template.temperature,
        },
    }


def test_preprocess_record_ids_are_stable_and_bedrock_shaped(tmp_path):
    source = write_csv(tmp_path, topics(5))
    first = run(tmp_path, source)
    ids = pl.read_parquet(tmp_path / "run" / first.shards[0].rows_file)[C.RECORD_ID].to_list()
    run(tmp_path, source)
    again = pl.read_parquet(tmp_path / "run" / first.shards[0].rows_file)[C.RECORD_ID].to_list()
    assert ids == again == [f"R{i:010d}" for i in range(5)]
    assert all(len(i) == 11 and i.isalnum() for i in ids)


@pytest.mark.parametrize(
    ("model_id", "invocation_type"),
    [
        (CLAUDE, "InvokeModel"),
        ("amazon.nova-lite-v1:0", "InvokeModel"),
        ("meta.llama3-8b-instruct-v1:0", "InvokeModel"),
        ("mistral.mistral-7b-instruct-v0:2", "InvokeModel"),
        (CLAUDE, "Converse"),
        (TITAN, "InvokeModel"),
        ("cohere.embed-english-v3", "InvokeModel"),
    ],
)
def test_compile_line_matches_struct_json_encode_for_tricky_text(model_id, invocation_type):
    family = family_for(model_id, invocation_type)
    template = PromptTemplate(text='Q "{a}" \\ {{lit}} {b}\n', system='S "x"\n')
    options = family.options(template.inference_params())
    line = compile_line(family, template, options)
    frame = pl.DataFrame({"a": TRICKY, "b": list(reversed(TRICKY))}).with_row_index(_ROW)
    got = frame.select(line.expr(record_id_expr(pl.col(_ROW)))).to_series()
    expected = frame.select(line.reference).to_series()
    assert got.to_list() == expected.to_list()
    sizes = frame.select(line.value_bytes() + line.const_bytes).to_series()
    assert sizes.to_list() == got.str.len_bytes().to_list()


def test_preprocess_missing_template_column_lists_columns_found(tmp_path):
    source = write_csv(tmp_path, pl.DataFrame({"subject": ["a"] * 5, "other": [1] * 5}))
    with pytest.raises(MissingColumnsError) as exc:
        run(tmp_path, source)
    message = str(exc.value)
    assert "'topic'" in message and "joke_about_topic" in message
    assert "Columns found: 'subject', 'other'" in message


def test_preprocess_nulls_and_empties_fail_with_counts_ids_and_skip_hint(tmp_path):
    frame = pl.DataFrame({"topic": ["a", None, "b", "", "  ", "c"]})
    with pytest.raises(MissingValuesError) as exc:
        run(tmp_path, write_csv(tmp_path, frame))
    message = str(exc.value)
    assert "column 'topic': 3 null or empty" in message
    assert "R0000000001, R0000000003, R0000000004" in message
    assert 'on_missing="skip"' in message
    assert not (tmp_path / "run" / "input").exists()


def test_preprocess_skip_leaves_rows_out_of_jobs_and_keeps_them_with_an_error(tmp_path):
    frame = pl.DataFrame({"topic": ["a", None, "b", "", "c", "d"], "k": [0, 1, 2, 3, 4, 5]})
    plan = run(tmp_path, write_csv(tmp_path, frame), on_missing="skip")
    assert plan.skipped_records == 2 and plan.batch_records == 4
    sent = [line["recordId"] for line in read_lines(tmp_path / "run" / plan.shards[0].input_file)]
    assert sent == ["R0000000000", "R0000000002", "R0000000004", "R0000000005"]
    skipped = pl.read_parquet(tmp_path / "run" / plan.skipped_file)
    assert skipped[C.RECORD_ID].to_list() == ["R0000000001", "R0000000003"]
    assert skipped[C.ERROR_CODE].to_list() == [C.MISSING_INPUT] * 2
    assert "on_missing='skip'" in skipped[C.ERROR_MESSAGE][0]


def test_preprocess_blank_values_of_a_categorical_column_are_missing_too(tmp_path):
    # pandas' "category" columns read as Categorical: their blanks were sent as empty prompts.
    source = tmp_path / "cat.parquet"
    topics_ = ["good", "", "   ", "bad"] * 30
    pl.DataFrame({"topic": pl.Series(topics_, dtype=pl.Categorical)}).write_parquet(source)
    with pytest.raises(MissingValuesError) as exc:
        run(tmp_path, str(source))
    message = str(exc.value)
    assert "60 rows have no value" in message and "R0000000001, R0000000002" in message
    assert "CSV" not in message  # the blank-line hint is for CSV sources only


@pytest.mark.parametrize("missing", [{0, 1}, {0, 5, 11}, {4, 5}, {10, 11}])
@pytest.mark.parametrize("jobs", [1, 3])
def test_preprocess_skip_keeps_every_row_once_wherever_the_missing_ones_are(
    tmp_path, missing, jobs
):
    # Rows skipped before the first valid row were once in no shard and not in skipped either.
    frame = pl.DataFrame(
        {"topic": [None if i in missing else f"t{i}" for i in range(12)], "k": list(range(12))}
    )
    plan = run(tmp_path, write_csv(tmp_path, frame), on_missing="skip", max_concurrent_jobs=jobs)
    out = tmp_path / "run"
    sent = pl.concat([pl.read_parquet(out / s.rows_file) for s in plan.shards])
    skipped = pl.read_parquet(out / plan.skipped_file)
    assert sorted(skipped["k"].cast(pl.Int64).to_list()) == sorted(missing)
    assert sorted(sent["k"].cast(pl.Int64).to_list()) == sorted(set(range(12)) - missing)
    for shard in plan.shards:  # each shard's lines are its own rows'
        rows = pl.read_parquet(out / shard.rows_file)
        lines = read_lines(out / shard.input_file)
        assert [ln["recordId"] for ln in lines] == rows[C.RECORD_ID].to_list()
        assert [ln["modelInput"]["messages"][0]["content"] for ln in lines] == [
            f"Tell me a short, family-friendly joke about {t}. Reply with the joke only."
            for t in rows["topic"]
        ]


@pytest.mark.parametrize(("rows", "jobs", "sample"), [(120, 40, 10), (120, 4, 10), (12, 3, 50)])
def test_preprocess_samples_the_settings_count_of_records_spread_over_the_shards(
    tmp_path, monkeypatch, rows, jobs, sample
):
    # The cost estimate calls CountTokens once a sampled record: the sample is the setting's
    # size (or every record), not one record a shard or more, however many shards there are.
    monkeypatch.setenv("BEDROCK_BATCH_COST_SAMPLE_RECORDS", str(sample))
    get_settings.cache_clear()
    try:
        frame = topics(rows).with_columns(
            pl.when(pl.col("n") % 7 == 3).then(None).otherwise(pl.col("topic")).alias("topic")
        )
        plan = run(
            tmp_path, write_csv(tmp_path, frame), on_missing="skip", max_concurrent_jobs=jobs
        )
    finally:
        get_settings.cache_clear()
    out = tmp_path / "run"
    picked = read_lines(out / SAMPLE_FILE)
    assert len(picked) == min(sample, plan.batch_records)
    if jobs > sample:
        assert len(plan.shards) > sample  # where a share a shard counted more than the setting
    sent = {
        s.name: {ln["recordId"]: ln for ln in read_lines(out / s.input_file)} for s in plan.shards
    }
    for pick in picked:
        line = json.loads(pick["line"])
        assert sent[pick["shard"]][line["recordId"]] == line  # the shard's own line, as sent
    shards = {pick["shard"] for pick in picked}
    assert len(shards) == min(len(plan.shards), len(picked))  # every shard, or one record each


def test_preprocess_empty_dataset_fails(tmp_path):
    source = tmp_path / "empty.parquet"
    pl.DataFrame({"topic": []}, schema={"topic": pl.String}).write_parquet(source)
    with pytest.raises(EmptyDatasetError, match="no rows"):
        run(tmp_path, str(source))


def test_preprocess_fewer_records_than_job_minimum_explains_quota(tmp_path):
    with pytest.raises(TooFewRecordsError) as exc:
        run(tmp_path, write_csv(tmp_path, topics(50)), quotas=QuotaSettings())
    message = str(exc.value)
    assert "Only 50 records" in message and "at least 100" in message
    assert "BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB" in message
    assert "Or set on_demand=True to serve them through bedrock-runtime" in message


def test_preprocess_fewer_records_than_job_minimum_on_demand_is_one_shard_of_every_row(tmp_path):
    source = write_csv(tmp_path, topics(50))
    plan = run(tmp_path, source, quotas=QuotaSettings(), small_on_demand=True)
    assert [(s.records, s.on_demand) for s in plan.shards] == [(50, True)]
    lines = read_lines(tmp_path / "run" / plan.shards[0].input_file)
    rows = pl.read_parquet(tmp_path / "run" / plan.shards[0].rows_file)
    assert [line["recordId"] for line in lines] == rows[C.RECORD_ID].to_list()
    assert rows["topic"].to_list() == pl.read_csv(source)["topic"].to_list()


def test_preprocess_record_over_model_limit_names_record_and_size(tmp_path):
    texts = ["short"] * 4 + ["x" * 3000]
    source = write_csv(tmp_path, pl.DataFrame({"input_text": texts}))
    with pytest.raises(RecordTooLargeError) as exc:
        run(tmp_path, source, model_id="cohere.embed-english-v3", prompt_id=None)
    message = str(exc.value)
    assert "R0000000004" in message and "2,048 characters" in message and "3,000" in message


def test_preprocess_cohere_v4_sends_texts_over_the_v3_character_limit(tmp_path):
    # Embed v4 reads up to ~128k tokens a text; the 2,048-character limit is Embed v3's.
    texts = ["short"] * 4 + ["x" * 3000]
    source = write_csv(tmp_path, pl.DataFrame({"input_text": texts}))
    quotas = QuotaSettings(min_records_per_job=1)
    plan = run(tmp_path, source, model_id="cohere.embed-v4:0", prompt_id=None, quotas=quotas)
    lines = [line for s in plan.shards for line in read_lines(tmp_path / "run" / s.input_file)]
    assert sorted(len(line["modelInput"]["texts"][0]) for line in lines) == [5, 5, 5, 5, 3000]


def test_preprocess_record_over_file_limit_names_record_and_setting(tmp_path):
    texts = ["short"] * 4 + ["y" * 5000]
    quotas = QuotaSettings(min_records_per_job=1, max_file_bytes=2000)
    source = write_csv(tmp_path, pl.DataFrame({"input_text": texts}))
    with pytest.raises(RecordTooLargeError) as exc:
        run(tmp_path, source, model_id=TITAN, prompt_id=None, quotas=quotas)
    message = str(exc.value)
    assert "R0000000004" in message and "2,000 bytes" in message
    assert "BEDROCK_BATCH_QUOTA_MAX_FILE_BYTES" in message


def test_preprocess_byte_limit_cuts_more_shards(tmp_path):
    quotas = QuotaSettings(min_records_per_job=2, max_file_bytes=1500)
    source = write_csv(tmp_path, pl.DataFrame({"input_text": [f"text {i}" for i in range(40)]}))
    plan = run(tmp_path, source, model_id=TITAN, prompt_id=None, quotas=quotas)
    assert len(plan.shards) > 1
    assert all(s.bytes <= 1500 and s.records >= 2 for s in plan.shards)
    assert plan.batch_records == 40


def test_preprocess_duplicate_user_ids_are_listed(tmp_path):
    frame = topics(6).with_columns(pl.Series("my_id", ["a", "b", "a", "c", "b", "d"]))
    with pytest.raises(DuplicateIdError) as exc:
        run(tmp_path, write_csv(tmp_path, frame), id_column="my_id")
    assert "'my_id'" in str(exc.value) and "'a', 'b'" in str(exc.value)


def test_preprocess_empty_duplicate_ids_are_shown_as_empty(tmp_path):
    frame = topics(4).with_columns(pl.Series("my_id", ["", "x", "", "y"]))
    with pytest.raises(DuplicateIdError) as exc:
        run(tmp_path, write_csv(tmp_path, frame), id_column="my_id")
    assert "e.g. ''." in str(exc.value)  # was "e.g. ." with nothing to see


def test_preprocess_keeps_user_id_column_as_a_normal_column(tmp_path):
    frame = topics(4).with_columns(pl.Series("my_id", ["w", "x", "y", "z"]))
    plan = run(tmp_path, write_csv(tmp_path, frame), id_column="my_id")
    rows = pl.read_parquet(tmp_path / "run" / plan.shards[0].rows_file)
    expected = pl.DataFrame(
        {"my_id": ["w", "x", "y", "z"], C.RECORD_ID: [f"R{i:010d}" for i in range(4)]}
    )
    assert_frame_equal(rows.select("my_id", C.RECORD_ID), expected)


def test_preprocess_unknown_model_fails_before_reading(tmp_path):
    with pytest.raises(UnknownModelError, match="acme.x"):
        run(tmp_path, str(tmp_path / "never-read.csv"), model_id="acme.x")


def test_preprocess_text_model_without_prompt_asks_for_prompt_id(tmp_path):
    with pytest.raises(InputValidationError, match="needs a prompt_id"):
        run(tmp_path, write_csv(tmp_path, topics(5)), prompt_id=None)


def test_preprocess_source_with_output_column_names_is_refused(tmp_path):
    frame = topics(5).with_columns(pl.lit("x").alias(C.RESPONSE_TEXT))
    with pytest.raises(InputValidationError, match="response_text"):
        run(tmp_path, write_csv(tmp_path, frame))


def test_preprocess_explicit_max_records_per_job_is_respected(tmp_path):
    plan = run(tmp_path, write_csv(tmp_path, topics(25)), max_records_per_job=10)
    assert [s.records for s in plan.shards] == [8, 8, 9]


def test_preprocess_parquet_source_and_embedding_text_column(tmp_path):
    source = tmp_path / "reviews.parquet"
    pl.DataFrame({"body": ["good", "bad", "fine", "meh"]}).write_parquet(source)
    plan = run(tmp_path, str(source), model_id=TITAN, prompt_id=None, text_column="body")
    line = read_lines(tmp_path / "run" / plan.shards[0].input_file)[2]
    assert line == {
        "recordId": "R0000000002",
        "modelInput": {"inputText": "fine", "dimensions": 1024, "normalize": True},
    }


def test_format_plan_of_an_embedding_run_names_the_column_it_embeds(tmp_path):
    # Without --text-column it said "prompt None".
    source = tmp_path / "reviews.parquet"
    pl.DataFrame({"input_text": ["good", "bad", "fine", "meh"]}).write_parquet(source)
    plan = run(tmp_path, str(source), model_id=TITAN, prompt_id=None)
    first = format_plan(plan).splitlines()[0]
    assert first.endswith("(amazon-titan-embed-v2, InvokeModel), embedding column input_text")


def test_format_plan_shows_jobs_records_and_bytes_but_leaves_tokens_to_the_estimate(tmp_path):
    # Its "est. tokens" (prompt characters / 4, no system prompt: 5,480 for data/topics.csv)
    # sat above the cost estimate's input tokens for the same shards (8,792).
    plan = run(tmp_path, write_csv(tmp_path, topics(10)), max_concurrent_jobs=2)
    table = format_plan(plan)
    assert "shard-00000" in table and "shard-00001" in table and "total" in table
    assert "tokens" not in table


def test_run_plan_round_trips_through_json(tmp_path):
    plan = run(tmp_path, write_csv(tmp_path, topics(6)))
    assert RunPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["totals"]["jobs"] == len(plan.shards)


def test_preprocess_keeps_csv_values_as_written_in_prompts_and_rows(tmp_path):
    src = tmp_path / "zips.csv"
    rows = "\n".join(f"{i:05d},{'0' * (1 + i % 3)}{i}" for i in range(120))
    src.write_text("topic,sku\n" + rows + "\n")
    plan = run(tmp_path, str(src), id_column="sku")
    out = tmp_path / "run"
    frame = pl.read_parquet(out / plan.shards[0].rows_file)
    assert frame["topic"].dtype == pl.String
    assert frame["topic"][7] == "00007"
    first_line = (out / plan.shards[0].input_file).read_text().splitlines()[0]
    assert "00000" in first_line


def test_preprocess_ids_that_differ_only_in_leading_zeros_are_distinct(tmp_path):
    src = tmp_path / "ids.csv"
    ids = ["0" * n for n in range(1, 121)]  # 0, 00, 000, ...: distinct as text, equal as numbers
    pl.DataFrame({"topic": [f"t{i}" for i in range(120)], "id": ids}).write_csv(src)
    plan = run(tmp_path, str(src), id_column="id")
    assert plan.total_records == 120


def _plans_from_every_row(monkeypatch) -> list[int]:
    """Count the two-pass plans preprocess makes (the one-pass plan makes none)."""
    import tasks.pipeline.preprocess as P

    calls: list[int] = []
    plan_ranges = P._plan_ranges

    def counted(work):
        calls.append(1)
        return plan_ranges(work)

    monkeypatch.setattr(P, "_plan_ranges", counted)
    return calls


def _run_files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "plan.json"
    }


def test_one_pass_plan_writes_what_the_plan_from_every_row_writes(tmp_path, monkeypatch):
    calls = _plans_from_every_row(monkeypatch)
    n = 61
    frame = pl.DataFrame(
        {"topic": [f"{TRICKY[i % len(TRICKY)]} {i}" for i in range(n)], "n": list(range(n))}
    )
    source = tmp_path / "src.parquet"
    frame.write_parquet(source)
    one = run(tmp_path, str(source), "one", max_concurrent_jobs=4)
    assert calls == []  # read once: no plan from every row
    # on_missing="skip" always plans from every row; without missing values it must agree.
    two = run(tmp_path, str(source), "two", max_concurrent_jobs=4, on_missing="skip")
    assert calls == [1]
    assert one.shards == two.shards
    assert len(one.shards) == 4 and sum(s.records for s in one.shards) == n
    assert _run_files(tmp_path / "one") == _run_files(tmp_path / "two")
    for shard in one.shards:
        assert shard.bytes == (tmp_path / "one" / shard.input_file).stat().st_size
        lines = read_lines(tmp_path / "one" / shard.input_file)
        prompts = [line["modelInput"]["messages"][0]["content"] for line in lines]
        assert shard.chars == sum(len(p) for p in prompts)
    sent = [
        line["recordId"]
        for shard in one.shards
        for line in read_lines(tmp_path / "one" / shard.input_file)
    ]
    assert sent == [f"R{i:010d}" for i in range(n)]


def test_one_pass_missing_value_in_a_later_shard_fails_and_leaves_no_shard(tmp_path):
    topics_ = [f"topic {i}" for i in range(30)]
    topics_[25] = None
    source = write_csv(tmp_path, pl.DataFrame({"topic": topics_}))
    with pytest.raises(MissingValuesError) as exc:
        run(tmp_path, source, max_concurrent_jobs=3)
    assert "R0000000025" in str(exc.value) and "1 null or empty" in str(exc.value)
    assert not (tmp_path / "run" / "input").exists()
    assert not (tmp_path / "run" / "rows").exists()


def test_one_pass_prompt_over_model_limit_in_a_later_shard_names_it(tmp_path):
    texts = ["short"] * 9 + ["x" * 3000]
    source = write_csv(tmp_path, pl.DataFrame({"input_text": texts}))
    with pytest.raises(RecordTooLargeError) as exc:
        run(
            tmp_path,
            source,
            model_id="cohere.embed-english-v3",
            prompt_id=None,
            max_concurrent_jobs=2,
        )
    assert "R0000000009" in str(exc.value) and "3,000" in str(exc.value)
    assert not (tmp_path / "run" / "input").exists()


def test_one_pass_shard_over_byte_limit_is_cut_by_bytes_and_files_fit(tmp_path, monkeypatch):
    calls = _plans_from_every_row(monkeypatch)
    texts = [f"text {i}" for i in range(30)] + ["z" * 400 for _ in range(10)]
    quotas = QuotaSettings(min_records_per_job=2, max_file_bytes=2000)
    source = write_csv(tmp_path, pl.DataFrame({"input_text": texts}))
    plan = run(
        tmp_path, source, model_id=TITAN, prompt_id=None, quotas=quotas, max_concurrent_jobs=2
    )
    assert calls == [1]  # the even cut did not hold, so the plan came from every row
    assert plan.batch_records == 40 and len(plan.shards) > 2
    for shard in plan.shards:
        size = (tmp_path / "run" / shard.input_file).stat().st_size
        assert size == shard.bytes <= 2000  # the file, newlines included, within the limit


def test_one_pass_duplicate_ids_fail_and_leave_no_shard(tmp_path):
    frame = pl.DataFrame({"topic": [f"t{i}" for i in range(12)], "doc": [1, 2, 3] * 4})
    with pytest.raises(DuplicateIdError):
        run(tmp_path, write_csv(tmp_path, frame), id_column="doc", max_concurrent_jobs=2)
    assert not (tmp_path / "run" / "input").exists()
    assert not (tmp_path / "run" / "rows").exists()


def test_preprocess_a_duration_in_the_prompt_is_refused_by_name(tmp_path):
    from datetime import timedelta

    from tasks.errors import InputValidationError

    source = tmp_path / "durations.parquet"
    pl.DataFrame({"topic": [timedelta(seconds=i) for i in range(3)]}).write_parquet(source)
    with pytest.raises(InputValidationError) as exc:  # a Polars traceback before
        run(tmp_path, str(source))
    assert "'topic' (Duration" in str(exc.value) and "no text form" in str(exc.value)


def test_preprocess_too_few_rows_left_after_skipping_says_how_many_were_skipped(tmp_path):
    frame = pl.DataFrame({"topic": ["a", None, "", "b"]})
    with pytest.raises(TooFewRecordsError) as exc:
        run(tmp_path, write_csv(tmp_path, frame), on_missing="skip")
    message = str(exc.value)
    assert message.startswith("Only 2 records to send")
    assert "Of the source's 4 rows, 2 were skipped for a missing value" in message


def test_preprocess_a_source_column_named_like_an_answer_field_is_refused(tmp_path):
    # grade_answer's schema writes `correct` and `reason`: a source column `reason` made every
    # shard's merge fail on a duplicate name, after its job was paid.
    from tasks.errors import InputValidationError

    frame = pl.DataFrame(
        {
            "source": ["q1", "q2", "q3"],
            "target": ["a", "b", "c"],
            "answer_response_text": ["a", "x", "c"],
            "reason": ["r1", "r2", "r3"],
        }
    )
    with pytest.raises(InputValidationError) as exc:
        run(tmp_path, write_csv(tmp_path, frame), prompt_id="grade_answer")
    assert "'reason'" in str(exc.value) and "output schema" in str(exc.value)


def test_read_sample_keeps_a_prompt_with_a_line_separator_in_one_request(tmp_path):
    # The sample lines hold prompts as the user wrote them; U+2028 stays raw in JSON, and
    # str.splitlines() cut the line there: the estimate failed with a JSONDecodeError.
    from tasks.pipeline.estimate import read_sample

    body = {"messages": [{"role": "user", "content": "one\u2028two\u2029three\x85four"}]}
    line = json.dumps({"recordId": "R0000000000", "modelInput": body}, ensure_ascii=False)
    (tmp_path / SAMPLE_FILE).write_text(line + "\n", encoding="utf-8")

    assert read_sample(tmp_path) == [{"recordId": "R0000000000", "modelInput": body}]


def _jsonl(path: Path, lines: list[str]) -> str:
    """JSONL as written by hand, so escapes reach the reader exactly as the test spells them."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("name", ["src.jsonl", "src.jsonl.gz"])
@pytest.mark.parametrize("column", ["topic", "note"])
def test_half_a_surrogate_pair_in_jsonl_is_refused_with_its_line(tmp_path, name, column):
    # json.dumps writes text cut inside an emoji as "\ud83d" alone: UTF-8 cannot hold it and
    # Polars reads it as U+0000, so prompt and output would carry a NUL the user never wrote.
    rows = [{"topic": f"topic {i}", "note": "ok 😀"} for i in range(6)]
    rows[4][column] = "cut \ud83d"
    source = _jsonl(tmp_path / name, [json.dumps(row) for row in rows])
    with pytest.raises(InputValidationError) as exc:
        run(tmp_path, source)
    message = str(exc.value)
    assert f"line 5 has half a UTF-16 surrogate pair (\\ud83d) in '{column}'" in message
    assert "U+0000" in message
    assert not list((tmp_path / "run" / "input").glob("*"))


def test_a_genuine_nul_and_whole_pairs_in_jsonl_are_kept_as_written(tmp_path):
    values = ["nul \u0000 here", "pair \U0001f600", 'escaped "\\\\ud83d" text', "plain"]
    lines = [
        '{"topic": "nul \\u0000 here"}',
        '{"topic": "pair \\ud83d\\ude00"}',
        '{"topic": "escaped \\"\\\\\\\\ud83d\\" text"}',
        '{"topic": "plain"}',
    ]
    plan = run(tmp_path, _jsonl(tmp_path / "src.jsonl", lines))
    assert plan.total_records == 4
    rows = pl.read_parquet(tmp_path / "run" / plan.shards[0].rows_file)
    assert rows["topic"].to_list() == values
    lines = read_lines(tmp_path / "run" / plan.shards[0].input_file)
    prompts = [line["modelInput"]["messages"][0]["content"] for line in lines]
    assert all(v in p for v, p in zip(values, prompts, strict=True)), prompts


def test_plan_of_a_small_run_says_it_is_served_on_demand(tmp_path):
    small = run(tmp_path, write_csv(tmp_path, topics(2)), small_on_demand=True)
    assert small.jobs_phrase() == "1 shard on demand (bedrock-runtime, the full price)"
    assert "shard-00000: 2 records, under a job's minimum of 3: served on demand" in format_plan(
        small
    )
    batch = run(tmp_path, write_csv(tmp_path, topics(10), "big.csv"), "big", max_concurrent_jobs=2)
    assert batch.jobs_phrase() == "2 batch jobs"
    assert "on demand" not in format_plan(batch)


@pytest.mark.parametrize("name", ["src.jsonl", "src.jsonl.gz", "src.csv"])
def test_an_integer_a_float_column_would_round_is_refused_with_its_line(tmp_path, name):
    # Beside decimals, a JSONL key (or a CSV column typed by csv_types="infer") reads as Float64,
    # which holds integers exactly only up to 2^53: 9007199254740993 became 9007199254740992.0.
    scores = ["1.5", "2", "3", "9007199254740993", "4.25"]
    if name.endswith(".csv"):
        lines = ["topic,score", *(f"topic {i},{s}" for i, s in enumerate(scores))]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        source, line = str(tmp_path / name), 5
    else:
        lines = [f'{{"topic": "topic {i}", "score": {s}}}' for i, s in enumerate(scores)]
        source, line = _jsonl(tmp_path / name, lines), 4
    options = {"csv_types": "infer"} if name.endswith(".csv") else {}
    with pytest.raises(InputValidationError) as exc:
        run(tmp_path, source, **options)
    message = str(exc.value)
    assert (
        f"line {line} has the integer 9007199254740993 in 'score', which would be read as "
        "9007199254740992.0" in message
    ), message
    assert "Write that column's values as strings" in message
    assert not list((tmp_path / "run" / "input").glob("*"))


def test_large_floats_and_exact_integers_beside_decimals_are_kept(tmp_path):
    # Values of 2^53 and beyond that a float holds as written: no refusal, values unchanged.
    scores = ["1.5", "9007199254740992", "1e20", "-123456789012345678901234.0", "18014398509481984"]
    lines = [f'{{"topic": "topic {i}", "score": {s}}}' for i, s in enumerate(scores)]
    plan = run(tmp_path, _jsonl(tmp_path / "src.jsonl", lines))
    rows = pl.read_parquet(tmp_path / "run" / plan.shards[0].rows_file)
    assert rows["score"].to_list() == [float(s) for s in scores]


def test_a_large_integer_in_a_text_csv_column_is_kept_as_written(tmp_path):
    (tmp_path / "src.csv").write_text("topic,score\nt0,1.5\nt1,9007199254740993\nt2,3\n")
    plan = run(tmp_path, str(tmp_path / "src.csv"))
    rows = pl.read_parquet(tmp_path / "run" / plan.shards[0].rows_file)
    assert rows["score"].to_list() == ["1.5", "9007199254740993", "3"]


def test_plan_shard_ids_are_the_ids_of_each_rows_file_with_rows_skipped(tmp_path):
    # A resume checks each rows file against these ids (a deleted or swapped one is rebuilt):
    # with skipped rows between and inside shards they must still be exact.
    text = [None if i % 7 in (0, 3) else f"q{i}" for i in range(420)]
    src = write_csv(tmp_path, pl.DataFrame({"source": text}))
    plan = preprocess(
        src,
        model_id=CLAUDE,
        prompt_id="question_answering",
        on_missing="skip",
        max_records_per_job=100,
        out_dir=tmp_path / "out",
    )
    skipped = pl.read_parquet(tmp_path / "out" / plan.skipped_file)[C.RECORD_ID]
    assert len(plan.shards) > 1 and skipped.len() == plan.skipped_records
    for shard, ids in zip(plan.shards, plan.shard_ids(skipped), strict=True):
        rows = pl.read_parquet(tmp_path / "out" / shard.rows_file)[C.RECORD_ID]
        assert rows.to_list() == ids.to_list()
