"""What the UI shows of a run: live job table rows, timeline, progress, flow run name, form."""

from __future__ import annotations

import base64
import logging
import threading
from datetime import datetime, timedelta, timezone

import httpx

from flows.batch_inference import batch_inference
from prompt_templates import prompt_id_to_template
from tasks.bedrock import catalog
from tasks.run.artifacts import (
    MAX_TIMELINE_SAMPLES,
    NONE,
    WAITING,
    Bar,
    JobBoard,
    Sample,
    ShardView,
    console_url,
    flow_run_name,
    job_bars,
    job_rows,
    occupancy,
    svg_image,
    timeline_markdown,
    timeline_svg,
)
from tasks.run.params import BatchParams, known_model_ids
from tasks.run.progress import RunProgress
from tasks.run.state import JobAttempt, RunState, ShardState

ARN = "arn:aws:bedrock:eu-west-1:123456789012:model-invocation-job/abcdefghijkl"
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)


def _at(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="seconds")


def _attempt(n: int = 1, status: str | None = "InProgress", **kw) -> JobAttempt:
    fields = {"job_name": f"job-{n}", "client_token": f"t{n}", "records": 1500}
    return JobAttempt(attempt=n, status=status, **{**fields, **kw})


def test_job_rows_running_job_shows_counters_arn_and_console_link():
    attempt = _attempt(
        job_arn=ARN,
        submitted_at=_at(0),
        counters={"processedRecordCount": 1200, "successRecordCount": 1190, "errorRecordCount": 10},
    )
    row = job_rows([ShardView("shard-00000", 1500, (attempt,))], max_attempts=3)[0]

    assert row["status"] == "InProgress"
    assert (row["records"], row["processed"], row["ok"], row["failed"]) == (
        "1,500",
        "1,200",
        "1,190",
        "10",
    )
    assert row["attempt"] == "1 / 3"
    assert row["input tokens"] == NONE  # Bedrock reports tokens with the output only
    assert row["job ARN"] == ARN
    assert row["AWS console"].startswith(
        "https://eu-west-1.console.aws.amazon.com/bedrock/home?region=eu-west-1#/batch-inference"
    )


def test_job_rows_merged_shard_shows_tokens_cost_and_served_by_counts():
    attempts = (
        _attempt(1, "PartiallyCompleted", job_arn=ARN, submitted_at=_at(0), ended_at=_at(60)),
        _attempt(2, "Completed", served_by="on_demand", ended_at=_at(90)),
    )
    stats = {"succeeded": 1499, "failed": 1, "input_tokens": 1234567, "output_tokens": 89012}
    view = ShardView("shard-00000", 1500, attempts, stats, merged=True)

    rows = job_rows([view], 3, cost_of=lambda i, o: (i * 0.125 + o * 0.625) / 1e6)

    row, total = rows
    assert row["status"] == "Completed, merged"
    assert (row["ok"], row["failed"], row["input tokens"], row["output tokens"]) == (
        "1,499",
        "1",
        "1,234,567",
        "89,012",
    )
    assert row["cost so far (USD)"] == "0.2100"
    assert row["served by"] == "batch ×1, on_demand ×1"
    assert row["job ARN"] == ARN  # the on-demand retry has no job; the batch one is shown
    assert total["shard"] == "all" and total["status"] == "1 of 1 merged"


def test_job_rows_shard_not_started_waits_for_a_slot_and_totals_add_up():
    running = ShardView("shard-00001", 2000, (_attempt(counters={"processedRecordCount": 5}),))
    rows = job_rows([ShardView("shard-00000", 1000), running], 3)

    assert rows[0]["status"] == WAITING and rows[0]["attempt"] == NONE
    assert rows[-1]["records"] == "3,000" and rows[-1]["processed"] == "5"


def test_job_rows_total_cost_is_summed_before_it_is_rounded():
    # Two shards of $0.00346 each: the rows show 0.0035, the total is 0.0069 (their rounded
    # figures added up to 0.0070).
    stats = {"succeeded": 1, "failed": 0, "input_tokens": 27_680, "output_tokens": 0}
    views = [ShardView(f"shard-0000{i}", 1, (), stats, merged=True) for i in range(2)]
    rows = job_rows(views, 3, cost_of=lambda i, o: i * 0.125 / 1e6)
    assert [r["cost so far (USD)"] for r in rows] == ["0.0035", "0.0035", "0.0069"]


