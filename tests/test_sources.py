"""Sources: local files, globs, folders, hf:// datasets, and their errors."""

from __future__ import annotations

import gzip

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.errors import SourceEncodingError, SourceError
from tasks.pipeline import sources
from tasks.pipeline.sources import load_source, parse_hf_source

FRAME = pl.DataFrame({"topic": ["a", "b", "c"], "n": [1, 2, 3]})


def _write(frame: pl.DataFrame, path) -> None:
    """`frame` in the format its name says, gzipped for a `.gz` name."""
    gzipped = path.name.lower().endswith(".gz")
    plain = path.with_name(path.name[:-3] if gzipped else path.name)
    if plain.name.lower().endswith(".csv"):
        frame.write_csv(plain)
    elif plain.name.endswith(".parquet"):
        frame.write_parquet(plain)
    else:
        frame.write_ndjson(plain)
    if gzipped:
        path.write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()


@pytest.mark.parametrize(
    "name", ["x.csv", "x.parquet", "x.jsonl", "x.ndjson", "x.csv.gz", "x.jsonl.gz", "X.CSV.GZ"]
)
def test_load_source_reads_each_format(tmp_path, name):
    path = tmp_path / name
    _write(FRAME, path)
    csv_types = "infer" if ".csv" in name.lower() else "text"
    assert_frame_equal(load_source(str(path), csv_types).collect(), FRAME)


def test_load_source_reads_zstd_csv_and_names_it_when_not_utf8(tmp_path):
    pa = pytest.importorskip("pyarrow")
    good, bad = tmp_path / "x.csv.zst", tmp_path / "latin.csv.zst"
    good.write_bytes(pa.compress(FRAME.write_csv().encode(), codec="zstd", asbytes=True))
    bad.write_bytes(pa.compress("topic\ncaf\xe9\n".encode("latin-1"), "zstd", asbytes=True))

    assert_frame_equal(load_source(str(good), "infer").collect(), FRAME)
    error = _read(str(bad))
    assert isinstance(error, SourceEncodingError) and "latin.csv.zst" in str(error), error


def test_load_source_folder_of_gzipped_csv_reads_them_all(tmp_path):
    _write(FRAME, tmp_path / "a.csv.gz")
    _write(FRAME, tmp_path / "b.csv.gz")
    assert load_source(str(tmp_path)).collect().height == 2 * FRAME.height


def test_load_source_gzipped_parquet_is_refused_with_the_extensions(tmp_path):
    (tmp_path / "x.parquet.gz").write_bytes(gzip.compress(b"not read"))
    with pytest.raises(SourceError, match=r"\.csv / \.jsonl / \.ndjson compressed"):
        load_source(str(tmp_path / "x.parquet.gz"))


@pytest.mark.parametrize("name", ["x.csv.gz", "x.jsonl.gz"])
def test_load_source_gz_that_is_not_gzip_says_so(tmp_path, name):
    (tmp_path / name).write_text("topic\na\n")
    message = str(_read(str(tmp_path / name)))
    assert "is not gzip" in message and name in message, message


def test_read_error_names_the_line_inside_a_gzipped_csv(tmp_path):
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(gzip.compress(b"topic,n\na,1\nb,2,3\n"))
    assert "line 3 has 3 fields" in str(_read(str(path)))


def test_load_source_utf16_csv_says_it_is_utf16_and_how_to_recode_it(tmp_path):
    path = tmp_path / "unicode.csv"
    path.write_bytes("topic,n\ncafé,1\n".encode("utf-16"))  # with its byte order mark
    with pytest.raises(SourceEncodingError) as exc:
        load_source(str(path))
    assert "it is UTF-16" in str(exc.value) and "iconv -f utf-16 -t utf-8" in str(exc.value)


def test_load_source_non_utf8_gzipped_csv_says_how_to_recode_it(tmp_path):
    path = tmp_path / "latin.csv.gz"
    path.write_bytes(gzip.compress("topic\ncaf\xe9\n".encode("latin-1")))
    with pytest.raises(SourceEncodingError, match="gunzip -c .*latin.csv.gz | iconv"):
        load_source(str(path))


