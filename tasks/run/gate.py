"""The job gate: Prefect global concurrency limits that stand for Bedrock's per-model job quota.

Every Bedrock job holds one slot of two limits, taken together in one increment: the model's
limit (named by the model's quota key, sized to the account's quota, never resized by a run)
and the run's own limit (sized to its ``max_concurrent_jobs``). A slot is a short lease that
one keeper thread per process renews for every slot it holds, so a dead run's slots free within
minutes. When the Prefect server loses leases (a restart with its default in-memory lease
storage), the limit keeps counting slots nobody holds; the gate is then recounted from what
Bedrock lists as in flight and the leases of our own running jobs are taken again, without
making those jobs wait. Transient Prefect API errors are retried with backoff, never fatal.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import httpx
from botocore.exceptions import ClientError
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

from tasks.aws.clients import client, error_code, job_summaries
from tasks.bedrock.catalog import quota_key
from tasks.bedrock.error_codes import RETRYABLE_GET
from tasks.bedrock.statuses import ACTIVE_STATUSES
from tasks.errors import RunInterrupted
from tasks.settings import get_settings

# Prefect's server bounds a lease to 60 s .. 1 day.
MIN_LEASE_SECONDS = 60
MAX_LEASE_SECONDS = 86_400
# Leases renewed at once by the keeper: enough that 100 renew within one renewal period.
RENEW_WORKERS = 8
# First wait before a failed gate call is tried again; doubles up to gate.retry_max_seconds.
FIRST_RETRY_SECONDS = 0.2
# How long a handed slot waits for a head whose ask is at the server before the waiter behind
# it takes the slot (see _Waiters).
HEAD_PATIENCE_SECONDS = 0.5
# How long slots taken for a run's first shards (take_ahead) wait for them before they are
# given back; shorter still when a lease minus a renewal period leaves less (see take_ahead).
AHEAD_KEEP_SECONDS = 20.0
# Transient errors take_ahead retries (after 0.2, 0.4, 0.8 s: _retry_delay) before it leaves
# the rest to the shards.
AHEAD_RETRIES = 3
# A busy server's 503 cleared by the first quick retry is routine (a 2,000-job run on the
# test server's SQLite saw 160): logged as info; from this many failures in a row, a warning.
WARN_AFTER_FAILURES = 2


def _log_retry(
    logger: Logger | None, what: str, exc: BaseException, failures: int, delay: float
) -> None:
    """A transient Prefect API error about to be retried: info at first, then a warning."""
    (logger or log).log(
        logging.WARNING if failures >= WARN_AFTER_FAILURES else logging.INFO,
        "Prefect API error while trying to %s (%s); retry %d in %.1f s",
        what,
        _describe(exc),
        failures,
        delay,
    )


MODEL_PREFIX = "bedrock-batch-"
RUN_PREFIX = "bedrock-batch-run-"
# Jobs that count against Bedrock's "submitted or in progress" quota (the status table's own).
IN_FLIGHT_STATUSES = tuple(sorted(ACTIVE_STATUSES))

log = logging.getLogger("bedrock_batch.gate")
Logger = logging.Logger | logging.LoggerAdapter
T = TypeVar("T")


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]+", "-", text).strip("-").lower()


def gate_name(model_id: str) -> str:
    """The model limit's name, from the model's quota key (Bedrock's job quota is per model)."""
    return MODEL_PREFIX + _slug(quota_key(model_id))


def run_gate_name(run_name: str) -> str:
    """The run's own limit: at most ``max_concurrent_jobs`` of its jobs in flight.

    ``run_name`` is the run as the gate knows it, ``gate_run`` of a run's name and key.
    """
    return RUN_PREFIX + _slug(run_name)


def gate_run(run_name: str, run_key: str) -> str:
    """The run as its gate knows it: the name for people, the key (``run_key``) to tell runs apart.

    By name alone, ``exp.1`` and ``exp_1``, or one name in two output folders (two teammates'
    ``eval-{date}``), shared one limit: each run resized it to its own cap, and a run of cap 1
    had 2 jobs in flight beside the other.
    """
    return f"{run_name}-{run_key}"


def is_transient(exc: BaseException) -> bool:
    """A Prefect API error that clears up with time: 408, 429, 5xx, timeouts, lost connections."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code in (408, 429) or code >= 500
    return isinstance(exc, httpx.TransportError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


@dataclass(frozen=True)
class _GateClient:
    """The gate's Prefect client for one settings object, and the copy it calls under."""

    settings: Any  # the caller's settings (compared by identity)
    no_retry: Any  # their copy with PREFECT_CLIENT_MAX_RETRIES 0
    client: SyncPrefectClient


_gate_clients: list[_GateClient] = []  # the last few settings' clients, newest last
_gate_clients_lock = threading.Lock()


@contextmanager
def _prefect() -> Iterator[SyncPrefectClient]:
    """A Prefect client that does not retry on its own; the gate's callers retry.

    Prefect's client answers a 503 (its server's SQLite busy under a run's writes) by sleeping
    2, 4, 8 ... s; while the gate's one asker sleeps, every shard of the process waiting for a
    slot waits with it. The gate's loops retry after FIRST_RETRY_SECONDS instead, and log it.

    One client serves every call under the same settings, from any thread (httpx's client is
    thread-safe; the keeper already shared one among its renewals): a new client costs ~20 ms
    of CPU, httpx building its SSL context, which the process paid on every ask, renewal,
    recount and release. It is the gate's own, never the flow run's (that one closes with the
    run), and stays open for the process; a call that meets a connection a restarted server
    dropped gets a transport error, which the callers retry.
    """
    context = get_settings_context()
    with _gate_clients_lock:
        entry = next((e for e in _gate_clients if e.settings is context.settings), None)
        if entry is None:  # a copy of the settings costs ~30 ms: made once per settings
            no_retry = context.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
            with SettingsContext(profile=context.profile, settings=no_retry):
                # httpx_settings={}: a client of the gate's own, not the flow run's.
                made = get_client(httpx_settings={}, sync_client=True)
            made.__enter__()
            entry = _GateClient(context.settings, no_retry, made)
            # Older ones are left to the collector: another thread may be in a call with one.
            _gate_clients[:] = [*_gate_clients[-3:], entry]
    # The retry count is read at each request, so each call runs under the copy.
    with SettingsContext(profile=context.profile, settings=entry.no_retry):
        yield entry.client


def _retry_delay(failures: int) -> float:
    """The wait before trying a failed gate call again: 0.2 s, doubling up to the setting."""
    return min(FIRST_RETRY_SECONDS * 2 ** (failures - 1), get_settings().gate.retry_max_seconds)


def _call(
    what: str,
    fn: Callable[[Any], T],
    logger: Logger | None = None,
    deadline: float | None = None,
) -> T:
    """``fn(prefect_client)``; transient errors are logged and retried with capped backoff."""
    failures = 0
    while True:
        try:
            with _prefect() as client:
                return fn(client)
        except Exception as exc:
            if not is_transient(exc):
                raise
            failures += 1
            delay = _retry_delay(failures)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            _log_retry(logger, what, exc, failures, delay)
            time.sleep(delay * random.uniform(0.8, 1.2))


def _lease_seconds(seconds: float) -> float:
    return float(min(max(seconds, MIN_LEASE_SECONDS), MAX_LEASE_SECONDS))


def ensure_gates(model_id: str, run_name: str, max_concurrent_jobs: int) -> tuple[str, int, str]:
    """Create the model's limit when missing (never resize it) and size the run's own limit.

    Returns:
        The model limit's name, its size, and the run limit's name.
    """
    if max_concurrent_jobs < 1:
        msg = f"max_concurrent_jobs must be at least 1, got {max_concurrent_jobs}."
        raise ValueError(msg)
    quota = get_settings().quotas.max_jobs_per_model
    model_gate, run_gate = gate_name(model_id), run_gate_name(run_name)

    def model_limit(prefect) -> int:
        try:
            return prefect.read_global_concurrency_limit_by_name(model_gate).limit
        except ObjectNotFound:
            pass
        try:
            prefect.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=model_gate, limit=quota)
            )
        except ObjectAlreadyExists:  # another run created it meanwhile
            return prefect.read_global_concurrency_limit_by_name(model_gate).limit
        return quota

    size = _call("open the model gate " + model_gate, model_limit)
    _call(
        "size the run gate " + run_gate,
        lambda p: p.upsert_global_concurrency_limit_by_name(run_gate, max_concurrent_jobs),
    )
    return model_gate, size, run_gate


