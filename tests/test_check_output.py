"""The exactly-once check at the end of a run: each shard's rows against its own part."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest

from tasks.errors import IncompleteOutputError
from tasks.pipeline import summary, tokens
from tasks.pipeline.attempts import SUPERSEDED
from tasks.pipeline.columns import (
    CONTENT_FILTERED,
    ERROR_CODE,
    INPUT_TOKENS,
    JOB_ID,
    OUTPUT_TOKENS,
    RECORD_ID,
    SERVED_BY,
    UNPARSEABLE_OUTPUT,
)
from tasks.pipeline.tokens import JOB_TOKENS
from tasks.run.layout import RunLayout, part_name, rows_file, shard_name

# summary_artifacts is a run's task; here it runs alone, which Prefect 3.8 warns of.
pytestmark = pytest.mark.filterwarnings("ignore:Artifact creation outside:FutureWarning")

SHARDS, PER_SHARD = 5, 4
# (records, shards) read at a time by the check: all at once, one shard, two shards a scan.
BATCHES = [(1_000_000, 256), (PER_SHARD, 256), (1_000_000, 2)]


def ids(shard: int) -> list[str]:
    return [f"R{shard * PER_SHARD + k:010d}" for k in range(PER_SHARD)]


def write_run(root: Path, parts: dict[int, list[str]] | None = None) -> RunLayout:
    """Rows files of SHARDS shards and their parts (by default each with its own ids), and a
    skipped pair; record 1 of every shard failed, record 2 of shard 0 was unparseable, record 3
    of shard 1 refused."""
    layout = RunLayout("run", str(root), str(root / "jobs"))
    parts = {i: ids(i) for i in range(SHARDS)} if parts is None else parts
    for i in range(SHARDS):
        path = root / rows_file(shard_name(i))
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({RECORD_ID: ids(i), "text": ["t"] * PER_SHARD}).write_parquet(path)
    (root / "output").mkdir(exist_ok=True)
    for i, got in parts.items():
        last = CONTENT_FILTERED if i == 1 else None
        errors = [None, "ModelError", UNPARSEABLE_OUTPUT if i == 0 else None, last][: len(got)]
        errors += [None] * (len(got) - len(errors))
        pl.DataFrame(
            {
                RECORD_ID: got,
                ERROR_CODE: pl.Series(errors, dtype=pl.String),
                INPUT_TOKENS: [10] * len(got),
                OUTPUT_TOKENS: [3] * len(got),
            }
        ).write_parquet(root / "output" / part_name(i))
    skipped = ["S0000000001"]
    pl.DataFrame({RECORD_ID: skipped}).write_parquet(root / "rows" / "skipped.parquet")
    pl.DataFrame({RECORD_ID: skipped, ERROR_CODE: ["Skipped"]}).write_parquet(
        root / "output" / "skipped.parquet"
    )
    return layout


PLAN = SimpleNamespace(
    shards=[
        SimpleNamespace(records=PER_SHARD, rows_file=rows_file(shard_name(i)))
        for i in range(SHARDS)
    ],
    skipped_records=1,
    skipped_file="rows/skipped.parquet",
)


@pytest.mark.parametrize("at_once", BATCHES, ids=["one batch", "shard by shard", "two a scan"])
def test_check_output_counts_every_shard_once_in_one_batch_or_many(tmp_path, monkeypatch, at_once):
    records, shards = at_once
    monkeypatch.setattr(summary, "CHECK_RECORDS_AT_ONCE", records)
    monkeypatch.setattr(summary, "CHECK_SHARDS_AT_ONCE", shards)
    check = summary.check_output(write_run(tmp_path), PLAN)
    records = SHARDS * PER_SHARD + 1
    assert check["records"] == records
    # One ModelError a shard, the unparseable, the refused, the skipped.
    assert check["failed"] == SHARDS + 1 + 1 + 1
    assert check["succeeded"] == records - check["failed"]
    assert check["unparseable"] == 1
    assert check["filtered"] == 1
    assert tokens.totals(check["token_usage"]) == (10 * SHARDS * PER_SHARD, 3 * SHARDS * PER_SHARD)
    assert len(check["parts"]) == SHARDS + 1


@pytest.mark.parametrize("at_once", BATCHES, ids=["one batch", "shard by shard", "two a scan"])
def test_check_output_refuses_a_record_in_another_shards_part(tmp_path, monkeypatch, at_once):
    """Shards 1 and 2 swapped one record: every id is in the output once, but not with its own
    shard's rows. A check over all ids at once could not see it."""
    records, shards = at_once
    monkeypatch.setattr(summary, "CHECK_RECORDS_AT_ONCE", records)
    monkeypatch.setattr(summary, "CHECK_SHARDS_AT_ONCE", shards)
    parts = {i: ids(i) for i in range(SHARDS)}
    parts[1][0], parts[2][0] = parts[2][0], parts[1][0]
    with pytest.raises(IncompleteOutputError) as caught:
        summary.check_output(write_run(tmp_path, parts), PLAN)
    message = str(caught.value)
    assert "2 missing" in message and "2 unexpected" in message
    assert ids(1)[0] in message and ids(2)[0] in message