def test_load_source_csv_keeps_values_as_written(tmp_path):
    path = tmp_path / "zips.csv"
    path.write_text("zip,sku,price\n00007,000,1.50\n10001,00,2\n")
    frame = load_source(str(path)).collect()
    assert frame.schema == pl.Schema({"zip": pl.String, "sku": pl.String, "price": pl.String})
    assert frame.rows() == [("00007", "000", "1.50"), ("10001", "00", "2")]


def test_load_source_jsonl_keeps_a_key_first_seen_after_line_1000(tmp_path):
    path = tmp_path / "late.jsonl"
    lines = [f'{{"topic": "t{i}"}}' for i in range(1500)] + ['{"topic": "x", "late": "kept"}']
    path.write_text("\n".join(lines) + "\n")
    frame = load_source(str(path)).collect()
    assert frame.columns == ["topic", "late"]
    assert frame["late"].drop_nulls().to_list() == ["kept"]


def test_load_source_glob_with_different_columns_names_files_and_columns(tmp_path):
    pl.DataFrame({"topic": ["a"], "zip": ["1"]}).write_csv(tmp_path / "a.csv")
    pl.DataFrame({"topic": ["b"], "name": ["bob"]}).write_csv(tmp_path / "b.csv")
    with pytest.raises(SourceError) as exc:
        load_source(str(tmp_path / "*.csv"))
    message = str(exc.value)
    assert "b.csv" in message and "a.csv" in message
    assert "has name" in message and "lacks zip" in message


def test_load_source_glob_matches_columns_by_name(tmp_path):
    pl.DataFrame({"topic": ["a"], "zip": ["1"]}).write_csv(tmp_path / "a.csv")
    pl.DataFrame({"zip": ["2"], "topic": ["b"]}).write_csv(tmp_path / "b.csv")
    frame = load_source(str(tmp_path / "*.csv")).collect()
    assert sorted(frame.rows()) == [("a", "1"), ("b", "2")]


def test_load_source_unknown_csv_types_is_refused(tmp_path):
    FRAME.write_csv(tmp_path / "x.csv")
    with pytest.raises(SourceError, match="csv_types='guess'"):
        load_source(str(tmp_path / "x.csv"), "guess")


def test_load_source_glob_and_folder_read_all_files(tmp_path):
    FRAME.write_parquet(tmp_path / "a.parquet")
    FRAME.write_parquet(tmp_path / "b.parquet")
    assert load_source(str(tmp_path / "*.parquet")).collect().height == 6
    assert load_source(str(tmp_path)).collect().height == 6