def active_slots(name: str) -> int:
    """How many slots of a limit are counted as taken now."""
    return _call(
        "read " + name, lambda p: p.read_global_concurrency_limit_by_name(name).active_slots
    )


def _set_active_slots(name: str, slots: int) -> None:
    _call(
        "recount " + name,
        lambda p: p.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(active_slots=max(slots, 0))
        ),
    )


def _take_lease(
    client: SyncPrefectClient, names: list[str], lease_seconds: float, holder: UUID | None
) -> UUID:
    """One slot of both limits in one increment, held by the flow run ``holder``; now ours."""
    response = client.increment_concurrency_slots_with_lease(
        names=names,
        slots=1,
        mode="concurrency",
        lease_duration=_lease_seconds(lease_seconds),
        holder=ConcurrencyLeaseHolder(type="flow_run", id=holder) if holder else None,
    )
    lease_id = UUID(response.json()["lease_id"])
    _took(lease_id, names)
    return lease_id


def _increment(names: list[str], lease_seconds: float, holder: UUID | None, logger) -> UUID:
    return _call(
        "take a slot of " + names[0],
        lambda p: _take_lease(p, names, lease_seconds, holder),
        logger,
    )


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 423


def _lost_here(model_gate: str) -> list[str]:
    return [
        s.key for s in KEEPER.slots() if s.lease_id is None and gate_name(s.model_id) == model_gate
    ]