def test_console_url_none_without_an_arn():
    assert console_url(None) is None
    assert console_url("abcdefghijkl") is None


def test_job_bars_one_per_submitted_job_in_submit_order():
    views = [
        ShardView("shard-00001", 100, (_attempt(1, "InProgress", submitted_at=_at(30)),)),
        ShardView(
            "shard-00000",
            100,
            (
                _attempt(1, "Failed", submitted_at=_at(0), ended_at=_at(20)),
                _attempt(2, "Completed", submitted_at=_at(25), ended_at=_at(50)),
                _attempt(3, "Completed", served_by="on_demand", ended_at=_at(55)),
            ),
        ),
    ]
    bars = job_bars(views)

    assert [(b.label, b.status) for b in bars] == [
        ("shard-00000", "Failed"),
        ("shard-00000 #2", "Completed"),
        ("shard-00001", "InProgress"),
    ]
    assert bars[2].end is None  # still running


def test_occupancy_steps_up_and_down_with_the_jobs():
    t = [T0 + timedelta(seconds=s) for s in (0, 10, 20, 30)]
    bars = [Bar("a", t[0], t[2], "Completed"), Bar("b", t[1], t[3], "Failed")]

    assert occupancy(bars, now=t[3]) == [(t[0], 1), (t[1], 2), (t[2], 1), (t[3], 0)]


def test_occupancy_counts_a_running_job_until_now():
    now = T0 + timedelta(seconds=40)
    assert occupancy([Bar("a", T0, None, "InProgress")], now) == [(T0, 1), (now, 0)]


def _picture():
    bars = [
        Bar("shard-00000", T0, T0 + timedelta(seconds=40), "Completed"),
        Bar("shard-00001", T0 + timedelta(seconds=5), None, "InProgress"),
    ]
    samples = [Sample(T0 + timedelta(seconds=s), s * 10, s * 100) for s in (0, 20, 40)]
    return bars, samples, T0 + timedelta(seconds=60)


def test_timeline_svg_has_a_coloured_bar_per_job_and_the_gate_line():
    bars, samples, now = _picture()
    svg = timeline_svg(bars, samples, now, gate_size=2)

    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<rect x=") == 2
    assert 'fill="#2e9e5b"' in svg and 'fill="#3b7dd8"' in svg  # completed, in flight
    assert "jobs in the gate (size 2)" in svg
    assert "400" in svg  # the records peak is labelled


def test_timeline_markdown_bars_follow_time_and_show_status():
    bars, samples, now = _picture()
    text = timeline_markdown(bars, samples, now, gate_size=2, width=12)

    rows = [line for line in text.splitlines() if line.startswith("| shard-")]
    assert rows[0] == "| shard-00000 | `████████····` | Completed |"
    assert rows[1] == "| shard-00001 | `·███████████` | InProgress |"
    assert "| gate |" in text and "up to 2 of 2" in text
    assert "| records |" in text and "400" in text


def test_timeline_markdown_column_of_a_short_run_is_in_seconds():
    # A 44 s run at 48 columns said "one column ≈ 0:00".
    bars = [Bar("shard-00000", T0, T0 + timedelta(seconds=44), "Completed")]

    text = timeline_markdown(bars, [], T0 + timedelta(seconds=44), gate_size=2)

    assert text.splitlines()[0] == "Run time 0:00 → 0:44, one column ≈ 0.9 s."


def test_svg_image_is_a_data_uri_markdown_image():
    markdown = svg_image("<svg/>")
    assert markdown.startswith("![timeline](data:image/svg+xml;base64,")
    assert base64.b64decode(markdown.split(",", 1)[1][:-1]) == b"<svg/>"


class _Store:
    def __init__(self, state: RunState) -> None:
        self.state = state