def test_load_source_csv_keeps_empty_strings_apart_from_nulls(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('topic\n""\nb\n')
    assert load_source(str(path)).collect()["topic"].to_list() == ["", "b"]


def test_load_source_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "x.xlsx"
    path.write_text("nope")
    with pytest.raises(SourceError) as exc:
        load_source(str(path))
    assert "'.xlsx'" in str(exc.value) and ".parquet" in str(exc.value)


def test_load_source_no_matching_files_says_so(tmp_path):
    with pytest.raises(SourceError, match="matches no file"):
        load_source(str(tmp_path / "missing-*.csv"))


def test_load_source_non_utf8_csv_names_file_and_fix(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("topic\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceEncodingError) as exc:
        load_source(str(path))
    assert "latin.csv" in str(exc.value) and "not UTF-8" in str(exc.value)
    assert "iconv" in str(exc.value)


def _read(source: str, csv_types: str = "text") -> SourceError:
    """The error reading `source` all the way, as preprocess does, ends in."""
    with pytest.raises(SourceError) as exc:
        try:
            load_source(source, csv_types).collect()
        except pl.exceptions.PolarsError as polars_error:
            raise sources.read_error(polars_error, source) from None
    return exc.value


# A quoted value over two lines first: the line named is the file's line, not the record's.
_TWO_LINES = 'topic,n\n"two\nlines",1\nok,2\n'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (_TWO_LINES + "a,b,c\n", ["line 5 has 3 fields where the header has 2", "quote"]),
        (_TWO_LINES + '"never closed,3\nx,4\n', ["starts on line 5", "close the quote"]),
    ],
)
def test_read_error_names_the_csv_line_and_not_polars_options(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)

    message = str(_read(str(path)))

    for word in words:
        assert word in message, message
    assert "bad.csv" in message
    for polars_option in ("truncate_ragged_lines", "ignore_errors", "infer_schema_length"):
        assert polars_option not in message, message


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (['{"topic": "a"}', "not json"], ["line 2 is not JSON", "one object per line"]),
        (['{"topic": "a"}', "", "[1, 2]"], ["line 3 is an array: write one object"]),
        (['\ufeff{"topic": "a"}', '{"topic": "b"}'], ["line 1 starts with a byte order mark"]),
        (
            ['{"m": {"x": 1}}', '{"m": null}', '{"m": [1]}'],
            ["line 3 has an array under 'm' where line 1 has an object"],
        ),
        # Python's json.dumps writes NaN, which Python's json reads and JSON (Polars) does not.
        (['{"topic": "a", "x": 1.5}', '{"topic": "b", "x": NaN}'], ["line 2 has NaN", "null"]),
    ],
)
def test_read_error_names_the_jsonl_line(tmp_path, lines, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    message = str(_read(str(path)))

    for word in words:
        assert word in message, message


def test_read_error_of_a_value_unlike_its_guessed_type_names_it_and_the_default(tmp_path):
    path = tmp_path / "late.csv"
    path.write_text("topic,n\n" + "".join(f"t{i},{i}\n" for i in range(10_500)) + "tx,abc\n")

    message = str(_read(str(path), "infer"))

    assert "could not parse `abc` as dtype `i64` at column 'n'" in message, message
    assert 'keep the default csv_types="text"' in message
    assert "infer_schema_length" not in message and "offset in the file" not in message


def test_read_error_of_a_glob_names_the_file_at_fault(tmp_path):
    (tmp_path / "a.csv").write_text("topic\nfine\n")
    (tmp_path / "b.csv").write_text('topic\nfine\n"open\n')

    message = str(_read(str(tmp_path / "*.csv")))

    assert "b.csv" in message and "starts on line 3" in message, message
    assert "a.csv" not in message


def test_read_error_of_an_empty_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert "the file is empty, without even a header" in str(_read(str(path)))


def test_check_header_refuses_a_csv_column_named_twice(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("topic,n,topic\na,1,b\n")
    names = load_source(str(path)).collect_schema().names()

    with pytest.raises(SourceError, match="'topic' more than once"):
        sources.check_header(names, str(path))


def test_check_header_leaves_parquet_names_alone(tmp_path):
    path = tmp_path / "x.parquet"
    pl.DataFrame({"a": [1], "a_duplicated_0": [2]}).write_parquet(path)
    sources.check_header(["a", "a_duplicated_0"], str(path))


@pytest.mark.parametrize("source", ["ftp://x/y.csv", "", "s3://bucket-only", "s3:///key.csv"])
def test_load_source_malformed_uri_is_refused(source):
    with pytest.raises(SourceError):
        load_source(source)


def test_parse_hf_source_reads_split_and_config():
    assert parse_hf_source("hf://owner/ds?split=test&config=en") == ("owner/ds", "en", "test")
    assert parse_hf_source("hf://owner/ds") == ("owner/ds", None, "train")


def test_parse_hf_source_unknown_key_shows_syntax():
    with pytest.raises(SourceError, match=r"hf://<owner>/<dataset>\?split="):
        parse_hf_source("hf://owner/ds?splt=train")


def test_load_source_hf_goes_through_load_dataset_and_arrow(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"source": ["q1", "q2"], "target": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: None)
    frame = load_source("hf://KaiserWhoLearns/SimpleCoT?split=train").collect()
    assert calls == [("KaiserWhoLearns/SimpleCoT", None, "train")]
    assert_frame_equal(frame, pl.DataFrame({"source": ["q1", "q2"], "target": ["a", "b"]}))


def test_load_source_hf_from_a_save_to_disk_folder_by_absolute_path(tmp_path):
    import datasets

    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"input_text": ["x", "y", "z"]}).save_to_disk(str(saved))
    frame = load_source(f"hf://{saved}?split=train").collect()
    assert frame["input_text"].to_list() == ["x", "y", "z"]


