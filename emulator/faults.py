"""Faults on demand: which jobs, records and calls go wrong, deterministically from a seed."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass, field

import polars as pl

from .exceptions import (
    RECORD_ERRORS,
    InternalServerException,
    ModelTimeoutException,
    ServiceUnavailableException,
    ThrottlingException,
)

JOB_FAULTS = ("fail", "partial", "expire", "stuck")
THROTTLED_OPERATIONS = ("create", "get", "list", "stop", "invoke")


def _default_mix() -> dict[str, float]:
    return {
        ThrottlingException.code: 0.4,
        InternalServerException.code: 0.3,
        ModelTimeoutException.code: 0.2,
        ServiceUnavailableException.code: 0.1,
    }


@dataclass
class Faults:
    """Every fault the emulator can inject; all off by default.

    A job fault hits a job when its name contains `<kind>_job_names_containing`, or, by rate,
    when a hash of (seed, kind, jobName) falls under `<kind>_jobs`. Faults are read while a
    job runs, so changing them at run time (LocalStack.set_faults) takes effect at once.
    """

    seed: int = 0
    # Records: this share of records gets an injected, retryable error instead of an output.
    record_error_rate: float = 0.0
    record_error_mix: dict[str, float] = field(default_factory=_default_mix)
    record_error_job_names_containing: str | None = None
    # Structured answers: this share of records answers a forced tool call or a JSON-only
    # instruction with JSON that breaks the schema (wrong type, missing field) or is not JSON
    # (cut, prose); with a job-name filter, a retry job (another name) answers cleanly.
    schema_error_rate: float = 0.0
    schema_error_job_names_containing: str | None = None
    # Failed jobs: Failed with `fail_message` before any record is processed.
    fail_jobs: float = 0.0
    fail_job_names_containing: str | None = None
    fail_message: str = "Internal error while processing the batch inference job (emulated)."
    # PartiallyCompleted (ran out of time part-way): `partial_fraction` of the records have no
    # output line.
    partial_jobs: float = 0.0
    partial_job_names_containing: str | None = None
    partial_fraction: float = 0.2
    # Expired: the job goes Scheduled -> Expired and processes nothing, as a Bedrock job that
    # did not start before its timeout. (A job that runs out of time part-way is `partial`.)
    expire_jobs: float = 0.0
    expire_job_names_containing: str | None = None
    # No effect since Expired means "never started"; still accepted so older configs load.
    expire_after_fraction: float = 0.5
    # Stuck: InProgress with zero throughput after `stuck_after_fraction` until cleared.
    stuck_jobs: float = 0.0
    stuck_job_names_containing: str | None = None
    stuck_after_fraction: float = 0.5
    # API calls: ThrottlingException at these rates.
    throttle_create_rate: float = 0.0
    throttle_get_rate: float = 0.0
    throttle_list_rate: float = 0.0
    throttle_stop_rate: float = 0.0
    throttle_invoke_rate: float = 0.0
    # A lower per-model quota of jobs submitted or in progress (None: the configured one).
    quota: int | None = None
    # Added to every API call, in milliseconds.
    latency_ms: int = 0

    def updated(self, **changes) -> Faults:
        """A copy with `changes` applied; unknown names raise ValueError listing the known."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            msg = f"unknown fault(s) {unknown}; known faults: {sorted(known)}"
            raise ValueError(msg)
        for name, value in changes.items():
            if name == "record_error_mix" and value:
                bad = sorted(set(value) - set(RECORD_ERRORS))
                if bad:
                    msg = f"record_error_mix: unknown error(s) {bad}; use {sorted(RECORD_ERRORS)}"
                    raise ValueError(msg)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able view."""
        return dataclasses.asdict(self)

    def hits_job(self, kind: str, job_name: str) -> bool:
        """Whether job fault `kind` (fail, partial, expire, stuck) applies to this job."""
        names = getattr(self, f"{kind}_job_names_containing")
        if names and names in job_name:
            return True
        rate = getattr(self, f"{kind}_jobs")
        return rate > 0 and _uniform(self.seed, kind, job_name) < rate

    def record_errors(self, job_name: str, record_ids: pl.Series) -> pl.DataFrame:
        """Per record: the injected error code and message, null where the record is left alone."""
        frame = record_ids.to_frame("recordId")
        names = self.record_error_job_names_containing
        if self.record_error_rate <= 0 or (names and names not in job_name):
            return frame.select(
                errorCode=pl.lit(None, dtype=pl.Int64), errorMessage=pl.lit(None, dtype=pl.Utf8)
            )
        salt = int(_uniform(self.seed, "record", job_name) * 2**31)
        draw = (pl.col("recordId").hash(seed=salt) % 1_000_003) / 1_000_003
        pick = (pl.col("recordId").hash(seed=salt + 1) % 1_000_003) / 1_000_003
        total = sum(self.record_error_mix.values()) or 1.0
        code_expr = pl.when(False).then(pl.lit(None, dtype=pl.Int64))
        msg_expr = pl.when(False).then(pl.lit(None, dtype=pl.Utf8))
        upper = 0.0
        for name, weight in self.record_error_mix.items():
            upper += weight / total
            status, text = RECORD_ERRORS[name]
            hit = (draw < self.record_error_rate) & (pick < upper)
            code_expr = code_expr.when(hit).then(pl.lit(status, dtype=pl.Int64))
            msg_expr = msg_expr.when(hit).then(pl.lit(f"{name}: {text}"))
        return frame.select(
            errorCode=code_expr.otherwise(None), errorMessage=msg_expr.otherwise(None)
        )

    def schema_errors(self, job_name: str, record_ids: pl.Series) -> pl.DataFrame:
        """recordId and the schema fault kind (1-4, emulator.structured) of the records hit."""
        frame = record_ids.to_frame("recordId")
        names = self.schema_error_job_names_containing
        if self.schema_error_rate <= 0 or (names and names not in job_name):
            return frame.with_columns(pl.lit(0, dtype=pl.Int64).alias("_schema_fault"))
        salt = int(_uniform(self.seed, "schema", job_name) * 2**31)
        draw = (pl.col("recordId").hash(seed=salt) % 1_000_003) / 1_000_003
        kind = (pl.col("recordId").hash(seed=salt + 1) % 4 + 1).cast(pl.Int64)
        return frame.with_columns(
            pl.when(draw < self.schema_error_rate).then(kind).otherwise(0).alias("_schema_fault")
        )


def _uniform(seed: int, *parts: str) -> float:
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Throttle:
    """Seeded, per-operation draw that decides which calls get a ThrottlingException."""

    def __init__(self):
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def hit(self, faults: Faults, operation: str) -> bool:
        """Whether this call of `operation` is throttled under `faults`."""
        rate = getattr(faults, f"throttle_{operation}_rate")
        if rate <= 0:
            return False
        with self._lock:
            count = self._counts.get(operation, 0)
            self._counts[operation] = count + 1
        return _uniform(faults.seed, "throttle", operation, str(count)) < rate

    def reset(self) -> None:
        """Start every operation's sequence again."""
        with self._lock:
            self._counts.clear()