def test_job_board_rate_limits_then_publishes_the_final_state_on_close():
    tables: list[list[dict]] = []
    store = _Store(RunState("r", {"shard-00000": ShardState("shard-00000", [_attempt()])}))
    shards = [type("S", (), {"name": "shard-00000", "records": 1500})()]
    board = JobBoard(
        "r",
        store,
        shards,
        3,
        2,
        min_interval=3600,
        table=lambda rows, *_: tables.append(rows),
        markdown=lambda *_: None,
    )
    board.changed()
    store.state.shards["shard-00000"].attempts[0].status = "Completed"
    board.changed()  # inside the interval: left to a trailing publication
    assert len(tables) == 1 and tables[0][0]["status"] == "InProgress"

    board.close()

    assert len(tables) == 2 and tables[-1][0]["status"] == "Completed"
    assert board._timer is None


def test_job_board_says_live_while_running_and_final_once_closed():
    # After the run the table's page still said "Bedrock jobs (live)".
    said: list[str] = []
    store = _Store(RunState("r", {"shard-00000": ShardState("shard-00000", [_attempt()])}))
    shards = [type("S", (), {"name": "shard-00000", "records": 1500})()]
    board = JobBoard(
        "r",
        store,
        shards,
        3,
        2,
        min_interval=0,
        table=lambda rows, key, run, description: said.append(description),
        markdown=lambda *_: None,
    )
    board.changed()

    board.close()

    assert said == ["Bedrock jobs (live)", "Bedrock jobs (final)"]