def test_load_source_hf_from_a_saved_dataset_dict_picks_the_split(tmp_path):
    import datasets

    saved = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_text": ["a"]}),
            "test": datasets.Dataset.from_dict({"input_text": ["b", "c"]}),
        }
    ).save_to_disk(str(saved))
    frame = load_source(f"hf://{saved}?split=test").collect()
    assert frame["input_text"].to_list() == ["b", "c"]


def test_load_source_hf_from_a_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pl.DataFrame({"input_text": ["a", "b"]}).write_parquet(folder / "part-0.parquet")
    pl.DataFrame({"input_text": ["c"]}).write_parquet(folder / "part-1.parquet")
    frame = load_source(f"hf://{folder}").collect()
    assert sorted(frame["input_text"].to_list()) == ["a", "b", "c"]


def test_load_source_hf_folder_of_parquet_files_that_disagree_is_one_line(tmp_path):
    # datasets' DatasetGenerationError came out as a traceback.
    folder = tmp_path / "pq"
    folder.mkdir()
    pl.DataFrame({"topic": ["a", "b"], "n": [1, 2]}).write_parquet(folder / "a.parquet")
    pl.DataFrame({"n": [3.5], "topic": ["c"]}).write_parquet(folder / "b.parquet")
    with pytest.raises(SourceError) as exc:
        load_source(f"hf://{folder}").collect()
    message = str(exc.value)
    assert f"the .parquet files under {folder} could not be read as one dataset" in message
    assert "DatasetGenerationError" in message and "\n" not in message


def test_load_source_hf_unreachable_hub_fails_fast_with_the_offline_switch(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(SourceError) as exc:
        load_source("hf://owner/some-dataset?split=train")
    assert time.monotonic() - start < 10
    message = str(exc.value)
    assert "HF_HUB_OFFLINE=1" in message and "'owner/some-dataset'" in message
    assert "save_to_disk" in message


def test_load_source_hf_failure_names_dataset_and_hint(monkeypatch):
    import datasets

    def boom(path, name=None, split=None):
        raise FileNotFoundError("not on the hub")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: None)
    with pytest.raises(SourceError) as exc:
        load_source("hf://owner/missing?split=train")
    assert "'owner/missing'" in str(exc.value) and "HF_TOKEN" in str(exc.value)


def test_run_fingerprint_of_a_local_hf_folder_follows_its_files(tmp_path):
    import datasets

    from tasks.run.identity import source_fingerprint

    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"input_text": ["x"]}).save_to_disk(str(saved))
    before = source_fingerprint(f"hf://{saved}")
    datasets.Dataset.from_dict({"input_text": ["y"]}).save_to_disk(str(tmp_path / "ds2"))
    (saved / "extra.txt").write_text("changed")
    after = source_fingerprint(f"hf://{saved}")
    assert before["files"] and before != after


def test_read_error_of_text_not_utf8_speaks_of_the_sources_own_format(tmp_path):
    # Both were told "CSV file ... is not UTF-8 ... > fixed.csv".
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"topic": "caf\xe9"}\n')
    message = str(_read(str(latin)))
    assert message.startswith(f"JSONL file '{latin}' is not UTF-8"), message
    assert "> fixed.jsonl" in message

    import pyarrow as pa
    import pyarrow.parquet as pq

    binary = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"topic": pa.array([b"caf\xe9", b"ok"])}), binary)
    with pytest.raises(SourceError) as exc:
        try:
            load_source(str(binary)).select(pl.col("topic").cast(pl.String)).collect()
        except pl.exceptions.PolarsError as polars_error:
            raise sources.read_error(polars_error, str(binary)) from None
    assert "Parquet source" in str(exc.value) and "not UTF-8" in str(exc.value)
    assert "CSV" not in str(exc.value)