def test_check_output_names_missing_duplicated_and_unexpected_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "CHECK_RECORDS_AT_ONCE", PER_SHARD)
    parts = {i: ids(i) for i in range(SHARDS - 1)}  # the last shard has no part at all
    parts[0] = ids(0)[:-1]  # one row lost
    parts[1] = [*ids(1), ids(1)[2]]  # one row twice
    parts[2] = [*ids(2), "R9999999999"]  # a row nobody sent
    with pytest.raises(IncompleteOutputError) as caught:
        summary.check_output(write_run(tmp_path, parts), PLAN)
    message = str(caught.value)
    assert f"{PER_SHARD + 1} missing" in message  # the lost row and all of the last shard
    assert ids(0)[-1] in message and ids(SHARDS - 1)[0] in message
    assert f"1 duplicated ['{ids(1)[2]}']" in message
    assert "1 unexpected ['R9999999999']" in message


def test_check_output_refuses_a_planned_shard_whose_rows_and_part_are_both_gone(tmp_path):
    # Files were paired by listing rows/ and output/: a shard with neither file passed.
    layout = write_run(tmp_path)
    gone = rows_file(shard_name(3))
    (tmp_path / gone).unlink()
    (tmp_path / "output" / part_name(3)).unlink()
    with pytest.raises(IncompleteOutputError) as caught:
        summary.check_output(layout, PLAN)
    assert f"rows files {gone} are gone" in str(caught.value)
    assert f"{PER_SHARD} records were not checked" in str(caught.value)


def test_check_output_without_parts_says_nothing_was_merged(tmp_path):
    layout = write_run(tmp_path, parts={})
    (tmp_path / "output" / "skipped.parquet").unlink()
    with pytest.raises(IncompleteOutputError, match="nothing was merged"):
        summary.check_output(layout, PLAN)


def test_summary_artifacts_report_output_lines_that_reached_no_row(tmp_path, monkeypatch):
    # A merge that ignored output lines of records its shard never sent (another job's or
    # run's outputs) must say so in the run's summary, not only in one shard's log.
    from prefect.artifacts import Artifact

    from tasks.run import cost
    from tasks.run.shard import ShardResult

    monkeypatch.setattr(cost, "cost_summary", lambda *a: {"parts": {}})
    monkeypatch.setattr(cost, "cost_markdown", lambda c: "- Cost: n/a")
    layout = write_run(tmp_path)
    ctx = SimpleNamespace(
        run_name="strays",
        layout=layout,
        model_id="m",
        invocation_type="InvokeModel",
        store=SimpleNamespace(writes=0, bytes_written=0),
        watcher=SimpleNamespace(calls={}, events_active=False),
    )
    plan = SimpleNamespace(skipped_records=0)
    results = [
        ShardResult(shard_name(i), PER_SHARD, None, "Completed", f"part-{i}", stats, 1, None, None)
        for i, stats in enumerate([{"stray_lines": 3}, {}, {"stray_lines": 0}])
    ]
    check = summary.check_output(layout, PLAN)

    out = summary.summary_artifacts(ctx, plan, results, check)

    assert out["stray_output_lines"] == 3
    assert [job["stray_lines"] for job in out["jobs"]] == [3, 0, 0]
    note = Artifact.get("bedrock-batch-strays-output").data
    assert "Output lines that match no record of their shard: 3, ignored (in shard-00000;" in note
    assert "refused or filtered: 1;" in note


CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
MANIFEST = (55, 7)
# A paid batch answer of shard 0 a schema repair replaced (`Settled.superseded`).
REPLACED = {
    "attempt": 1,
    JOB_ID: "j0",
    SERVED_BY: "batch",
    "rows": 1,
    INPUT_TOKENS: 10,
    OUTPUT_TOKENS: 3,
}


