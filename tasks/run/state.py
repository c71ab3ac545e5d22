"""The durable state of a run, kept beside its data (``state/`` and ``state.json``).

Written atomically before and after every side effect (a slot taken, a job created, a status
seen, a part merged), so a re-run with the same run name picks up where a crash left off, even
with a fresh Prefect database.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from tasks.aws import storage
from tasks.bedrock.jobs import job_id_from_arn
from tasks.bedrock.statuses import outcome
from tasks.run.layout import STATE_FILE, shard_state_file, shard_state_prefix, state_file_in


def now_iso() -> str:
    """UTC now, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobAttempt:
    """One Bedrock job created (or about to be) for a shard."""

    attempt: int
    job_name: str
    client_token: str
    input_file: str = ""
    input_sha256: str = ""  # of a retry's input file, checked on S3 before it is submitted
    records: int = 0
    served_by: str = "batch"
    lease_id: str | None = None
    job_arn: str | None = None
    status: str | None = None
    message: str | None = None
    submitted_at: str | None = None
    ended_at: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    # The job's manifest.json.out numbers, read once at its merge when its rows carry no
    # token counts (`tasks.bedrock.manifest`); None until then, or when it was unreadable.
    manifest: dict[str, int] | None = None
    # Set when the run stopped the job (flow run cancelled or crashed, `bedrock-batch stop`).
    stop_requested_at: str | None = None
    stopped_by: str | None = None

    @property
    def job_id(self) -> str | None:
        """The id Bedrock puts in the output path: the last part of the ARN."""
        return job_id_from_arn(self.job_arn) if self.job_arn else None

    @property
    def is_final(self) -> bool:
        return outcome(self.status).final


@dataclass
class ShardState:
    """What happened to one shard: its job attempts and its merged part."""

    name: str
    attempts: list[JobAttempt] = field(default_factory=list)
    part_uri: str | None = None
    merge_stats: dict[str, Any] | None = None
    # A merge forgotten to be done again (held rows sent, a lost part): what its first
    # `paid_attempts` attempts cost by that merge, so a re-run's cost guard counts them at it,
    # not at their upper bound. None when the price was unknown.
    paid_usd: float | None = None
    paid_attempts: int = 0

    @property
    def current(self) -> JobAttempt | None:
        return self.attempts[-1] if self.attempts else None


@dataclass
class RunState:
    """Every shard's state plus whether the run finished."""

    run_name: str
    shards: dict[str, ShardState] = field(default_factory=dict)
    finished_at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        shards = {
            name: _shard_from_dict(name, shard) for name, shard in data.get("shards", {}).items()
        }
        return cls(data["run_name"], shards, data.get("finished_at"))

    @property
    def jobs_created(self) -> int:
        """Batch jobs the run has created on Bedrock (they run on whatever becomes of us)."""
        return sum(a.job_arn is not None for s in self.shards.values() for a in s.attempts)


