"""The job gate: the model's and the run's limits, leases kept by one keeper, recounts."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from helpers import create_job, eventually
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate as Update

from tasks.aws import poll
from tasks.aws import watcher as watcher_module
from tasks.aws.watcher import JobWatcher
from tasks.run import gate
from tasks.settings import get_settings


@pytest.fixture
def gate_settings(monkeypatch):
    """Gate pace for tests: asks every 0.1 s, recounts after 0.5 s of waiting, fast retries;
    a count nothing explains is freed after 0.5 s unchanged (a lease lasts 60 s at least, so
    the real settle time is over a minute: `test_settle_time_outlasts_...` checks it)."""
    monkeypatch.setenv("BEDROCK_BATCH_GATE_WAIT_SECONDS", "0.1")
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "0.5")
    monkeypatch.setattr(gate, "settle_seconds", lambda: 0.5)
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RETRY_MAX_SECONDS", "0.2")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def _model(label: str) -> str:
    return f"anthropic.gate-test-{label}-{uuid.uuid4().hex[:6]}-v1:0"


def _wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _count_calls(monkeypatch, name: str, callers: list | None = None) -> list[float]:
    """The times ``gate.<name>`` is called from now on (it still does its work); ``callers``
    gets the calling thread of each."""
    calls: list[float] = []
    real = getattr(gate, name)

    def counting(*args, **kwargs):
        calls.append(time.monotonic())
        if callers is not None:
            callers.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(gate, name, counting)
    return calls


def _count_answers(monkeypatch, name: str) -> list:
    """What ``gate.<name>`` answers from now on; a transient error (retried) is not an answer."""
    answers: list = []
    real = getattr(gate, name)

    def counting(*args, **kwargs):
        answer = real(*args, **kwargs)
        if not isinstance(answer, Exception):
            answers.append(answer)
        return answer

    monkeypatch.setattr(gate, name, counting)
    return answers


def _start_waiters(model: str, run_name: str, count: int) -> tuple[list, list[threading.Thread]]:
    """``count`` shards waiting for a slot side by side; each lease lands in the list."""
    taken: list = []
    waiters = [
        threading.Thread(target=lambda: taken.append(gate.acquire_slot(model, run_name, 60)))
        for _ in range(count)
    ]
    for waiter in waiters:
        waiter.start()
    return taken, waiters


def test_gate_name_is_the_quota_key_so_profiles_share_the_base_model_gate():
    assert gate.gate_name("us.anthropic.claude-3-haiku-20240307-v1:0") == gate.gate_name(
        "anthropic.claude-3-haiku-20240307-v1:0"
    )
    assert gate.gate_name("anthropic.claude-3-haiku-20240307-v1:0") == (
        "bedrock-batch-anthropic-claude-3-haiku-20240307-v1-0"
    )


def test_ensure_gates_creates_model_limit_at_the_quota_and_no_run_resizes_it():
    model = _model("size")

    name, size, run_a = gate.ensure_gates(model, "run-a", 3)
    _, size_again, run_b = gate.ensure_gates(model, "run-b", 5)

    quota = get_settings().quotas.max_jobs_per_model
    assert (size, size_again) == (quota, quota)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == quota
        assert client.read_global_concurrency_limit_by_name(run_a).limit == 3
        assert client.read_global_concurrency_limit_by_name(run_b).limit == 5


def test_slot_counts_on_both_limits_until_released(gate_settings):
    model = _model("both")
    name, _, run_gate = gate.ensure_gates(model, "both-run", 2)

    lease = gate.acquire_slot(model, "both-run", lease_seconds=60)

    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (1, 1)
    assert gate.renew_slot(lease, 120) is True
    gate.release_slot(lease)
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)
    assert gate.renew_slot(lease, 120) is False
    gate.release_slot(lease)  # releasing twice is harmless


def test_acquire_slot_waits_while_the_run_gate_is_full(gate_settings, monkeypatch):
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "600")  # no recount here
    get_settings.cache_clear()
    model = _model("full")
    name, _, _ = gate.ensure_gates(model, "full-run", 1)
    first = gate.acquire_slot(model, "full-run", 60)
    taken, (waiter,) = _start_waiters(model, "full-run", 1)
    waiter.join(timeout=1.5)
    still_waiting = waiter.is_alive()
    gate.release_slot(first)
    waiter.join(timeout=30)

    assert still_waiting
    assert len(taken) == 1
    assert gate.active_slots(name) == 1
    gate.release_slot(taken[0])


def test_a_slot_this_process_frees_is_taken_at_once_by_few_asks(gate_settings, monkeypatch):
    # Asks of a full gate every 30 s: only the release of a slot here can wake a waiter soon.
    monkeypatch.setenv("BEDROCK_BATCH_GATE_WAIT_SECONDS", "30")
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "600")
    get_settings.cache_clear()
    model = _model("refill")
    gate.ensure_gates(model, "refill-run", 1)
    first = gate.acquire_slot(model, "refill-run", 60)
    callers: list[threading.Thread] = []  # of each Prefect call the gate makes from now on
    _count_calls(monkeypatch, "_prefect", callers)
    taken, waiters = _start_waiters(model, "refill-run", 8)
    # This test's threads only: an earlier test's run may give back slots meanwhile.
    ours = [threading.current_thread(), *waiters]

    def asks() -> int:
        return sum(caller in ours for caller in callers)

    eventually(lambda: asks() >= 1, timeout=10)  # the first in line asked and was refused

    released_at = time.monotonic()
    gate.release_slot(first)
    eventually(lambda: len(taken) == 1, timeout=10)
    refill = time.monotonic() - released_at
    asks_by_then = asks()

    # Each release wakes the next in line at once: all eight get their turn.
    for i in range(8):
        eventually(lambda i=i: len(taken) > i, timeout=10)
        gate.release_slot(taken[i])
    for waiter in waiters:
        waiter.join(timeout=10)

    assert refill < 10  # not the 30 s a waiter would sleep without the wake-up
    # Eight shards waited, yet only the head asked: once before the release, once after
    # (the release itself goes through the same client).
    assert asks_by_then <= 4
    assert len(taken) == 8


def test_a_slot_freed_on_other_limits_does_not_wake_the_waiters(gate_settings, monkeypatch):
    # Runs of other models in the same process end jobs all the time: only a slot that counted
    # on one of the waiters' limits can change their answer, so only such a slot wakes them.
    monkeypatch.setenv("BEDROCK_BATCH_GATE_WAIT_SECONDS", "30")
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "600")
    get_settings.cache_clear()
    model, other_model = _model("woken"), _model("elsewhere")
    gate.ensure_gates(model, "woken-run", 1)
    gate.ensure_gates(model, "woken-neighbour", 1)
    gate.ensure_gates(other_model, "elsewhere-run", 1)
    first = gate.acquire_slot(model, "woken-run", 60)
    neighbour = gate.acquire_slot(model, "woken-neighbour", 60)  # same model gate, own run
    elsewhere = gate.acquire_slot(other_model, "elsewhere-run", 60)
    answers = _count_answers(monkeypatch, "_ask")
    taken, (waiter,) = _start_waiters(model, "woken-run", 1)
    eventually(lambda: None in answers, timeout=10)
    waiters = gate._waiters_for([gate.gate_name(model), gate.run_gate_name("woken-run")])
    wakes = waiters.freed

    gate.release_slot(elsewhere)
    woken_by_elsewhere = waiters.freed - wakes
    gate.release_slot(neighbour)  # shares the model's limit: the head asks again, refused
    woken_by_neighbour = waiters.freed - wakes - woken_by_elsewhere
    eventually(lambda: len(answers) == 2, timeout=10)
    gate.release_slot(first)
    eventually(lambda: len(taken) == 1, timeout=10)
    waiter.join(timeout=10)

    assert (woken_by_elsewhere, woken_by_neighbour) == (0, 1)
    assert answers == [None, None, taken[0]]
    gate.release_slot(taken[0])


def test_an_ended_jobs_slot_goes_to_the_runs_next_waiting_shard_without_a_prefect_call(
    gate_settings, monkeypatch
):
    # A busy Prefect server answered a release and the next ask with 503s seconds apart: the
    # slot of an ended job is handed to the shard waiting next, counted all along.
    monkeypatch.setenv("BEDROCK_BATCH_GATE_WAIT_SECONDS", "30")
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "600")
    get_settings.cache_clear()
    model = _model("handover")
    name, _, run_gate = gate.ensure_gates(model, "handover-run", 2)
    held = [gate.acquire_slot(model, "handover-run", 60) for _ in range(2)]
    answers = _count_answers(monkeypatch, "_ask")
    releases = _count_calls(monkeypatch, "release_slot")
    taken, waiters = _start_waiters(model, "handover-run", 3)
    eventually(lambda: None in answers, timeout=10)  # the head asked and was refused
    asks_before = len(answers)

    assert gate.hand_over_or_release(held[0], model, "handover-run") is True
    eventually(lambda: len(taken) == 1, timeout=5)
    assert gate.hand_over_or_release(held[1], model, "handover-run") is True
    eventually(lambda: len(taken) == 2, timeout=5)

    # No release, no new ask: the slots changed hands here (the next head saw the refusal).
    assert (answers, releases) == ([None] * asks_before, [])
    assert {str(t) for t in taken} == {str(h) for h in held}
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (2, 2)
    # The last one ends with a shard still waiting, then with none: released, not kept.
    assert gate.hand_over_or_release(taken[0], model, "handover-run") is True
    eventually(lambda: len(taken) == 3, timeout=5)
    for lease in (taken[1], taken[2]):
        assert gate.hand_over_or_release(lease, model, "handover-run") is False
    for waiter in waiters:
        waiter.join(timeout=10)
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)


def test_a_recount_counts_the_leases_taken_here_whose_job_does_not_run_yet(gate_settings, stack):
    # A lease just taken, or handed from an ended job to the next shard, is in no keeper slot
    # for a moment: a recount that missed it lowered the run's gate and let a run of cap 2
    # have 4 jobs in flight (two runs' e2e test, CI).
    model = _model("transit")
    name, _, run_gate = gate.ensure_gates(model, "transit-run", 2)
    leases = [gate.acquire_slot(model, "transit-run", 60) for _ in range(2)]

    gate.reconcile(model, run_name="transit-run")

    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (2, 2)
    # The run's cap still holds: the ask is refused (None). A busy test server may answer 503
    # first (SQLite refusing the read-to-write upgrade of a concurrent writer), a transient
    # error the gate retries: ask again until the server answers.
    answers = eventually(
        lambda: [
            a for a in [gate._ask([name, run_gate], 60, None)] if not isinstance(a, Exception)
        ],
        what="an answer to the ask other than a transient error",
    )
    assert answers == [None]
    for lease in leases:
        gate.release_slot(lease)
    gate.reconcile(model, run_name="transit-run")
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)


def test_a_slot_handed_on_while_the_heads_ask_hangs_goes_to_the_next_waiter(
    gate_settings, monkeypatch
):
    # The refill benchmark's busy server held a head's ask 2 s before answering 503; the
    # slots of seventeen jobs that ended meanwhile waited for that answer.
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "600")  # no recount here
    get_settings.cache_clear()
    model = _model("hung-ask")
    name, _, run_gate = gate.ensure_gates(model, "hung-ask-run", 1)
    held = gate.acquire_slot(model, "hung-ask-run", 60)
    answers = _count_answers(monkeypatch, "_ask")
    taken, waiters = _start_waiters(model, "hung-ask-run", 2)
    eventually(lambda: None in answers, timeout=10)  # the head asked and was refused
    real_ask, at_server, answer = gate._ask, threading.Event(), threading.Event()

    def hanging_ask(*args):
        at_server.set()
        answer.wait(30)
        return real_ask(*args)

    monkeypatch.setattr(gate, "_ask", hanging_ask)
    assert at_server.wait(10)  # the head asks again (every 0.1 s here) and hangs

    assert gate.hand_over_or_release(held, model, "hung-ask-run") is True
    eventually(lambda: len(taken) == 1, timeout=3)
    head_still_at_server = not answer.is_set()
    answer.set()
    eventually(lambda: answers.count(None) >= 2, timeout=10)  # the full gate refused the head

    assert head_still_at_server
    assert str(taken[0]) == str(held)
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (1, 1)
    assert gate.hand_over_or_release(taken[0], model, "hung-ask-run") is True
    for waiter in waiters:
        waiter.join(timeout=10)
    assert len(taken) == 2
    gate.release_slot(taken[1])
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)


def test_a_slot_handed_on_during_a_quick_ask_stays_the_heads(gate_settings, monkeypatch):
    # Passing the head over at once cost 10-13% of a 2,000-shard run's wall time at gate 100:
    # a head whose ask is answered within HEAD_PATIENCE_SECONDS keeps its turn.
    monkeypatch.setenv("BEDROCK_BATCH_GATE_RECONCILE_AFTER_SECONDS", "600")  # no recount here
    get_settings.cache_clear()
    monkeypatch.setattr(gate, "HEAD_PATIENCE_SECONDS", 5.0)
    model = _model("quick-ask")
    gate.ensure_gates(model, "quick-ask-run", 1)
    held = gate.acquire_slot(model, "quick-ask-run", 60)
    answers = _count_answers(monkeypatch, "_ask")
    head_took, (head,) = _start_waiters(model, "quick-ask-run", 1)
    eventually(lambda: None in answers, timeout=10)  # the head asked and was refused
    behind_took, (behind,) = _start_waiters(model, "quick-ask-run", 1)
    group = gate._waiters_for([gate.gate_name(model), gate.run_gate_name("quick-ask-run")])
    eventually(lambda: len(group.queue) == 2, timeout=10)
    at_server = threading.Event()

    def quick_refusal(*args):  # a full gate's answer, 0.3 s after the ask
        at_server.set()
        time.sleep(0.3)
        return None

    monkeypatch.setattr(gate, "_ask", quick_refusal)
    assert at_server.wait(10)

    assert gate.hand_over_or_release(held, model, "quick-ask-run") is True
    head.join(timeout=10)

    assert [str(lease) for lease in head_took] == [str(held)]
    assert behind_took == [] and behind.is_alive()
    assert gate.hand_over_or_release(head_took[0], model, "quick-ask-run") is True
    behind.join(timeout=10)
    assert [str(lease) for lease in behind_took] == [str(held)]
    gate.release_slot(behind_took[0])


def test_slots_taken_ahead_go_to_the_first_shards_without_asking(gate_settings, monkeypatch):
    # The refill benchmark's first wave took 0.9-2.75 s to fill: twenty asks at a server busy
    # recording the run's new task runs. Taken ahead, the first shards make no Prefect call.
    model = _model("ahead")
    name, _, run_gate = gate.ensure_gates(model, "ahead-run", 2)

    taken = gate.take_ahead(model, "ahead-run", 3, 60)  # the run's cap stops it at 2

    assert taken == 2
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (2, 2)
    ahead = sorted(str(lease) for lease in gate._waiters_for([name, run_gate]).ahead)
    assert all(lease in gate._taken for lease in ahead)  # a recount counts them ours
    asks = _count_calls(monkeypatch, "_ask")
    taken, shards = _start_waiters(model, "ahead-run", 2)
    for shard in shards:
        shard.join(timeout=10)

    assert (sorted(str(lease) for lease in taken), asks) == (ahead, [])
    for lease in ahead:
        gate.release_slot(lease)
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)


def test_slots_taken_ahead_that_no_shard_takes_are_given_back(gate_settings, monkeypatch):
    # A shard held back by the cost ceiling never asks: its slot must not stay taken.
    monkeypatch.setattr(gate, "AHEAD_KEEP_SECONDS", 0.5)
    model = _model("ahead-left")
    name, _, run_gate = gate.ensure_gates(model, "ahead-left-run", 3)

    assert gate.take_ahead(model, "ahead-left-run", 3, 60) == 3
    group = gate._waiters_for([name, run_gate])
    ahead = [str(lease) for lease in group.ahead]
    came = gate.acquire_slot(model, "ahead-left-run", 60)  # one shard came

    eventually(lambda: gate.active_slots(run_gate) == 1, timeout=10)
    assert gate.active_slots(name) == 1 and list(group.ahead) == []
    assert [lease for lease in ahead if lease in gate._taken] == [str(came)]
    gate.release_slot(came)


_INCREMENT = httpx.Request("POST", "http://prefect/api/v2/concurrency_limits/increment-with-lease")


def _failing_first(monkeypatch, failures: list[Exception]) -> list[Exception]:
    """The gate's Prefect clients raise ``failures`` in turn, then work; the list may grow.

    Only in the test's own thread: a slot keeper or give-back timer left by an earlier test
    must not take one of the failures meant for the call under test.
    """
    real = gate._prefect
    test_thread = threading.get_ident()

    @contextlib.contextmanager
    def client():
        if failures and threading.get_ident() == test_thread:
            raise failures.pop(0)
        with real() as working:
            yield working

    monkeypatch.setattr(gate, "_prefect", client)
    return failures


def test_taking_ahead_retries_a_busy_server_a_few_times_and_says_so(
    gate_settings, monkeypatch, caplog
):
    # The first asks of a run meet the server recording its new task runs (503s on SQLite):
    # a few quick retries, logged like the gate's other loops, then the shards ask themselves.
    model = _model("ahead-busy")
    name, _, run_gate = gate.ensure_gates(model, "ahead-busy-run", 2)
    busy = httpx.HTTPStatusError("503", request=_INCREMENT, response=httpx.Response(503))
    said = f"Prefect API error while trying to take slots of {name} ahead (HTTP 503)"

    def retries() -> list[str]:
        messages = [r.getMessage() for r in caplog.records]
        return [m.split(";")[0] for m in messages if "Prefect API error" in m]

    failures = _failing_first(monkeypatch, [busy, busy])
    with caplog.at_level(logging.INFO, logger="bedrock_batch.gate"):
        assert gate.take_ahead(model, "ahead-busy-run", 2, 60) == 2
        # Two injected 503s, and any the real server gave on its own (busy under xdist).
        first = retries()
        assert len(first) >= 2 and set(first) == {said}
        caplog.clear()
        # Injected only: the server is not asked again before the ask gives up.
        failures.extend([busy] * (gate.AHEAD_RETRIES + 1))
        assert gate.take_ahead(model, "ahead-busy-other-run", 1, 60) == 0
        assert retries() == [said] * gate.AHEAD_RETRIES
        assert failures == []
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (2, 2)
    group = gate._waiters_for([name, run_gate])
    for lease in list(group.ahead):
        group.ahead.remove(lease)
        gate.release_slot(lease)


def test_a_slot_taken_ahead_is_given_back_well_inside_its_lease(monkeypatch):
    # Not renewed before a shard takes it into the keeper, which renews it one renewal period
    # later: both must fit in the lease.
    for lease, renew, keep in (("120", "20", 20.0), ("60", "40", 10.0), ("60", "70", 0.0)):
        monkeypatch.setenv("BEDROCK_BATCH_POLL_LEASE_SECONDS", lease)
        monkeypatch.setenv("BEDROCK_BATCH_GATE_RENEW_SECONDS", renew)
        get_settings.cache_clear()
        assert gate._ahead_keep_seconds() == keep
    get_settings.cache_clear()


def test_acquire_slot_retries_transient_prefect_errors(gate_settings, monkeypatch, caplog, stack):
    model = _model("flaky")
    name, _, _ = gate.ensure_gates(model, "flaky-run", 2)
    _failing_first(
        monkeypatch,
        [
            httpx.HTTPStatusError("503", request=_INCREMENT, response=httpx.Response(503)),
            httpx.ConnectError("connection refused", request=_INCREMENT),
            httpx.ReadTimeout("timed out", request=_INCREMENT),
        ],
    )
    with caplog.at_level(logging.INFO, logger="bedrock_batch.gate"):
        lease = gate.acquire_slot(model, "flaky-run", 60)

    assert gate.active_slots(name) == 1
    retries = [r for r in caplog.records if "Prefect API error" in r.getMessage()]
    said = [r.getMessage().split(";")[0] for r in retries]
    assert said[:3] == [
        f"Prefect API error while trying to take a slot of {name} ({what})"
        for what in ("HTTP 503", "ConnectError", "ReadTimeout")
    ]
    # After the injected three, only 503s the real server gave on its own (busy under xdist).
    assert set(said[3:]) <= {f"Prefect API error while trying to take a slot of {name} (HTTP 503)"}
    # One quick retry is routine on a busy server; failing again is worth a warning.
    assert [r.levelname for r in retries[:3]] == ["INFO", "WARNING", "WARNING"]
    gate.release_slot(lease)


def test_acquire_slot_recounts_a_gate_full_of_lost_leases_instead_of_hanging(gate_settings, stack):
    # What a Prefect restart with in-memory lease storage leaves: slots counted, no lease.
    model = _model("lost")
    name, quota, _ = gate.ensure_gates(model, "lost-run", 2)
    gate._set_active_slots(name, quota)

    started = time.monotonic()
    lease = gate.acquire_slot(model, "lost-run", 60)

    assert time.monotonic() - started < 10
    assert gate.active_slots(name) == 1  # Bedrock has none of this model in flight
    gate.release_slot(lease)


def test_a_waiting_shard_does_not_free_a_slot_another_process_holds_on_its_way_to_a_job(
    gate_settings, stack, monkeypatch
):
    # Another run's process took a slot and has not created its job yet: Bedrock lists nothing
    # and this process does not know the lease. A waiting shard's recount that freed it at once
    # let two runs of one model have 4 jobs in flight under a gate of 3 (two runs' e2e, CI).
    monkeypatch.setattr(gate, "settle_seconds", lambda: 10.0)
    model = _model("transit-elsewhere")
    name, _, _ = gate.ensure_gates(model, "here-run", 2)
    _, _, other_gate = gate.ensure_gates(model, "elsewhere-run", 2)
    # Raw Prefect calls, through gate._call only for its retries of a busy server's 503s.
    gate._call("resize", lambda p: p.update_global_concurrency_limit(name, Update(limit=1)))
    response = gate._call(
        "take",
        lambda p: p.increment_concurrency_slots_with_lease(
            names=[name, other_gate], slots=1, mode="concurrency", lease_duration=60
        ),
    )
    elsewhere = response.json()["lease_id"]  # not through gate: unknown to this process
    recounts = _count_calls(monkeypatch, "in_flight_jobs")

    taken, waiters = _start_waiters(model, "here-run", 1)
    _wait_until(lambda: len(recounts) >= 3 or taken)

    assert taken == []
    assert gate.active_slots(name) == 1
    gate._call("give back", lambda p: p.release_concurrency_slots_with_lease(uuid.UUID(elsewhere)))
    waiters[0].join(timeout=30)
    assert len(taken) == 1 and gate.active_slots(name) == 1
    gate.release_slot(taken[0])


def test_a_count_freed_after_waiting_is_one_that_stayed_unchanged(
    gate_settings, stack, monkeypatch
):
    # Slots of lost leases stay; anything another process does changes what a recount sees.
    model = _model("settle")
    name, quota, _ = gate.ensure_gates(model, "settle-run", 2)
    gate._set_active_slots(name, quota)
    freed = _count_calls(monkeypatch, "_free_slots")
    recounts = _count_calls(monkeypatch, "in_flight_jobs")

    lease = gate.acquire_slot(model, "settle-run", 60)

    assert len(freed) == 1  # once, all of them, after the count was seen twice
    assert len(recounts) >= 2
    assert freed[0] - recounts[0] >= gate.settle_seconds()
    assert gate.active_slots(name) == 1
    gate.release_slot(lease)


def test_settle_time_outlasts_another_processs_slot_in_transit_and_a_dead_runs_lease(
    monkeypatch,
):
    # The defaults: a 60 s poll (a slot in transit lasts up to one), 120 s leases that the
    # server frees 15 s after they expire at most; freeing such a slot here too frees it twice.
    for name in ("POLL_INTERVAL_SECONDS", "POLL_LEASE_SECONDS", "GATE_RECONCILE_AFTER_SECONDS"):
        monkeypatch.delenv("BEDROCK_BATCH_" + name, raising=False)
    get_settings.cache_clear()
    assert gate.settle_seconds() == 135
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "300")
    get_settings.cache_clear()
    assert gate.settle_seconds() == 600
    monkeypatch.setenv("BEDROCK_BATCH_POLL_LEASE_SECONDS", "10")  # Prefect's minimum is 60
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "1")
    get_settings.cache_clear()
    assert gate.settle_seconds() == 75
    get_settings.cache_clear()


def test_jobs_submitted_since_a_sighting_are_listed_by_bedrock_whatever_their_status(stack):
    # What tells a job that started and ended between two recounts from a quiet gate.
    model, other = "anthropic.claude-3-haiku-20240307-v1:0", "amazon.titan-embed-text-v2:0"
    before = datetime.now(UTC) - timedelta(seconds=1)
    names = {m: f"gate-since-{uuid.uuid4().hex[:8]}" for m in (model, other)}
    for job_model, job_name in names.items():
        key = f"in/{job_name}.jsonl"
        stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=b"")
        create_job(stack, job_name, f"s3://{stack.bucket}/{key}", job_model)

    assert names[model] in gate._submitted_since(model, before)
    assert names[other] not in gate._submitted_since(model, before)
    assert names[model] not in gate._submitted_since(model, datetime.now(UTC) + timedelta(1))


def test_keeper_takes_the_slot_of_a_running_job_again_when_the_server_lost_its_lease(
    gate_settings, stack
):
    model = _model("keeper")
    name, quota, run_gate = gate.ensure_gates(model, "keeper-run", 2)
    gate._set_active_slots(name, quota)  # full of slots nobody holds any more
    gate._set_active_slots(run_gate, 2)
    recorded: list[str] = []
    slot = gate.HeldSlot(
        "keeper-job-a1", model, "keeper-run", str(uuid.uuid4()), on_new_lease=recorded.append
    )
    gate.KEEPER.hold(slot)
    try:
        gate.KEEPER.renew_all()

        assert recorded and slot.lease_id == recorded[0]
        assert (gate.active_slots(name), gate.active_slots(run_gate)) == (1, 1)
        assert gate.renew_slot(slot.lease_id, 60) is True
    finally:
        gate.KEEPER.drop(slot.key)
        if slot.lease_id:
            gate.release_slot(slot.lease_id)


def test_keeper_does_not_call_a_lease_given_back_during_its_cycle_lost(
    gate_settings, stack, monkeypatch
):
    # Jobs ending while the keeper renewed: their shards gave the leases back between the
    # keeper's look at its slots and the renewal, the server no longer knew them, and the
    # keeper recounted the gate as after a restart (gate e2e restart test, CI).
    model = _model("ended")
    name, _, run_gate = gate.ensure_gates(model, "ended-run", 2)
    slot = gate.HeldSlot(
        "ended-job-a1", model, "ended-run", str(gate.acquire_slot(model, "ended-run", 60))
    )
    keeper = gate.LeaseKeeper()
    keeper._slots = {slot.key: slot}  # held without starting the thread
    recounts = _count_calls(monkeypatch, "reconcile")
    real_renew = gate.renew_slot

    def renew_as_the_job_ends(lease_id, seconds, client=None):
        keeper.drop(slot.key)  # what the shard's _release does, in its order
        gate.release_slot(lease_id)
        return real_renew(lease_id, seconds, client=client)

    monkeypatch.setattr(gate, "renew_slot", renew_as_the_job_ends)
    keeper.renew_all()

    assert recounts == []
    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)


def test_a_recount_during_a_release_leaves_no_slot_counted(gate_settings, stack, monkeypatch):
    # A recount between the server's decrement and the process forgetting the lease counted
    # the lease as held and set the gate to 1 with nothing in flight; a count set by a recount
    # has no lease to expire, so the gate stayed a slot short for the next runs.
    from prefect.client.orchestration import SyncPrefectClient

    model = _model("release")
    name, _, run_gate = gate.ensure_gates(model, "release-run", 2)
    lease = gate.acquire_slot(model, "release-run", 60)
    recount = threading.Thread(
        target=gate.reconcile, args=(model,), kwargs={"run_name": "release-run"}
    )
    real_release = SyncPrefectClient.release_concurrency_slots_with_lease

    def release_then_recount(self, lease_id):
        response = real_release(self, lease_id)
        recount.start()
        recount.join(timeout=1)  # room for a recount that does not wait for the release
        return response

    monkeypatch.setattr(
        SyncPrefectClient, "release_concurrency_slots_with_lease", release_then_recount
    )
    gate.release_slot(lease)
    recount.join()

    assert (gate.active_slots(name), gate.active_slots(run_gate)) == (0, 0)


def test_wait_for_job_warns_once_per_stalled_period(monkeypatch, caplog):
    monkeypatch.setenv("BEDROCK_BATCH_POLL_INTERVAL_SECONDS", "0.01")
    monkeypatch.setenv("BEDROCK_BATCH_POLL_STALL_WARNING_SECONDS", "0.2")
    get_settings.cache_clear()
    stuck = {"jobArn": "arn:job/abc", "status": "InProgress", "totalRecordCount": 100}
    stuck["processedRecordCount"] = 40
    done_at = time.monotonic() + 0.5

    class Bedrock:
        def list_model_invocation_jobs(self, **kwargs):
            job = stuck if time.monotonic() < done_at else {**stuck, "status": "Completed"}
            return {"invocationJobSummaries": [job]}

    monkeypatch.setattr(watcher_module, "client", lambda service: Bedrock())
    logger = logging.getLogger("test.poll")
    watcher = JobWatcher("stalled")
    try:
        with caplog.at_level(logging.WARNING, logger="test.poll"):
            job = poll.wait_for_job(
                watcher, "arn:job/abc", "stalled-job", lambda j, p: None, logger
            )
    finally:
        watcher.close()
        get_settings.cache_clear()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert job["status"] == "Completed"
    assert len(warnings) == 2  # at ~0.2 s and ~0.4 s of the 0.5 s stall
    assert warnings[0].startswith("stalled-job has not progressed for ")
    assert "status InProgress, 40 of 100 records processed" in warnings[0]


def test_acquire_slot_recounts_a_run_gate_full_of_lost_leases(gate_settings, stack):
    # After a restart the run's own limit can be full of slots whose jobs ended meanwhile.
    model = _model("lost-run")
    _, _, run_gate = gate.ensure_gates(model, "lost-run-gate", 2)
    gate._set_active_slots(run_gate, 2)

    lease = gate.acquire_slot(model, "lost-run-gate", 60)

    assert gate.active_slots(run_gate) == 1
    gate.release_slot(lease)


def test_on_demand_rate_limit_created_by_many_tails_at_once():
    # Prefect's upsert reads then creates: tails of several shards starting together race.
    from tasks.aws.on_demand import ensure_rate_limit

    model = _model("tails")
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def start_tail() -> None:
        barrier.wait()
        try:
            ensure_rate_limit(model, 5.0)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    tails = [threading.Thread(target=start_tail) for _ in range(6)]
    for tail in tails:
        tail.start()
    for tail in tails:
        tail.join(timeout=30)

    assert errors == []
    assert gate.active_slots(gate.gate_name(model) + "-on-demand") == 0


def test_keeper_renews_many_leases_side_by_side(monkeypatch):
    # A hundred renewals one after another on a busy server outlasted the lease itself.
    keeper = gate.LeaseKeeper()
    slots = [
        gate.HeldSlot(f"job-{i}", "anthropic.x-v1:0", "run", str(uuid.uuid4())) for i in range(16)
    ]
    keeper._slots = {slot.key: slot for slot in slots}  # held without starting the thread
    lock = threading.Lock()
    at_once = {"now": 0, "most": 0}
    renewed = []
    all_in = threading.Barrier(gate.RENEW_WORKERS, timeout=10)

    def slow_renew(lease_id, seconds, client=None):
        with lock:
            at_once["now"] += 1
            at_once["most"] = max(at_once["most"], at_once["now"])
            at_once["arrived"] = arrival = at_once.get("arrived", 0) + 1
        if arrival <= gate.RENEW_WORKERS:
            all_in.wait()  # the first batch meets here only if it runs side by side
        with lock:
            at_once["now"] -= 1
            renewed.append(lease_id)
        return True

    monkeypatch.setattr(gate, "renew_slot", slow_renew)
    keeper.renew_all()

    assert sorted(renewed) == sorted(slot.lease_id for slot in slots)
    assert at_once["most"] == gate.RENEW_WORKERS
    assert all(slot.lease_id is not None for slot in slots)


def test_gate_calls_of_many_threads_share_one_prefect_client(gate_settings, monkeypatch, stack):
    # A new Prefect client costs ~20 ms of CPU (httpx builds an SSL context); the gate made
    # one for every ask, renewal, recount and release.
    monkeypatch.setattr(gate, "_gate_clients", [], raising=False)
    made = _count_calls(monkeypatch, "get_client")
    model = _model("one-client")
    model_gate, _, run_gate = gate.ensure_gates(model, "one-client", 4)

    def take_and_give_back() -> None:
        slot = gate.acquire_slot(model, "one-client", 60)
        gate.release_slot(slot)

    threads = [threading.Thread(target=take_and_give_back) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    counts = {name: gate.active_slots(name) for name in (model_gate, run_gate)}

    assert counts == {model_gate: 0, run_gate: 0}
    assert len(made) == 1


def test_the_gates_prefect_client_follows_the_settings_and_is_not_the_flow_runs():
    from prefect import flow
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with gate._prefect() as first:
        pass
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), gate._prefect() as other:
        assert str(other.api_url).startswith("http://127.0.0.1:9/api")
    with gate._prefect() as again:
        assert again is first and again is not other

    @flow
    def inside() -> bool:
        # The flow run's client closes with the run; the gate's must outlive it.
        with gate._prefect() as client:
            return client is not SyncClientContext.get().client

    assert inside() is True
    with gate._prefect() as after:
        assert after.api_healthcheck() is None  # still open after the flow run ended
