"""The durable state of a run, kept beside its data (``RunLayout.state_uri``).

Written atomically before and after every side effect (a slot taken, a job created, a status
seen, a part merged), so a re-run with the same run name picks up where a crash left off, even
with a fresh Prefect database.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from tasks.aws import storage
from tasks.bedrock.jobs import job_id_from_arn
from tasks.bedrock.statuses import outcome


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
            name: ShardState(
                name=name,
                attempts=[JobAttempt(**a) for a in shard["attempts"]],
                part_uri=shard.get("part_uri"),
                merge_stats=shard.get("merge_stats"),
            )
            for name, shard in data.get("shards", {}).items()
        }
        return cls(data["run_name"], shards, data.get("finished_at"))


class RunStateStore:
    """Thread-safe holder of a run's state that writes it through on every change."""

    def __init__(self, uri: str, run_name: str, kms_key_id: str | None = None) -> None:
        self.uri = uri
        self.kms_key_id = kms_key_id
        self._lock = threading.Lock()
        if storage.exists(self.uri):
            self.state = RunState.from_dict(json.loads(storage.read_bytes(self.uri)))
        else:
            self.state = RunState(run_name)

    def shard(self, name: str) -> ShardState:
        with self._lock:
            return self.state.shards.setdefault(name, ShardState(name))

    def save(self) -> None:
        """Write the whole state atomically; call after every change."""
        with self._lock:
            data = json.dumps(asdict(self.state), indent=1, sort_keys=True).encode()
            storage.write_bytes(self.uri, data, self.kms_key_id)