def test_progress_never_moves_back_under_concurrent_updates():
    sent: list[float] = []
    progress = RunProgress(
        100, send=lambda _id, p: sent.append(p), create=lambda p: "id", min_interval=0
    )
    start = threading.Barrier(8)

    def report(job: int) -> None:
        start.wait()
        for processed in range(0, 13):
            progress.update(f"job-{job}", processed)

    threads = [threading.Thread(target=report, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sent == sorted(sent) and len(sent) == len(set(sent))
    assert sent[-1] == 96.0
    progress.update("job-0", 3)  # a lower count for a job is ignored
    assert progress.shown == 96.0
    progress.complete()
    assert sent[-1] == 100.0


def test_flow_run_name_is_the_given_run_name_or_a_provisional_one():
    assert flow_run_name({"run_name": "nightly-{date}"}).startswith("nightly-20")
    params = BatchParams(source="x.csv", model_id="m", output_uri="out", prompt_id="sentiment")
    assert flow_run_name(params) == "sentiment-resolving-name"
    # A name the run refuses is not refused here (that crashed the run): resolve_run says why.
    assert flow_run_name({"run_name": "bad/name", "prompt_id": "x"}) == "x-bad-run-name"
    assert batch_inference.flow_run_name is not None


def _form() -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(batch_inference.fn).model_dump()


def test_parameter_schema_prompt_and_model_are_drop_downs_with_free_model_text():
    props = _form()["definitions"]["BatchParams"]["properties"]

    prompt = props["prompt_id"]["anyOf"]
    assert prompt[0]["enum"] == sorted(prompt_id_to_template) and prompt[1] == {"type": "null"}
    model = props["model_id"]["anyOf"]
    assert model[0]["enum"] == known_model_ids()
    assert "anthropic.claude-3-haiku-20240307-v1:0" in model[0]["enum"]
    assert model[1] == {"type": "string", "title": "Other model id"}
    assert len(model[0]["enum"]) == len(catalog.MODELS)


def test_parameter_schema_descriptions_have_no_html_like_text():
    def descriptions(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "description":
                    yield value
                else:
                    yield from descriptions(value)
        elif isinstance(node, list):
            for item in node:
                yield from descriptions(item)

    texts = list(descriptions(_form()))
    assert len(texts) > 20
    assert not [t for t in texts if "<" in t or ">" in t]


def test_max_concurrent_jobs_description_is_the_runs_limit_not_the_models():
    # The run's own limit (bedrock-batch-run-<run>); the model's gate is the account quota.
    text = _form()["definitions"]["BatchParams"]["properties"]["max_concurrent_jobs"]["description"]

    assert "this run" in text
    assert "for this model" not in text
    assert "BEDROCK_BATCH_QUOTA_MAX_JOBS_PER_MODEL" in text


def test_params_accept_a_model_id_the_catalog_does_not_know():
    params = BatchParams(source="x.csv", model_id="anthropic.claude-next-v9:0", output_uri="out")
    assert params.model_id == "anthropic.claude-next-v9:0"


def test_unknown_model_is_logged_as_a_warning(caplog):
    from tasks.run.params import warn_if_unknown_model

    with caplog.at_level(logging.WARNING):
        warn_if_unknown_model("anthropic.claude-3-haiku-20240307-v9:0", logging.getLogger("t"))
        warn_if_unknown_model("anthropic.claude-3-haiku-20240307-v1:0", logging.getLogger("t"))
    assert len(caplog.records) == 1
    assert "not in the batch model catalog" in caplog.records[0].getMessage()


def test_progress_sends_at_most_once_an_interval_and_the_last_figure_later():
    sent: list[float] = []
    progress = RunProgress(
        1000, send=lambda _id, p: sent.append(p), create=lambda p: "id", min_interval=3600
    )

    for processed in range(1, 501):
        progress.update("job-0", processed)

    assert sent == [0.1]  # the first figure; the next waits for the interval
    progress.flush()  # what the interval's timer does when it ends
    assert sent == [0.1, 50.0]
    progress.complete()
    assert sent == [0.1, 50.0, 100.0] and progress._timer is None


def test_progress_a_refused_send_is_logged_and_the_figure_sent_again_later(caplog):
    # Prefect's client gives up on a server that stays away for a minute: the shard whose
    # progress it was must go on, and the bar catch up with the next figure.
    sent: list[float] = []
    refuse = [True]

    def send(_id, percent):
        if refuse.pop(0) if refuse else False:
            raise httpx.ConnectError("server restarting")
        sent.append(percent)

    progress = RunProgress(1000, send=send, create=lambda p: "id", min_interval=0)
    with caplog.at_level(logging.WARNING, logger="bedrock_batch.progress"):
        progress.update("job-0", 100)  # refused: logged, nothing raised
    assert sent == [] and "10.0 %" in caplog.text
    progress.update("job-0", 200)
    assert sent == [20.0] and progress.shown == 20.0


def test_job_board_timeline_stays_bounded_over_a_long_run():
    """A run of days publishes on every poll; each publication is a new artifact row.

    The timeline's SVG drew a point per publication ever made, so its size grew with the
    run's age and the Prefect database with its square (a week at one poll a minute: ~10k
    publications, ~640 kB per timeline at the end, gigabytes over the run).
    """
    markdowns: list[str] = []
    attempt = _attempt(submitted_at=_at(0), counters={"processedRecordCount": 0})
    store = _Store(RunState("r", {"shard-00000": ShardState("shard-00000", [attempt])}))
    shards = [type("S", (), {"name": "shard-00000", "records": 1500})()]
    board = JobBoard(
        "r",
        store,
        shards,
        3,
        2,
        min_interval=0,
        table=lambda *_: None,
        markdown=lambda text, key, _: markdowns.append(text),
    )
    for n in range(1, 3001):
        attempt.counters["processedRecordCount"] = n % 1500
        board.publish()
    sizes = [len(text) for text in markdowns]

    assert max(sizes[1500:]) <= max(sizes[:1500])  # no longer growing with the run's age
    assert len(board.samples) <= 2 * MAX_TIMELINE_SAMPLES
    assert board.samples[0].records == 0 and board.samples[-1].records == 3000 % 1500


def test_job_rows_total_tokens_are_unknown_when_a_shards_tokens_are():
    # A Cohere shard whose manifest could not be read has no token count: the total row
    # summed "unknown" as a number and the whole job table failed to publish.
    counted = {"succeeded": 1, "failed": 0, "input_tokens": 40, "output_tokens": 0}
    uncounted = {"succeeded": 1, "failed": 0, "input_tokens": None, "output_tokens": None}
    views = [
        ShardView("shard-00000", 1, (), counted, merged=True),
        ShardView("shard-00001", 1, (), uncounted, merged=True),
    ]
    rows = job_rows(views, 3)
    assert [r["input tokens"] for r in rows] == ["40", "unknown", "unknown"]
    assert rows[-1]["ok"] == "2"