def test_load_source_glob_with_an_empty_jsonl_names_it(tmp_path):
    # Polars: "Cannot infer NDJSON types on empty reader", naming no file.
    (tmp_path / "a.jsonl").write_text('{"topic": "a"}\n')
    (tmp_path / "b.jsonl").write_text("\n")
    with pytest.raises(SourceError) as exc:
        load_source(str(tmp_path / "*.jsonl"))
    assert f"The file '{tmp_path / 'b.jsonl'}'" in str(exc.value)
    assert "is empty: remove it" in str(exc.value)


def test_load_source_glob_refuses_a_common_type_that_drops_datetime_digits(tmp_path):
    # datetime[ns] in one file and datetime[ms] in the other read as datetime[ms]: the
    # nanoseconds of the first file's values were dropped without a word.
    stamps = pl.Series(["2024-01-01 00:00:00.123456789"]).str.to_datetime(time_unit="ns")
    pl.DataFrame({"topic": ["a"], "at": stamps}).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame({"topic": ["b"], "at": stamps.dt.cast_time_unit("ms")}).write_parquet(
        tmp_path / "b.parquet"
    )
    with pytest.raises(SourceError) as exc:
        load_source(str(tmp_path / "*.parquet"))
    message = str(exc.value)
    assert "type column 'at' differently" in message
    assert "would become Datetime(time_unit='ms'" in message and "a.parquet" in message


def test_load_source_glob_refuses_integers_a_float_column_would_round(tmp_path):
    big = 2**53 + 1
    (tmp_path / "a.jsonl").write_text(f'{{"topic": "a", "n": {big}}}\n')
    (tmp_path / "b.jsonl").write_text('{"topic": "b", "n": 1.5}\n')
    with pytest.raises(SourceError) as exc:
        load_source(str(tmp_path / "*.jsonl"))
    assert f"({big} in " in str(exc.value) and "would become Float64" in str(exc.value)


def test_load_source_glob_keeps_integers_a_float_column_holds(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"topic": "a", "n": 3}\n')
    (tmp_path / "b.jsonl").write_text('{"topic": "b", "n": 1.5}\n')
    frame = load_source(str(tmp_path / "*.jsonl")).collect().sort("topic")
    assert_frame_equal(frame, pl.DataFrame({"topic": ["a", "b"], "n": [3.0, 1.5]}))


def test_load_source_glob_refuses_booleans_read_as_numbers(tmp_path):
    pl.DataFrame({"topic": ["a"], "ok": [True]}).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame({"topic": ["b"], "ok": [0]}).write_parquet(tmp_path / "b.parquet")
    with pytest.raises(SourceError, match="type column 'ok' differently"):
        load_source(str(tmp_path / "*.parquet"))


def test_load_source_glob_widens_types_that_hold_every_value(tmp_path):
    pl.DataFrame({"topic": ["a"], "n": [1]}, schema_overrides={"n": pl.Int32}).write_parquet(
        tmp_path / "a.parquet"
    )
    pl.DataFrame({"topic": ["b"], "n": [2**40]}).write_parquet(tmp_path / "b.parquet")
    frame = load_source(str(tmp_path / "*.parquet")).collect()
    assert frame.schema["n"] == pl.Int64 and frame["n"].to_list() == [1, 2**40]


def test_load_source_glob_with_types_no_one_type_holds_names_the_column(tmp_path):
    for name, zone in (("a", "UTC"), ("b", "Asia/Tokyo")):
        at = pl.Series([None], dtype=pl.Datetime("us", zone))
        pl.DataFrame({"topic": [name], "at": at}).write_parquet(tmp_path / f"{name}.parquet")
    with pytest.raises(SourceError) as exc:
        load_source(str(tmp_path))
    assert "type columns in ways no one type holds (column 'at':" in str(exc.value)
