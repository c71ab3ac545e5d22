"""Emulator settings: pace, throughput, quotas and faults, from code, env or flags."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from .faults import Faults

ENV_PREFIX = "BEDROCK_EMULATOR_"
FAULT_ENV_PREFIX = "BEDROCK_EMULATOR_FAULT_"
ACCOUNT_ID = "123456789012"


@dataclass
class EmulatorConfig:
    """How fast jobs move and what Bedrock refuses. Defaults are fast, for tests.

    Every job still walks Submitted → Validating → Scheduled → InProgress → final; with the
    defaults each step is immediate and throughput is unlimited. `EmulatorConfig.demo()` is a
    slower, watchable pace.
    """

    account_id: str = ACCOUNT_ID
    # Seconds a job spends in Submitted and in Validating.
    status_step_seconds: float = 0.0
    # Seconds a job waits in Scheduled before it starts (the queue).
    queue_delay_seconds: float = 0.0
    # Per-job throughput while InProgress; None means unlimited. Both limits apply.
    records_per_second: float | None = None
    tokens_per_minute: float | None = None
    # How often a running job updates its counters.
    tick_seconds: float = 0.05
    # How often the AWS/Bedrock/Batch metrics are put to CloudWatch (the open period is updated).
    metrics_interval_seconds: float = 1.0
    # Length of one datapoint: Bedrock publishes one per minute. Lower it only to watch
    # minute-scale behaviour (stall alarms, per-minute throughput) in seconds.
    metrics_period_seconds: int = 60
    # Quotas (per model, adjustable in AWS).
    min_records_per_job: int = 100
    max_records_per_job: int = 50_000
    max_file_bytes: int = 1_000_000_000
    max_job_bytes: int = 5_000_000_000
    max_jobs_per_model: int = 10
    faults: Faults = field(default_factory=Faults)

    @classmethod
    def demo(cls, **overrides) -> EmulatorConfig:
        """A pace a person can watch: a few seconds a status, 50 records/s per job."""
        values = {
            "status_step_seconds": 3.0,
            "queue_delay_seconds": 5.0,
            "records_per_second": 50.0,
            "tick_seconds": 0.5,
            "metrics_interval_seconds": 5.0,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_env(cls, base: EmulatorConfig | None = None, environ=None) -> EmulatorConfig:
        """`base` with BEDROCK_EMULATOR_<FIELD> and BEDROCK_EMULATOR_FAULT_<FAULT> applied."""
        environ = os.environ if environ is None else environ
        config = base or cls()
        changes, fault_changes = {}, {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if f.name != "faults" and raw is not None:
                changes[f.name] = _coerce(cls, f.name, raw)
        for f in dataclasses.fields(Faults):
            raw = environ.get(FAULT_ENV_PREFIX + f.name.upper())
            if raw is not None:
                fault_changes[f.name] = _coerce(Faults, f.name, raw)
        return dataclasses.replace(config, **changes, faults=config.faults.updated(**fault_changes))

    def updated(self, **changes) -> EmulatorConfig:
        """A copy with `changes`; unknown names raise ValueError listing the known ones."""
        known = {f.name for f in dataclasses.fields(self)} - {"faults", "account_id"}
        unknown = sorted(set(changes) - known)
        if unknown:
            msg = f"unknown config setting(s) {unknown}; known settings: {sorted(known)}"
            raise ValueError(msg)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able view."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EmulatorConfig:
        """Inverse of to_dict."""
        values = dict(values)
        faults = Faults(**values.pop("faults", {}))
        return cls(**values, faults=faults)


def _coerce(owner, name: str, raw: str):
    """Turn an env string into the field's type (numbers, optional values, dicts as JSON)."""
    hint = typing.get_type_hints(owner)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is dict or hint is dict:
        return json.loads(raw)
    if hint is bool:
        return raw.strip().lower() in ("1", "true", "yes")
    return hint(raw)