class _Waiters:
    """This process's shards waiting on one pair of limits, first come first served.

    Only the shard at the head asks Prefect, so however many shards wait, the gate is asked at
    most once per ``wait_seconds`` per process, plus once each time this process frees a slot
    (``slot_freed``): a freed slot is taken again at once, not at the next Retry-After. A slot
    whose job ended while shards of the same run wait is handed on as it is (``handed``): no
    Prefect call at all, so a busy server cannot delay the refill. It goes to the head, or to
    the waiter behind it once the head's ask has been at the server ``HEAD_PATIENCE_SECONDS``
    (``asking``): a busy server held a head's ask for 2 s before its 503 and seventeen handed
    slots waited for it (refill benchmark). Passing the head over at once instead cost 10-13%
    of wall time at 2,000 shards and gate 100 (2026-12-03, two interleaved pairs: 294.6 / 271.1
    s against 269.0 / 239.1 s), with more of the head's asks meeting a busy server.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: deque[object] = deque()
        self.freed = 0  # bumped by every slot this process gives back
        self.handed: deque[UUID] = deque()  # leases of ended jobs, for the next waiter
        self.asking: object | None = None  # the head while its ask is at the server
        self.asking_since = 0.0  # monotonic time that ask began
        self.ahead: deque[UUID] = deque()  # slots taken for the run's first shards (take_ahead)
        # (freed, monotonic time) of the last refusal: a new head does not ask again before
        # a slot is freed here or wait_seconds pass, since the answer would be the same.
        self.refused: tuple[int, float] | None = None
        self.abandoned = False  # the run was interrupted: its waiters leave (`abandon_waiters`)


_waiters: dict[tuple[str, ...], _Waiters] = {}
_waiters_lock = threading.Lock()


def _waiters_for(names: list[str]) -> _Waiters:
    with _waiters_lock:
        return _waiters.setdefault(tuple(names), _Waiters())


def abandon_waiters(model_id: str, run_name: str, abandoned: bool = True) -> None:
    """The run is interrupted: its shards waiting for a slot leave with `RunInterrupted`.

    ``abandoned=False``: a new start of the run in this process, whose shards wait again.
    """
    group = _waiters_for([gate_name(model_id), run_gate_name(run_name)])
    with group.cond:
        group.abandoned = abandoned
        group.cond.notify_all()


def _leave_if_abandoned(group: _Waiters) -> None:
    """Called with ``group.cond`` held, after each wake."""
    if group.abandoned:
        raise RunInterrupted("The run was interrupted while its shard waited for a gate slot.")


def slot_freed(names: tuple[str, ...] | None = None) -> None:
    """A slot of this process was given back: the head waiters of its gates ask again now.

    ``names``: the limits the slot counted on; waiters sharing none of them are not woken
    (their answer would not change). None (a lease this process does not know) wakes all.
    """
    with _waiters_lock:
        groups = [
            group
            for key, group in _waiters.items()
            if names is None or not set(key).isdisjoint(names)
        ]
    for group in groups:
        with group.cond:
            group.freed += 1
            group.cond.notify_all()


def hand_over_or_release(
    lease_id: UUID | str, model_id: str, run_name: str, logger: Logger | None = None
) -> bool:
    """Give an ended job's slot to the next shard of its run waiting here, else release it.

    The slot stays counted in both limits, as it would between a release and the waiter's
    next ask, only without the two Prefect calls (each one a write a busy server may answer
    with 503 seconds later). Slots of running jobs whose lease was lost come first: while one
    waits, the slot is released so the recount can give it back to that job.

    Returns:
        True when a waiting shard took the slot.
    """
    names = [gate_name(model_id), run_gate_name(run_name)]
    group = _waiters_for(names)
    with group.cond:
        if group.queue and not _lost_here(names[0]):
            group.handed.append(UUID(str(lease_id)))
            group.cond.notify_all()
            return True
    release_slot(lease_id, logger)
    return False


def _take_handed(group: _Waiters, ticket: object) -> UUID | None:
    """A handed-over lease for ``ticket`` when it is its turn (_Waiters); under ``group.cond``."""
    if not group.handed or not group.queue:
        return None
    if group.queue[0] is ticket or (_behind_a_slow_ask(group, ticket) == 0):
        return group.handed.popleft()
    return None


def _behind_a_slow_ask(group: _Waiters, ticket: object) -> float | None:
    """Seconds until ``ticket``, right behind an asking head, may take a handed slot; else None."""
    if group.asking is None or len(group.queue) < 2 or group.queue[1] is not ticket:
        return None
    return max(0.0, group.asking_since + HEAD_PATIENCE_SECONDS - time.monotonic())


def acquire_slot(
    model_id: str,
    run_name: str,
    lease_seconds: float,
    holder_flow_run_id: UUID | None = None,
    logger: Logger | None = None,
    leases_lost: bool = False,
) -> UUID:
    """Wait until both the model's and the run's limits have room; take one slot of each.

    A slot taken ahead for the run's first shards (``take_ahead``) is taken without asking.
    Waiting shards of this process queue up and only the first asks: at most once every
    ``BEDROCK_BATCH_GATE_WAIT_SECONDS`` (a slot freed by another process is found then), and at
    once whenever this process frees a slot. Running jobs of this process whose lease was lost
    go first: no new slot is taken while one of them waits to take its own again. After waiting
    ``reconcile_after_seconds``, or at once when ``leases_lost``, the model's gate is recounted
    from Bedrock so slots of lost leases cannot block it forever. Transient Prefect API errors
    are logged and retried.

    Returns:
        The lease id.
    """
    names = [gate_name(model_id), run_gate_name(run_name)]
    group = _waiters_for(names)
    ticket = object()
    handed = None
    with group.cond:
        _leave_if_abandoned(group)
        if group.ahead:
            return group.ahead.popleft()
        group.queue.append(ticket)
        try:
            while group.queue[0] is not ticket:
                handed = _take_handed(group, ticket)  # while the head's ask is at the server
                if handed is not None:
                    break
                group.cond.wait(_behind_a_slow_ask(group, ticket) if group.handed else None)
                _leave_if_abandoned(group)
        except RunInterrupted:
            group.queue.remove(ticket)
            raise
    try:
        if handed is not None:
            return handed
        return _ask_until_taken(
            group,
            ticket,
            names,
            model_id,
            run_name,
            lease_seconds,
            holder_flow_run_id,
            logger,
            leases_lost,
        )
    finally:
        with group.cond:
            group.queue.remove(ticket)
            group.cond.notify_all()
            # Handed over as the last waiter left with a lease of its own: nobody takes it.
            unclaimed = list(group.handed) if not group.queue else []
            if unclaimed:
                group.handed.clear()
        for lease_id in unclaimed:
            release_slot(lease_id, logger)


def take_ahead(
    model_id: str,
    run_name: str,
    count: int,
    lease_seconds: float,
    holder_flow_run_id: UUID | None = None,
    logger: Logger | None = None,
) -> int:
    """Take up to ``count`` slots for a new run's first shards, before they start.

    The first wave's asks otherwise meet the Prefect server while it records the run's new
    task runs: on the local stack's SQLite, the first ask often waited 2 s for a 503 (the refill
    benchmark's first wave took 0.5-6.9 s to fill, against ~10 ms an ask at a quiet server).
    Stops at the first refusal, or when the server stays busy; the shards ask for the rest. A
    shard takes one of these without a Prefect call (``acquire_slot``); those not taken within
    ``_ahead_keep_seconds`` are given back, so a shard that never asks (held back by the cost
    ceiling) holds nothing.

    Only for a run with no job yet: on a resume, running jobs whose leases were lost must take
    theirs again first.

    Returns:
        How many slots were taken.
    """
    names = [gate_name(model_id), run_gate_name(run_name)]
    taken: list[UUID] = []
    failures = 0
    while len(taken) < count:
        lease = _ask(names, lease_seconds, holder_flow_run_id)
        if isinstance(lease, UUID):
            taken.append(lease)
        elif lease is None or failures == AHEAD_RETRIES:  # full, or the server stays busy
            break
        else:
            failures += 1
            delay = _retry_delay(failures)
            _log_retry(logger, f"take slots of {names[0]} ahead", lease, failures, delay)
            time.sleep(delay)
    if taken:
        group = _waiters_for(names)
        with group.cond:
            group.ahead.extend(taken)
        timer = threading.Timer(_ahead_keep_seconds(), _give_back_ahead, (names, taken))
        timer.daemon = True
        timer.start()
    return len(taken)


def _ahead_keep_seconds() -> float:
    """A slot taken ahead is not renewed until a shard takes it into the keeper, which renews
    it ``renew_seconds`` later: both must fit in the lease, with room to spare."""
    settings = get_settings()
    spare = _lease_seconds(settings.poll.lease_seconds) - settings.gate.renew_seconds
    return min(AHEAD_KEEP_SECONDS, max(spare, 0.0) / 2)


def _give_back_ahead(names: list[str], leases: list[UUID]) -> None:
    """Release those of ``leases`` no shard took."""
    group = _waiters_for(names)
    with group.cond:
        left = [lease for lease in leases if lease in group.ahead]
        for lease in left:
            group.ahead.remove(lease)
    for lease in left:
        release_slot(lease)
    if left:
        log.info("Gave back %d slots of %s taken ahead that no shard took", len(left), names[0])


def _ask_until_taken(
    group: _Waiters,
    ticket: object,
    names: list[str],
    model_id: str,
    run_name: str,
    lease_seconds: float,
    holder_flow_run_id: UUID | None,
    logger: Logger | None,
    leases_lost: bool,
) -> UUID:
    settings = get_settings().gate
    if leases_lost:
        reconcile(model_id, logger, run_name=run_name)
    started = time.monotonic()
    waiting = False
    failures = 0
    while True:
        with group.cond:
            _leave_if_abandoned(group)
            freed = group.freed
            handed = _take_handed(group, ticket)
            refused = group.refused
        if handed is not None:
            if waiting and logger:
                logger.info(
                    "Took over a slot of %s after %.1f s", names[0], time.monotonic() - started
                )
            return handed
        since_refused = time.monotonic() - refused[1] if refused else None
        if refused and refused[0] == freed and since_refused < settings.wait_seconds:
            pause = settings.wait_seconds - since_refused  # asked just now by the last head
        else:
            lease = _ask_as(group, ticket, names, lease_seconds, holder_flow_run_id)
            if isinstance(lease, UUID):
                with group.cond:
                    group.refused = None
                if waiting and logger:
                    logger.info(
                        "Took a slot of %s after %.1f s", names[0], time.monotonic() - started
                    )
                return lease
            if lease is not None:  # a transient error: ask again after its backoff
                failures += 1
                delay = _retry_delay(failures)
                _log_retry(logger, "take a slot of " + names[0], lease, failures, delay)
                with group.cond:  # a slot handed on meanwhile ends the backoff
                    group.cond.wait_for(lambda: bool(group.handed) or group.abandoned, delay)
                continue
            with group.cond:
                group.refused = (freed, time.monotonic())
            pause = settings.wait_seconds
        failures = 0
        if not waiting and logger:
            logger.info("Gates %s are full; waiting for a job to finish", " and ".join(names))
        waiting = True
        if time.monotonic() - started >= settings.reconcile_after_seconds:
            reconcile(model_id, logger, waited=True, run_name=run_name)
        # Prefect's Retry-After is not waited for: one asker per process keeps the rate
        # bounded, and a slot this process frees or hands over wakes it at once.
        with group.cond:
            group.cond.wait_for(
                lambda seen=freed: group.freed != seen or bool(group.handed) or group.abandoned,
                pause,
            )


def _ask_as(
    group: _Waiters, ticket: object, names: list[str], lease_seconds: float, holder: UUID | None
) -> UUID | Exception | None:
    """`_ask` for the head ``ticket``; slots handed on meanwhile may go to the waiter behind it."""
    with group.cond:
        group.asking, group.asking_since = ticket, time.monotonic()
        if group.handed:  # handed since the head looked: the waiter behind it starts its clock
            group.cond.notify_all()
    try:
        return _ask(names, lease_seconds, holder)
    finally:
        with group.cond:
            group.asking = None


def _ask(names: list[str], lease_seconds: float, holder: UUID | None) -> UUID | Exception | None:
    """One increment of both limits: the lease, a transient error to retry, or None if full.

    Under the recount's lock, so a recount that made room for lost leases of running jobs is
    not taken from under them by a shard of this process that waits for a new slot; while
    such a job waits for its slot again, no new slot is asked for at all.
    """
    with _reconcile_lock:
        if _lost_here(names[0]):
            return None
        try:
            with _prefect() as client:
                return _take_lease(client, names, lease_seconds, holder)
        except Exception as exc:
            if _is_full(exc):
                return None
            if is_transient(exc):
                return exc
            raise


def renew_slot(
    lease_id: UUID | str, lease_seconds: float, client: SyncPrefectClient | None = None
) -> bool:
    """Extend a lease; False when the server no longer knows it (expired, or lost in a restart).

    ``client``: one the caller keeps open, tried once (the keeper renews all its leases with
    one: a new client per renewal cost ~35 ms of CPU, a few seconds a cycle at a hundred
    jobs, and an unreachable server is the next cycle's business). Without it, transient
    errors are retried.
    """

    def renew(prefect) -> bool:
        try:
            prefect.renew_concurrency_lease(UUID(str(lease_id)), _lease_seconds(lease_seconds))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (404, 410):
                return False
            raise
        return True

    if client is not None:
        return renew(client)
    return _call("renew lease " + str(lease_id), renew)


def release_slot(lease_id: UUID | str, logger: Logger | None = None) -> None:
    """Give the slot back; an unknown lease is fine, and so is a server that stays away.

    The server's decrement and forgetting the lease here are one step under the recount's
    lock, as taking a lease is (`_ask`): a recount between the two counted a slot nobody held
    any more, and a recount's count has no lease to expire, so the gate stayed a slot too high
    after the run (seen at the end of a run that had lived through a Prefect restart).
    """
    deadline = time.monotonic() + get_settings().gate.release_timeout_seconds

    def release(prefect) -> tuple[str, str] | None:
        with _reconcile_lock:
            prefect.release_concurrency_slots_with_lease(UUID(str(lease_id)))
            return _gave_back(lease_id)

    try:
        slot_freed(_call("release lease " + str(lease_id), release, logger, deadline))
    except Exception as exc:
        _gave_back(lease_id)
        if not is_transient(exc) and not (
            isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (404, 410)
        ):
            raise
        (logger or log).warning(
            "Could not release lease %s (%s); it frees itself when it expires",
            lease_id,
            _describe(exc),
        )


# -- the lease keeper: one thread per process renews every held slot ---------------------------


@dataclass
class HeldSlot:
    """A slot held for one job: its lease (None while lost) and where to record a new one."""

    key: str  # the job name
    model_id: str
    run_name: str
    lease_id: str | None
    holder: UUID | None = None
    on_new_lease: Callable[[str], None] | None = None
    lost_since: float | None = None


class LeaseKeeper:
    """Renews every held lease every ``renew_seconds``; lost leases are re-taken via reconcile."""

    def __init__(self) -> None:
        self._slots: dict[str, HeldSlot] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, slot: HeldSlot) -> None:
        if slot.lease_id is None and slot.lost_since is None:
            slot.lost_since = time.monotonic()
        with self._lock:
            self._slots[slot.key] = slot
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="bedrock-batch-lease-keeper", daemon=True
                )
                self._thread.start()

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._slots

    def drop(self, key: str) -> HeldSlot | None:
        with self._lock:
            return self._slots.pop(key, None)

    def slots(self) -> list[HeldSlot]:
        with self._lock:
            return list(self._slots.values())

    def _run(self) -> None:
        while True:
            time.sleep(get_settings().gate.renew_seconds)
            try:
                self.renew_all()
            except Exception:  # the keeper must outlive any one bad cycle
                log.exception("Lease keeper cycle failed; trying again next cycle")

    def renew_all(self) -> None:
        """One cycle: renew each lease; recount the gates of those the server lost."""
        lease_seconds = get_settings().poll.lease_seconds
        lost_models: dict[str, str] = {}
        unreachable = 0
        slots = self.slots()
        if not slots:
            return

        def renew(slot: HeldSlot, client: SyncPrefectClient) -> bool | None:
            """True renewed, False unknown to the server, None unreachable this cycle."""
            if slot.lease_id is None:
                return False
            try:
                return renew_slot(slot.lease_id, lease_seconds, client=client)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                return None

        # Side by side: a hundred renewals one after another on a busy server took longer than
        # a lease lasts, and the last ones expired while their jobs ran. One client (its
        # connection pool is thread-safe) for the cycle.
        with _prefect() as client, ThreadPoolExecutor(max_workers=RENEW_WORKERS) as pool:
            renewed = list(pool.map(lambda slot: renew(slot, client), slots))
        for slot, ok in zip(slots, renewed, strict=True):
            if ok:
                continue
            if ok is None:
                unreachable += 1
                continue
            with self._lock:
                if self._slots.get(slot.key) is not slot:
                    # Its job ended during the cycle: its shard dropped the slot, then gave the
                    # lease back or handed it on. Not lost, nothing to recount.
                    continue
                gone, slot.lease_id = slot.lease_id, None
                if gone is not None:
                    slot.lost_since = time.monotonic()
            if gone is not None:
                log.warning(
                    "The Prefect server no longer knows the lease of %s (expired or lost in a "
                    "restart); recounting the gate from Bedrock",
                    slot.key,
                )
                _gave_back(gone)
            lost_models.setdefault(gate_name(slot.model_id), slot.model_id)
        if unreachable:
            log.warning("Prefect API unreachable: %d leases not renewed this cycle", unreachable)
        for model_id in lost_models.values():
            try:
                reconcile(model_id)
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, ClientError):
                    raise
                log.warning("Recount of %s failed (%s); next cycle", model_id, exc)

    def retake(self, slot: HeldSlot, logger: Logger | None = None) -> bool:
        """One try, never a wait: a lease for a slot that lost its own."""
        names = [gate_name(slot.model_id), run_gate_name(slot.run_name)]
        try:
            lease_seconds = get_settings().poll.lease_seconds
            lease_id = str(_increment(names, lease_seconds, slot.holder, logger))
        except httpx.HTTPStatusError as exc:
            if not _is_full(exc):
                raise
            return False
        with self._lock:
            held = self._slots.get(slot.key) is slot
            if held:
                slot.lease_id, slot.lost_since = lease_id, None
        if not held:  # released meanwhile: give the new lease straight back
            release_slot(lease_id)
            return True
        (logger or log).info("Took the gate slot of running job %s again", slot.key)
        if slot.on_new_lease:
            slot.on_new_lease(lease_id)
        return True


KEEPER = LeaseKeeper()
_reconcile_lock = threading.RLock()
_last_reconcile: dict[str, float] = {}
# Every lease this process took and has not given back: lease id -> (model gate, run gate).
# A recount counts these as ours, wherever the lease is: with a running job in the keeper,
# just taken and not yet kept, or handed from an ended job to the next shard. Counting only
# the keeper's once lowered a run's gate by the lease in transit, and let a run of cap 2 have
# 4 jobs in flight.
_taken: dict[str, tuple[str, str]] = {}


def _took(lease_id: UUID | str, names: list[str]) -> None:
    with _reconcile_lock:
        _taken[str(lease_id)] = (names[0], names[1])


def _gave_back(lease_id: UUID | str) -> tuple[str, str] | None:
    """Forget a lease given back; the limits it counted on, when this process took it."""
    with _reconcile_lock:
        return _taken.pop(str(lease_id), None)


def kept_after_restart(lease_id: UUID | str, model_id: str, run_name: str) -> None:
    """A lease stored by an earlier process of the run, renewed by this one: ours again."""
    _took(lease_id, [gate_name(model_id), run_gate_name(run_name)])


def in_flight_jobs(model_id: str) -> set[str]:
    """Names of the jobs Bedrock lists as submitted or in progress for the model's quota key."""
    names: set[str] = set()
    for status in IN_FLIGHT_STATUSES:
        names |= _listed_jobs(model_id, statusEquals=status)
    return names


def _listed_jobs(model_id: str, **filters: Any) -> set[str]:
    """Names of the jobs under the model's quota key that ListModelInvocationJobs returns for
    ``filters`` (botocore ListModelInvocationJobsRequest), every page."""
    bedrock, key = client("bedrock"), gate_name(model_id)
    listed = job_summaries(lambda **kwargs: _list_page(bedrock, kwargs), **filters, maxResults=1000)
    return {job["jobName"] for job in listed if gate_name(job["modelId"]) == key}


def _list_page(bedrock, kwargs: dict) -> dict:
    delay = 0.5
    for _ in range(8):
        try:
            return bedrock.list_model_invocation_jobs(**kwargs)
        except ClientError as exc:
            if error_code(exc) not in RETRYABLE_GET:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    return bedrock.list_model_invocation_jobs(**kwargs)


@dataclass(frozen=True)
class _Sighting:
    """What a waiting shard's recount saw of a model's gate that Bedrock and we do not explain.

    Two sightings are equal when they saw the same (their times aside).
    """

    at: float = field(compare=False)  # monotonic
    wall: datetime = field(compare=False)  # for Bedrock's submitTime
    counted: int
    listed: frozenset[str]  # the model's jobs in flight
    ours: frozenset[str]  # this process's leases on the model's gate


# Model gate -> the first sighting of its count as it is now, above what is explained.
_sightings: dict[str, _Sighting] = {}
# Bedrock's clock against ours: a job submitted this long before a sighting counts as new.
SUBMIT_CLOCK_MARGIN_SECONDS = 60.0
# How often Prefect's server frees expired leases (its repossessor service's default loop,
# PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS).
REPOSSESSOR_SECONDS = 15.0


def settle_seconds() -> float:
    """How long an unexplained count must stay the same before a waiting shard frees it.

    Another process's slot between its increment (or its last job's end) and its next job
    being listed looks exactly like a lost lease; it lasts about one poll interval and a
    create call. A slot whose lease is alive but not renewed (a dead run's) is freed by the
    server when the lease expires: freeing it here as well would free it twice. A slot of a
    lease the server lost stays through both.
    """
    settings = get_settings()
    lease = _lease_seconds(settings.poll.lease_seconds) + REPOSSESSOR_SECONDS
    return max(settings.gate.reconcile_after_seconds, 2 * settings.poll.interval_seconds, lease)


def _submitted_since(model_id: str, after: datetime) -> set[str]:
    """Names of the model's jobs Bedrock says were submitted after ``after``, in any status."""
    return _listed_jobs(model_id, submitTimeAfter=after)


def _unexplained_for_long(model_id: str, now: _Sighting) -> bool:
    """The count above what is explained stayed as it is for ``settle_seconds``: lost leases.

    Anything another process does with the gate shows in between: a slot taken or given back
    changes the count, a job created or ended changes the jobs in flight, and a job created
    and ended in between is listed as submitted since the first sighting.
    """
    model_gate = gate_name(model_id)
    before = _sightings.get(model_gate)
    if before != now:
        _sightings[model_gate] = now
        return False
    if now.at - before.at < settle_seconds():
        return False
    since = before.wall - timedelta(seconds=SUBMIT_CLOCK_MARGIN_SECONDS)
    if _submitted_since(model_id, since) - before.listed:
        _sightings[model_gate] = now
        return False
    return True


def _free_slots(name: str, slots: int) -> None:
    """Take ``slots`` off a limit's count by a decrement, not a set: what other processes take
    or give back meanwhile stays counted (a set would overwrite it).

    The client's ``release_concurrency_slots`` makes the same call but requires an occupancy,
    which the server averages into the limit's Retry-After; a lost lease's slot has none to
    give, so the request leaves it out (the endpoint's ``occupancy_seconds`` is optional).
    """
    _call(
        "recount " + name,
        lambda p: p.request(
            "POST", "/v2/concurrency_limits/decrement", json={"names": [name], "slots": slots}
        ),
    )


def reconcile(
    model_id: str,
    logger: Logger | None = None,
    waited: bool = False,
    run_name: str | None = None,
) -> None:
    """Recount the model's gate from Bedrock and take lost leases of our running jobs again.

    The model limit should count the jobs Bedrock has in flight, less our own whose lease was
    lost (they take a slot again right after, without waiting), plus the leases this process
    holds whose job Bedrock does not list (not created yet, or handed from an ended job to the
    next). Each run limit of this process (and ``run_name``'s) is set to the leases this
    process holds for that run (a run has one process).

    ``waited``: called by a shard that waited ``reconcile_after_seconds`` for a slot, with no
    lease of this process known lost. At most once a period, and a count above the target is
    only lowered once it stayed the same for ``settle_seconds``: other processes' leases on
    their way to a job are invisible here, and freeing them let two runs of one model have 4
    jobs in flight under a gate of 3 (CI).
    """
    logger = logger or log
    model_gate = gate_name(model_id)
    with _reconcile_lock:
        now = time.monotonic()
        period = get_settings().gate.reconcile_after_seconds
        if waited and now - _last_reconcile.get(model_gate, -period) < period:
            return
        _last_reconcile[model_gate] = now
        listed = in_flight_jobs(model_id)
        ours = [s for s in KEEPER.slots() if gate_name(s.model_id) == model_gate]
        lost = [s for s in ours if s.lease_id is None]
        job_of = {s.lease_id: s.key for s in ours if s.lease_id is not None}
        taken = [
            (lease, run_gate) for lease, (gate, run_gate) in _taken.items() if gate == model_gate
        ]
        # Our leases whose job Bedrock does not list in flight: not created yet, between two
        # jobs (handed over), or ended and not given back yet; those it lists count once.
        unlisted = sum(job_of.get(lease) not in listed for lease, _ in taken)
        target = max(len(listed) - sum(s.key in listed for s in lost) + unlisted, 0)
        counted = active_slots(model_gate)
        if counted > target and waited and not lost:
            mine = frozenset(lease for lease, _ in taken)
            sighting = _Sighting(now, datetime.now(UTC), counted, frozenset(listed), mine)
            first = model_gate not in _sightings
            if not _unexplained_for_long(model_id, sighting):
                if first:
                    logger.info(
                        "Gate %s counts %d slots; Bedrock has %d jobs in flight and %d of our "
                        "slots wait for a job. Freeing the rest if that stays so for %.0f s "
                        "(a slot of another process on its way to a job looks the same)",
                        model_gate,
                        counted,
                        len(listed),
                        unlisted,
                        settle_seconds(),
                    )
                target = counted  # not now: seen again next period
            else:
                _sightings.pop(model_gate, None)
        else:
            _sightings.pop(model_gate, None)
        if counted != target:
            logger.warning(
                "Gate %s counted %d slots; Bedrock has %d jobs in flight, %d of ours to take "
                "again: recounted to %d",
                model_gate,
                counted,
                len(listed),
                len(lost),
                target,
            )
            if counted > target:
                _free_slots(model_gate, counted - target)
            else:
                _set_active_slots(model_gate, target)
        runs = {run_gate_name(s.run_name) for s in ours} | {run_gate for _, run_gate in taken}
        if run_name:
            runs.add(run_gate_name(run_name))
        for run_gate in sorted(runs):
            run_target = sum(gate_of_run == run_gate for _, gate_of_run in taken)
            if active_slots(run_gate) != run_target:
                _set_active_slots(run_gate, run_target)
        refused = [s.key for s in lost if not KEEPER.retake(s, logger)]
    if refused:
        logger.warning(
            "Gate %s is full; %d running jobs poll on without a slot and take one when free: %s",
            model_gate,
            len(refused),
            ", ".join(refused[:5]),
        )
