"""One poller per run: every job of the run followed with one ListModelInvocationJobs a tick.

Why: a GetModelInvocationJob loop per shard makes the run's calls grow with its jobs (hundreds
of jobs against Get/List quotas of a few requests a second), and a thread per loop capped how
many jobs a run could follow. Here one thread asks Bedrock about all of the run's open jobs at
once, ``ListModelInvocationJobs`` with ``nameContains`` = the run's key (every job name of the
run starts with it, ``tasks.aws.submit.job_name_for``) and ``submitTimeAfter`` = the oldest
open job's submission, paginated at 1,000 (botocore's ``maxResults`` range is 1..1000); the
summaries carry status, message and the record counters (botocore
``ModelInvocationJobSummary``). A job the List does not show yet (a fresh job, List is
eventually consistent) is asked for with a bounded number of Gets a tick. Throttling slows
the tick down, never fails a shard.

Events (``deliver``) short-cut the tick: a state change from EventBridge wakes the shard
waiting on that job at once; polling stays as the fallback for lost or late events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from tasks.aws.clients import client, error_code, job_summaries
from tasks.bedrock.error_codes import RETRYABLE_GET
from tasks.bedrock.statuses import FINAL_STATUSES, STATUS_ORDER
from tasks.errors import JobLostError
from tasks.settings import get_settings

COUNTERS = ("totalRecordCount", "processedRecordCount", "successRecordCount", "errorRecordCount")
LIST_PAGE = 1000  # botocore: ListModelInvocationJobs maxResults is 1..1000
# botocore ListModelInvocationJobsRequest.submitTimeAfter: "jobs that were submitted after the
# time you specify", sent as an ISO 8601 query string that may drop fractions of a second.
SUBMIT_TIME_MARGIN = timedelta(seconds=5)
KEPT_EARLY_EVENTS = 10_000  # events for jobs not watched yet (a job that ends before its watch)

log = logging.getLogger(__name__)


def _key(job: dict[str, Any]) -> tuple:
    return (job.get("status"), job.get("message"), *(job.get(name) for name in COUNTERS))


class Watch:
    """One job followed by the watcher: the newest description, and a flag when it changes."""

    def __init__(self, job_arn: str, job_name: str) -> None:
        self.job_arn = job_arn
        self.job_name = job_name
        self.latest: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.changed = threading.Event()
        self._lock = threading.Lock()

    @property
    def final(self) -> bool:
        return self.latest is not None and self.latest.get("status") in FINAL_STATUSES

    def offer(self, job: dict[str, Any]) -> None:
        """Take a description if it says something new; a final status is never undone."""
        with self._lock:
            if self.final and job.get("status") not in FINAL_STATUSES:
                return  # a late, out-of-order report of an earlier status
            if self.latest is not None and _key(self.latest) == _key(job):
                return
            merged = {**(self.latest or {}), **job}
            if self.latest is not None and job.get("status") != self.latest.get("status"):
                # The counters belong to the description that carried them: an event's new
                # status carries none, and the last poll's describe the job before it (a
                # Completed job read as 0 records processed, its deleted outputs as unsent).
                for name in COUNTERS:
                    if name not in job:
                        merged.pop(name, None)
            self.latest = merged
        self.changed.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.changed.set()

    def take(self, timeout: float) -> dict[str, Any] | None:
        """The newest description once it changed, or None after ``timeout``; raises on loss."""
        if not self.changed.wait(timeout):
            return None
        self.changed.clear()
        if self.error is not None:
            raise self.error
        with self._lock:
            return dict(self.latest) if self.latest else None


def _submitted_after(watching: list[Watch]) -> datetime | None:
    """The List's ``submitTimeAfter``: a little before the oldest open job Bedrock described.

    Without it every tick listed every job of the run, ended ones too: at 2,000 jobs two pages
    of summaries a tick, whose timestamps botocore parses one by one, the flow's largest CPU
    cost at a gate of 100. From the oldest open job on, a tick lists the jobs in flight and
    those that ended since. The time is Bedrock's own ``submitTime``, so no clock skew enters;
    a job not described yet is newer than that (or, on a resume, is found by the bounded Gets
    and listed from the next tick on).
    """
    times = [w.latest.get("submitTime") for w in watching if w.latest]
    known = [t for t in times if isinstance(t, datetime)]
    return min(known) - SUBMIT_TIME_MARGIN if known else None


def _behind(status: str, seen: dict[str, Any] | None) -> bool:
    """Whether an in-flight ``status`` is behind the status already ``seen`` (a late copy).

    A final status is never behind: Bedrock's own answer wins over what the events said.
    """
    if status in FINAL_STATUSES or not seen:
        return False
    if seen.get("status") in FINAL_STATUSES:  # nothing in flight comes after an end
        return True
    return STATUS_ORDER.get(status, 0) < STATUS_ORDER.get(seen.get("status"), 0)


class JobWatcher:
    """Follows every job of one run with one thread; shards wait on their ``Watch``."""

    def __init__(self, run_key: str, max_gets: int = 10) -> None:
        self.run_key = run_key
        self.max_gets = max_gets
        self.events_active = False  # set by the flow when job events reach it
        self._events_down = False  # events stopped reaching the run (told by the feed)
        self._events_back_at = float("-inf")  # when they last came back (time.monotonic)
        self.calls: dict[str, int] = {"list": 0, "get": 0, "throttled": 0, "events": 0}
        self._watches: dict[str, Watch] = {}
        self._early: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._interrupted: Exception | None = None
        self._thread: threading.Thread | None = None

    # -- what shards call ----------------------------------------------------------------

    def watch(self, job_arn: str, job_name: str) -> Watch:
        """Start following a job; an event that came before the watch is applied at once."""
        watch = Watch(job_arn, job_name)
        with self._lock:
            if self._interrupted is not None:
                watch.fail(self._interrupted)
                return watch
            self._watches[job_arn] = watch
            early = self._early.pop(job_arn, None)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"job-watcher-{self.run_key}", daemon=True
                )
                self._thread.start()
        if early is not None:
            watch.offer(early)
        return watch

    def unwatch(self, job_arn: str) -> None:
        with self._lock:
            self._watches.pop(job_arn, None)

    def deliver(self, job_arn: str, status: str, message: str | None = None) -> None:
        """A job's status learned from an event; wakes the shard waiting on it at once.

        Events are best effort and may come late or out of order (a relay's backlog): a final
        status is taken as it is, an in-flight one only when it is not behind what was seen.
        """
        self.calls["events"] += 1
        job = {"jobArn": job_arn, "status": status}
        if message:
            job["message"] = message
        with self._lock:
            watch = self._watches.get(job_arn)
            if watch is None:
                # Not watched yet: keep the furthest status, as a watch would (a late copy of
                # InProgress after Failed once left a shard waiting for an hour's poll).
                if not _behind(status, self._early.get(job_arn)):
                    self._early[job_arn] = job
                    while len(self._early) > KEPT_EARLY_EVENTS:
                        self._early.popitem(last=False)
                return
        if _behind(status, watch.latest):
            return
        watch.offer(job)

    def poll_now(self) -> None:
        """Ask Bedrock at once instead of at the next tick."""
        self._wake.set()

    def events_flowing(self, flowing: bool) -> None:
        """Told by the event feed when events stop reaching the run and when they do again.

        While they do not, ticks come at the poll interval. When they are back, one tick at
        once and the poll interval for a visibility timeout more: the events of the gap may be
        lost (a Prefect server restart drops those it has not stored) or held in the queue for
        that long, and a job just ended may not show as ended in the List yet.
        """
        with self._lock:
            self._events_down = not flowing
            if flowing:
                self._events_back_at = time.monotonic()
        log.info(
            "Job events %s for %s",
            "reach the run again: polling Bedrock now" if flowing else "stopped",
            self.run_key,
        )
        self.poll_now()  # a tick now, and the next delay from the new interval

    def close(self) -> None:
        self._closed.set()
        self._wake.set()

    def interrupt(self, error: Exception) -> None:
        """Stop polling and end every wait, now and to come, with ``error``."""
        with self._lock:
            self._interrupted = error
            watches = list(self._watches.values())
        self.close()
        for watch in watches:
            watch.fail(error)

    # -- the one polling thread ----------------------------------------------------------

    def interval(self) -> float:
        """Seconds between ticks: the poll interval, or the slower fallback with events."""
        settings = get_settings()
        poll = settings.poll
        with self._lock:
            recent = time.monotonic() - self._events_back_at
            flowing = self.events_active and not self._events_down
        if flowing and recent >= settings.events.visibility_timeout_seconds:
            return max(poll.interval_seconds, poll.interval_with_events_seconds)
        return poll.interval_seconds

    def _run(self) -> None:
        delay = self.interval()
        while not self._closed.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                throttled = self.tick()
            except Exception:  # the thread must outlive any one bad tick
                log.exception("Polling the jobs of %s failed; trying again", self.run_key)
                throttled = True
            maximum = get_settings().poll.max_interval_seconds
            delay = min(max(delay, 0.5) * 2, maximum) if throttled else self.interval()

    def _open(self) -> list[Watch]:
        with self._lock:
            return [w for w in self._watches.values() if not w.final and w.error is None]

    def tick(self) -> bool:
        """Ask Bedrock once about every open job; True when it throttled us."""
        watching = self._open()
        if not watching:
            return False
        bedrock = client("bedrock")
        try:
            listed = self._list(bedrock, _submitted_after(watching))
        except ClientError as exc:
            if error_code(exc) not in RETRYABLE_GET:
                raise
            self.calls["throttled"] += 1
            log.warning(
                "ListModelInvocationJobs throttled for %s; polling more slowly", self.run_key
            )
            return True
        missing = []
        for watch in watching:
            job = listed.get(watch.job_arn)
            if job is None:
                missing.append(watch)
            else:
                watch.offer(job)
        for watch in missing[: self.max_gets]:
            try:
                self.calls["get"] += 1
                watch.offer(bedrock.get_model_invocation_job(jobIdentifier=watch.job_arn))
            except ClientError as exc:
                if error_code(exc) in RETRYABLE_GET:
                    self.calls["throttled"] += 1
                    return True
                msg = (
                    f"GetModelInvocationJob failed for {watch.job_arn} (last status "
                    f"{(watch.latest or {}).get('status')}): {exc}"
                )
                watch.fail(JobLostError(msg))
        return False

    def _list(self, bedrock, after: datetime | None) -> dict[str, dict[str, Any]]:
        def list_page(**kwargs: Any) -> dict[str, Any]:
            self.calls["list"] += 1
            return bedrock.list_model_invocation_jobs(**kwargs)

        filters: dict[str, Any] = {
            "nameContains": self.run_key,
            "maxResults": LIST_PAGE,
            "sortBy": "CreationTime",
            "sortOrder": "Descending",
        }
        if after is not None:
            filters["submitTimeAfter"] = after
        return {job["jobArn"]: job for job in job_summaries(list_page, **filters)}


def follow_job(
    watcher: JobWatcher,
    job_arn: str,
    job_name: str,
    on_change,
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict[str, Any]:
    """Wait for the job's final description, calling ``on_change(job, previous_status)``.

    Runs in the shard's thread, so state writes and events of many jobs go on in parallel.
    A job whose status and counters stay the same for ``stall_warning_seconds`` logs a
    warning, once per such period.
    """
    settings = get_settings().poll
    watch = watcher.watch(job_arn, job_name)
    last_status: str | None = None
    seen: tuple | None = None
    progressed_at = warned_at = time.monotonic()
    try:
        while True:
            wait = max(0.05, warned_at + settings.stall_warning_seconds - time.monotonic())
            job = watch.take(wait)
            if job is None:
                warned_at = time.monotonic()
                _warn_stalled(logger, job_name, watch.latest or {}, warned_at - progressed_at)
                continue
            if _key(job) == seen:
                continue  # woken twice for one change: it was handled already
            seen = _key(job)
            status = job["status"]
            if status != last_status:
                logger.info(
                    "%s: %s → %s%s",
                    job_name,
                    last_status or "(new)",
                    status,
                    f" ({job['message']})" if job.get("message") else "",
                )
            on_change(job, last_status)
            last_status = status
            progressed_at = warned_at = time.monotonic()
            if status in FINAL_STATUSES:
                return job
    finally:
        watcher.unwatch(job_arn)


def _warn_stalled(logger, job_name: str, job: dict[str, Any], seconds: float) -> None:
    logger.warning(
        "%s has not progressed for %.0f s: status %s, %s of %s records processed "
        "(%s succeeded, %s failed)",
        job_name,
        seconds,
        job.get("status", "(not seen yet)"),
        job.get("processedRecordCount", "?"),
        job.get("totalRecordCount", "?"),
        job.get("successRecordCount", "?"),
        job.get("errorRecordCount", "?"),
    )
