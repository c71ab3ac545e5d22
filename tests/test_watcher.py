"""The run's one job watcher: one List a tick for all jobs, bounded Gets, throttling, events."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError
from helpers import claude_jsonl, eventually

from tasks.aws import watcher as watcher_module
from tasks.aws.submit import JobRequest, client_token_for, job_name_for, run_key
from tasks.aws.watcher import JobWatcher, follow_job
from tasks.errors import JobLostError
from tasks.settings import get_settings

ROLE = "arn:aws:iam::123456789012:role/BedrockBatchEmulatorRole"
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
log = logging.getLogger("test.watcher")


def _throttled(operation: str) -> ClientError:
    error = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}
    return ClientError(error, operation)


class FakeBedrock:
    """Jobs by ARN; List shows only ``listed`` ones, and throttles while ``throttle`` > 0."""

    def __init__(self, jobs: dict[str, dict]) -> None:
        self.jobs = jobs
        self.listed: set[str] = set(jobs)
        self.throttle = 0
        self.calls = {"list": 0, "get": 0}
        self.asked_after: list = []  # each List's submitTimeAfter
        self.summaries = 0  # job summaries all Lists returned
        self.lock = threading.Lock()

    def list_model_invocation_jobs(self, **kwargs):
        with self.lock:
            self.calls["list"] += 1
            if self.throttle:
                self.throttle -= 1
                raise _throttled("ListModelInvocationJobs")
            assert kwargs["nameContains"] == "rk"
            after = kwargs.get("submitTimeAfter")
            self.asked_after.append(after)
            listed = [self.jobs[a] for a in sorted(self.listed)]
            if after is not None:  # Bedrock's filter: jobs submitted after the time
                listed = [job for job in listed if job["submitTime"] > after]
            self.summaries += len(listed)
            return {"invocationJobSummaries": listed}

    def get_model_invocation_job(self, jobIdentifier):  # noqa: N803 - botocore's name
        with self.lock:
            self.calls["get"] += 1
            if jobIdentifier.endswith("gone"):
                error = {"Error": {"Code": "ResourceNotFoundException", "Message": "no job"}}
                raise ClientError(error, "GetModelInvocationJob")
            return self.jobs[jobIdentifier]

    def finish(self, *arns: str) -> None:
        with self.lock:
            for arn in arns:
                self.jobs[arn] = {**self.jobs[arn], "status": "Completed"}


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "0.02")
    monkeypatch.setenv("BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS", "0.1")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def _jobs(count: int, status: str = "InProgress") -> dict[str, dict]:
    return {f"arn:job/{i}": {"jobArn": f"arn:job/{i}", "status": status} for i in range(count)}


def _follow_all(watcher: JobWatcher, arns: list[str]) -> tuple[dict, list[threading.Thread]]:
    results: dict[str, object] = {}

    def follow(arn: str) -> None:
        try:
            results[arn] = follow_job(watcher, arn, arn, lambda job, previous: None, log)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each shard got
            results[arn] = exc

    # Daemons: a shard left waiting by a bug fails its test instead of hanging the session.
    threads = [threading.Thread(target=follow, args=(arn,), daemon=True) for arn in arns]
    for thread in threads:
        thread.start()
    return results, threads


def test_one_list_a_tick_follows_every_job_of_the_run(fast_polls, monkeypatch):
    bedrock = FakeBedrock(_jobs(50))
    monkeypatch.setattr(watcher_module, "client", lambda service: bedrock)
    watcher = JobWatcher("rk")
    results, threads = _follow_all(watcher, list(bedrock.jobs))
    eventually(lambda: bedrock.calls["list"] >= 3, timeout=10)

    bedrock.finish(*bedrock.jobs)
    for thread in threads:
        thread.join(timeout=10)
    watcher.close()

    assert {job["status"] for job in results.values()} == {"Completed"}
    # Fifty jobs, and still one List a tick and not one Get: calls do not grow with the jobs.
    assert bedrock.calls["get"] == 0
    assert watcher.calls["list"] == bedrock.calls["list"]


def test_jobs_the_list_does_not_show_yet_are_asked_for_a_few_at_a_time(fast_polls, monkeypatch):
    bedrock = FakeBedrock(_jobs(25, "Completed"))
    bedrock.listed = set()  # List is eventually consistent: fresh jobs may be missing
    monkeypatch.setattr(watcher_module, "client", lambda service: bedrock)
    watcher = JobWatcher("rk", max_gets=10)
    seen_per_tick = []
    real_tick = watcher.tick

    def tick() -> bool:
        before = bedrock.calls["get"]
        throttled = real_tick()
        seen_per_tick.append(bedrock.calls["get"] - before)
        return throttled

    monkeypatch.setattr(watcher, "tick", tick)
    results, threads = _follow_all(watcher, list(bedrock.jobs))
    for thread in threads:
        thread.join(timeout=10)
    watcher.close()

    assert {job["status"] for job in results.values()} == {"Completed"}
    assert bedrock.calls["get"] == 25
    assert max(seen_per_tick) <= 10


def test_lists_start_at_the_oldest_open_job_and_an_older_one_is_asked_for(fast_polls, monkeypatch):
    # Jobs that ended stop being listed: a tick's List holds the jobs from the oldest open one
    # on, not every job of the run (two pages of summaries a tick at 2,000 jobs).
    t0 = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)
    jobs = _jobs(10)
    for i, job in enumerate(jobs.values()):
        job["submitTime"] = t0 + timedelta(minutes=i)
    old = {"jobArn": "arn:job/old", "status": "InProgress", "submitTime": t0 - timedelta(hours=1)}
    bedrock = FakeBedrock({**jobs, "arn:job/old": old})
    monkeypatch.setattr(watcher_module, "client", lambda service: bedrock)
    watcher = JobWatcher("rk")
    arns = list(jobs)
    results, threads = _follow_all(watcher, arns)
    margin = watcher_module.SUBMIT_TIME_MARGIN
    eventually(lambda: t0 - margin in bedrock.asked_after, timeout=10)  # all described

    bedrock.finish(*arns[:6])
    eventually(lambda: len(results) == 6, timeout=10)
    eventually(lambda: t0 + timedelta(minutes=6) - margin in bedrock.asked_after, timeout=10)
    lists_then, summaries_then = bedrock.calls["list"], bedrock.summaries
    eventually(lambda: bedrock.calls["list"] >= lists_then + 3, timeout=10)
    per_list = (bedrock.summaries - summaries_then) / (bedrock.calls["list"] - lists_then)

    # A job submitted before the oldest open one (a resumed run's) is not in the List: a Get
    # describes it, and the Lists reach back to it from then on.
    gets_before = bedrock.calls["get"]
    old_results, old_threads = _follow_all(watcher, ["arn:job/old"])
    eventually(lambda: t0 - timedelta(hours=1) - margin in bedrock.asked_after, timeout=10)
    bedrock.finish(*arns[6:], "arn:job/old")
    for thread in threads + old_threads:
        thread.join(timeout=10)
    watcher.close()

    assert per_list <= 5  # the four open jobs (a List may race the last ends), not eleven
    assert bedrock.calls["get"] - gets_before == 1
    assert {r["status"] for r in [*results.values(), *old_results.values()]} == {"Completed"}
    assert len(results) == 10


def test_throttled_lists_slow_the_watcher_down_and_fail_no_job(fast_polls, monkeypatch, caplog):
    bedrock = FakeBedrock(_jobs(5, "Completed"))
    bedrock.throttle = 4
    monkeypatch.setattr(watcher_module, "client", lambda service: bedrock)
    watcher = JobWatcher("rk")
    with caplog.at_level(logging.WARNING, logger=watcher_module.__name__):
        results, threads = _follow_all(watcher, list(bedrock.jobs))
        for thread in threads:
            thread.join(timeout=10)
    watcher.close()

    assert {job["status"] for job in results.values()} == {"Completed"}
    assert watcher.calls["throttled"] == 4
    assert sum("throttled" in r.getMessage() for r in caplog.records) == 4


def test_a_job_bedrock_does_not_know_fails_only_its_own_shard(fast_polls, monkeypatch):
    jobs = {**_jobs(1), "arn:job/gone": {"jobArn": "arn:job/gone", "status": "InProgress"}}
    bedrock = FakeBedrock(jobs)
    bedrock.listed = {"arn:job/0"}
    monkeypatch.setattr(watcher_module, "client", lambda service: bedrock)
    watcher = JobWatcher("rk")
    results, threads = _follow_all(watcher, ["arn:job/0", "arn:job/gone"])
    eventually(lambda: "arn:job/gone" in results, timeout=10)
    bedrock.finish("arn:job/0")
    for thread in threads:
        thread.join(timeout=10)
    watcher.close()

    assert isinstance(results["arn:job/gone"], JobLostError)
    assert "ResourceNotFoundException" in str(results["arn:job/gone"])
    assert results["arn:job/0"]["status"] == "Completed"


def test_events_end_a_job_without_a_poll_even_one_that_came_before_its_watch(monkeypatch):
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "3600")
    get_settings.cache_clear()

    def no_polls(service):
        raise AssertionError("the watcher polled Bedrock")

    monkeypatch.setattr(watcher_module, "client", no_polls)
    watcher = JobWatcher("rk")
    watcher.deliver("arn:job/early", "Completed")  # the job ended before the shard watched it
    results, threads = _follow_all(watcher, ["arn:job/early", "arn:job/late"])
    watcher.deliver("arn:job/late", "InProgress")
    watcher.deliver("arn:job/late", "Failed", "The model timed out")
    watcher.deliver("arn:job/late", "InProgress")  # a late, out-of-order copy: ignored
    for thread in threads:
        thread.join(timeout=10)
    watcher.close()
    get_settings.cache_clear()

    assert results["arn:job/early"]["status"] == "Completed"
    assert results["arn:job/late"]["status"] == "Failed"
    assert results["arn:job/late"]["message"] == "The model timed out"


def test_polls_come_at_the_poll_interval_while_events_stop_and_a_while_after(monkeypatch):
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "60")
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_WITH_EVENTS_SECONDS", "300")
    monkeypatch.setenv("BEDROCK_BATCH_EVENTS_VISIBILITY_TIMEOUT_SECONDS", "120")
    get_settings.cache_clear()
    now = [1000.0]
    monkeypatch.setattr(watcher_module.time, "monotonic", lambda: now[0])
    watcher = JobWatcher("rk")
    watcher.events_active = True
    assert watcher.interval() == 300  # events flowing: polls are the slow fallback

    watcher.events_flowing(False)  # e.g. the Prefect server restarts
    assert watcher._wake.is_set()  # the tick asleep for 300 s wakes to the new interval
    watcher._wake.clear()
    now[0] += 600
    assert watcher.interval() == 60  # for as long as the events do not come

    watcher.events_flowing(True)
    assert watcher._wake.is_set()  # one poll at once: events of the gap may be lost
    now[0] += 119
    assert watcher.interval() == 60  # a held message could still come back this long
    now[0] += 1
    assert watcher.interval() == 300
    get_settings.cache_clear()


def test_a_late_in_flight_event_before_the_watch_does_not_hide_the_jobs_end(monkeypatch):
    # Every event of a job may come before its shard watches it (a busy process): a late copy
    # of InProgress after Failed must not be what the shard finds, or it waits for a poll.
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "3600")
    get_settings.cache_clear()
    monkeypatch.setattr(watcher_module, "client", lambda service: pytest.fail("polled"))
    watcher = JobWatcher("rk")
    for status in ("InProgress", "Failed", "InProgress", "Scheduled"):
        watcher.deliver("arn:job/x", status, "timed out" if status == "Failed" else None)
    watcher.deliver("arn:job/y", "Scheduled")
    watcher.deliver("arn:job/y", "Submitted")  # behind Scheduled: kept out as well
    try:
        results, threads = _follow_all(watcher, ["arn:job/x"])
        for thread in threads:
            thread.join(timeout=10)
        assert results["arn:job/x"]["status"] == "Failed"
        assert results["arn:job/x"]["message"] == "timed out"
        assert watcher._early["arn:job/y"]["status"] == "Scheduled"
    finally:
        watcher.close()
        get_settings.cache_clear()


@pytest.mark.slow
def test_watcher_follows_emulator_jobs_through_get_and_list_throttling(stack, monkeypatch):
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "0.05")
    monkeypatch.setenv("BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS", "0.4")
    get_settings.cache_clear()
    stack.set_faults(throttle_list_rate=0.5, throttle_get_rate=0.5)
    key = run_key("watched", f"s3://{stack.bucket}/watched", "run-w")
    s3 = stack.client("s3")
    arns = []
    for i in range(6):
        s3.put_object(Bucket=stack.bucket, Key=f"watched/input/s{i}.jsonl", Body=claude_jsonl(100))
        request = JobRequest(
            job_name=job_name_for("watched", f"s{i}", 1, key),
            client_token=client_token_for("run-w", f"s{i}", 1),
            model_id=CLAUDE,
            role_arn=ROLE,
            input_uri=f"s3://{stack.bucket}/watched/input/s{i}.jsonl",
            output_uri=f"s3://{stack.bucket}/watched/output/s{i}/",
        )
        arns.append(
            stack.client("bedrock").create_model_invocation_job(**request.to_api())["jobArn"]
        )
    watcher = JobWatcher(key)
    try:
        results, threads = _follow_all(watcher, arns)
        for thread in threads:
            thread.join(timeout=60)
    finally:
        watcher.close()
        stack.reset_faults()
        get_settings.cache_clear()

    assert {r["status"] for r in results.values()} == {"Completed"}
    assert all(r["successRecordCount"] == 100 for r in results.values())
    assert watcher.calls["throttled"] > 0  # it was throttled, and no shard saw it


def test_a_status_from_an_event_does_not_carry_the_last_polls_counters():
    # A poll saw the job InProgress with 0 processed; its end came by an event, which carries
    # no counters: the Completed job read as 0 processed, and the check for deleted outputs took
    # its 100 missing lines for records never processed and sent them again (a CI run).
    from tasks.aws.watcher import Watch

    watch = Watch("arn:job/x", "rk-job")
    polled = {"jobArn": "arn:job/x", "status": "InProgress", "totalRecordCount": 100}
    watch.offer({**polled, "processedRecordCount": 0, "successRecordCount": 0})
    watch.offer({"jobArn": "arn:job/x", "status": "Completed"})
    assert watch.latest["status"] == "Completed"
    assert "processedRecordCount" not in watch.latest  # unknown, asked for when needed
    assert "successRecordCount" not in watch.latest and "totalRecordCount" not in watch.latest
    # A poll's description of the same status keeps its own counters.
    watch.offer({**polled, "status": "Completed", "processedRecordCount": 100})
    assert watch.latest["processedRecordCount"] == 100 and watch.latest["totalRecordCount"] == 100