def _paid_run(root: Path, manifest: bool = True) -> tuple[RunLayout, list[Any]]:
    """`write_run` with jobs: shard i's job j<i> counts 10 in and 3 out a row but for its
    failed record 1; shard 0's record 3 was answered on demand after a schema repair replaced
    its paid batch answer; shard 1's job counts no tokens (Cohere Embed), with a manifest or
    without."""
    from tasks.run.shard import ShardResult

    layout = write_run(root)
    results = []
    for i in range(SHARDS):
        path = root / "output" / part_name(i)
        tokens_in, tokens_out = [10, None, 10, 10], [3, None, 3, 3]
        jobs, served = [f"j{i}"] * PER_SHARD, ["batch"] * PER_SHARD
        stats: dict[str, Any] = {}
        if i == 0:
            jobs[3], served[3], tokens_in[3], tokens_out[3] = None, "on_demand", 20, 6
            stats[SUPERSEDED] = [REPLACED]
        if i == 1:
            tokens_in, tokens_out = [None] * PER_SHARD, [None] * PER_SHARD
            stats[JOB_TOKENS] = {"j1": list(MANIFEST)} if manifest else {}
        pl.read_parquet(path).with_columns(
            pl.Series(INPUT_TOKENS, tokens_in, pl.Int64),
            pl.Series(OUTPUT_TOKENS, tokens_out, pl.Int64),
            pl.Series(JOB_ID, jobs, pl.String),
            pl.Series(SERVED_BY, served),
        ).write_parquet(path)
        results.append(
            ShardResult(
                shard_name(i), PER_SHARD, None, "Completed", str(path), stats, 1, None, None
            )
        )
    return layout, results


def _ctx(run_name: str, layout: RunLayout) -> SimpleNamespace:
    return SimpleNamespace(
        run_name=run_name,
        layout=layout,
        model_id=CLAUDE,
        invocation_type="InvokeModel",
        cost_guard=None,
        store=SimpleNamespace(writes=0, bytes_written=0),
        watcher=SimpleNamespace(calls={}, events_active=False),
    )


def test_run_end_reads_each_output_part_once(tmp_path, monkeypatch):
    # The exactly-once check read every part, then the cost read them all again.
    layout, results = _paid_run(tmp_path)
    read: list[str] = []

    def counting(real):
        def reader(source, *args, **kwargs):
            read.extend(str(s) for s in (source if isinstance(source, list) else [source]))
            return real(source, *args, **kwargs)

        return reader

    for name in ("scan_parquet", "read_parquet"):
        monkeypatch.setattr(pl, name, counting(getattr(pl, name)))

    check = summary.check_output(layout, PLAN)
    out = summary.summary_artifacts(_ctx("read-once", layout), PLAN, results, check)

    assert sorted(p for p in read if Path(p).parent.name == "output") == sorted(check["parts"])
    assert out["cost"]["total_usd"] > 0 and out["tokens"]["input"] > 0


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no manifest"])
def test_run_end_cost_and_tokens_are_those_of_its_parts_read_again(tmp_path, manifest):
    # The run's end prices the usage its check collected: the same figures as reading the
    # parts again, with the answers a repair replaced and the manifest of a job without counts.
    from tasks.run.cost import actual_cost, run_price

    layout, results = _paid_run(tmp_path, manifest)
    check = summary.check_output(layout, PLAN)

    out = summary.summary_artifacts(_ctx("priced", layout), PLAN, results, check)

    superseded = {r.part_uri: r.stats.get(SUPERSEDED, []) for r in results}
    job_tokens = {"j1": MANIFEST} if manifest else {}
    again = actual_cost(check["parts"], run_price(CLAUDE), superseded, job_tokens=job_tokens)
    cost = out["cost"]
    assert cost["jobs"] == again["jobs"]
    assert cost["parts"] == {Path(p).name: v for p, v in again["parts"].items()}
    for key in ("batch_usd", "on_demand_usd", "total_usd", "batch_rows", "on_demand_rows"):
        assert cost[key] == again[key], key
    assert (cost["batch_rows"], cost["on_demand_rows"]) == (SHARDS * PER_SHARD - 1, 1)
    assert [j["superseded_rows"] for j in cost["jobs"] if j["job_id"] == "j0"] == [1]
    # Shard 0: 2 counted batch rows, the on-demand one and the replaced answer; shard 1: its
    # manifest, else unknown; shards 2-4: 3 counted rows each.
    expected = (20 + 20 + 10 + MANIFEST[0] + 90, 6 + 6 + 3 + MANIFEST[1] + 27)
    tokens_in, tokens_out = expected if manifest else (None, None)
    assert out["tokens"] == {"input": tokens_in, "output": tokens_out}
    assert (cost["total_usd"] is None) == (not manifest)