class RunStateStore:
    """Thread-safe holder of a run's state that writes each change through, shard by shard.

    A change to one shard rewrites only that shard's object (``state/<shard>.json``, about a
    kilobyte), so the bytes written grow with what changed, not with the run: a 2,000-shard run
    no longer rewrites a 2 MB file on every status. ``save()`` without a shard writes the whole
    state compacted into ``state.json`` (the end of a run, ``stop``). Loading reads
    ``state.json`` and then every shard object over it, so the run folder alone is enough to
    resume; each write stays atomic (an S3 PUT, or a local write-and-rename).
    """

    def __init__(self, run_dir: str, run_name: str, kms_key_id: str | None = None) -> None:
        self.run_dir = run_dir
        self.kms_key_id = kms_key_id
        self.writes = 0
        self.bytes_written = 0
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._shard_locks: dict[str, threading.Lock] = {}
        # Unreadable files of the state, by shard name (or STATE_FILE): see `_load`.
        self.state, self.lost = _load(run_dir, run_name)

    def shard(self, name: str) -> ShardState:
        with self._lock:
            return self.state.shards.setdefault(name, ShardState(name))

    def save(self, shard: str | None = None) -> None:
        """Write one shard's state, or (no shard) the whole state compacted; after each change.

        Serialising and writing happen under the shard's own lock, so two threads saving one
        shard can never leave the older picture last, while other shards write in parallel.
        """
        if shard is None:
            with self._lock:
                data = json.dumps(asdict(self.state), indent=1, sort_keys=True).encode()
                self._write(state_file_in(self.run_dir), data)
            return
        with self._lock:
            lock = self._shard_locks.setdefault(shard, threading.Lock())
            state = self.state.shards.setdefault(shard, ShardState(shard))
        with lock:
            data = json.dumps(asdict(state), sort_keys=True).encode()
            self._write(shard_state_file(self.run_dir, shard), data)

    def _write(self, uri: str, data: bytes) -> None:
        storage.write_bytes(uri, data, self.kms_key_id)
        with self._count_lock:  # shards write side by side; the counts must not lose one
            self.writes += 1
            self.bytes_written += len(data)


def has_state(run_dir: str) -> bool:
    """Whether a run folder holds any run state (compacted or per shard)."""
    if storage.exists(state_file_in(run_dir)):
        return True
    return bool(storage.list_files(shard_state_prefix(run_dir), ".json"))


def _shard_from_dict(name: str, shard: dict[str, Any]) -> ShardState:
    return ShardState(
        name=name,
        attempts=[JobAttempt(**a) for a in shard["attempts"]],
        part_uri=shard.get("part_uri"),
        merge_stats=shard.get("merge_stats"),
        paid_usd=shard.get("paid_usd"),
        paid_attempts=shard.get("paid_attempts", 0),
    )


def _parsed(data: bytes) -> dict[str, Any] | str:
    """The JSON object in ``data``, or why it is not one.

    Every write of ours is whole (an S3 PUT, a local write-and-rename), so an empty or cut
    file is damage from outside: a disk that filled, a sync tool, a hand edit.
    """
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = "empty" if not data.strip() else f"not JSON ({exc})"
    else:
        if isinstance(value, dict):
            return value
        reason = f"not a JSON object but {type(value).__name__}"
    return f"{reason}, {len(data)} bytes"


def _load(run_dir: str, run_name: str) -> tuple[RunState, dict[str, str]]:
    """The run's state, and the unreadable files of it left out (name: why, URI).

    The name is a shard's, or STATE_FILE for the compacted state (its shards are in their own
    objects too; only ``finished_at`` is lost, and the run's end is done again).

    Such a shard starts again from its plan, as if its object had been deleted: its jobs have
    deterministic names and tokens, so the jobs it made are found and adopted (``lost`` makes
    the shard look them up), their outputs merged again and nothing is paid twice.
    """
    compacted = state_file_in(run_dir)
    state = RunState(run_name)
    lost: dict[str, str] = {}
    if storage.exists(compacted):
        data = _parsed(storage.read_bytes(compacted))
        if isinstance(data, str):
            lost[STATE_FILE] = f"{compacted} ({data})"
        else:
            state = RunState.from_dict({"run_name": run_name, **data})
    uris = storage.list_files(shard_state_prefix(run_dir), ".json")
    # Many small objects: read them side by side (S3 answers each GET in tens of ms).
    with ThreadPoolExecutor(max_workers=16) as pool:
        for uri, raw in zip(uris, pool.map(storage.read_bytes, uris), strict=True):
            shard = _parsed(raw)
            name = uri.rsplit("/", 1)[-1].removesuffix(".json")
            if isinstance(shard, dict) and shard.get("name") != name:
                shard = f"the state of {shard.get('name')!r}, not of {name}"
            if isinstance(shard, str):
                state.shards.pop(name, None)  # an older copy from state.json is no better
                lost[name] = f"{uri} ({shard})"
                continue
            state.shards[name] = _shard_from_dict(name, shard)
    return state, lost
