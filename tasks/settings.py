"""Environment settings: AWS location, staging, polling and the Bedrock batch quotas."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import RunSettingsError

_Group = TypeVar("_Group", bound=BaseSettings)


class QuotaSettings(BaseSettings):
    """Bedrock batch quotas; per model and adjustable in AWS, so every one is a setting."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_QUOTA_")

    min_records_per_job: int = Field(
        100, description="Fewest records Bedrock accepts in one job (1,000 on older accounts)."
    )
    max_records_per_job: int = Field(50_000, description="Most records Bedrock accepts in one job.")
    max_file_bytes: int = Field(1_000_000_000, description="Largest input file Bedrock accepts.")
    max_job_bytes: int = Field(5_000_000_000, description="Largest total input of one job.")
    max_jobs_per_model: int = Field(
        10, description="Jobs submitted or in progress per model and region before Bedrock refuses."
    )


class AwsSettings(BaseSettings):
    """Where the flows talk to AWS; endpoints come from the standard AWS_ENDPOINT_URL_* vars."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_")

    region: str | None = Field(
        None, description="AWS region; falls back to AWS_DEFAULT_REGION / the AWS profile."
    )
    staging_uri: str | None = Field(
        None,
        description="s3:// prefix for job input and output when output_uri is a local folder.",
    )
    role_arn: str | None = Field(
        None, description="Default Bedrock service role when a run does not name one."
    )
    aws_credentials_block: str | None = Field(
        None,
        description=(
            "Name of a Prefect AwsCredentials block to build every AWS client from; unset uses "
            "the standard credential chain (env, profile, instance role)."
        ),
    )


class PollSettings(BaseSettings):
    """How often job status is asked for: ~60 s on AWS, ~1 s on the local stack."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_POLL_")

    interval_seconds: float = Field(
        60.0,
        description=(
            "Wait between two polls of a run's jobs (one ListModelInvocationJobs for all of "
            "them); a freed gate slot is taken again within this time."
        ),
    )
    max_interval_seconds: float = Field(
        300.0, description="Longest wait between two polls while Bedrock throttles them."
    )
    interval_with_events_seconds: float = Field(
        300.0,
        description=(
            "Wait between two polls while job state-change events reach the run: polling is "
            "then only the fallback for an event lost on the way."
        ),
    )
    lease_seconds: int = Field(
        120,
        description=(
            "Length of a gate-slot lease (Prefect allows 60 s to 1 day); renewed every "
            "BEDROCK_BATCH_GATE_RENEW_SECONDS while the job runs, so a dead run's slots free "
            "within this time plus Prefect's ~15 s repossessor loop."
        ),
    )
    create_backoff_seconds: float = Field(
        5.0,
        description=(
            "First wait after CreateModelInvocationJob is throttled or over quota; doubles on "
            "each of up to 12 retries, capped at 5 minutes."
        ),
    )
    stall_warning_seconds: float = Field(
        3600.0,
        description=(
            "A job whose status and counters have not changed for this long logs a warning "
            "(again after each further period it stays stalled)."
        ),
    )


class GateSettings(BaseSettings):
    """The job gate: how leases are kept, how waiting shards ask, how it is reconciled."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_GATE_")

    renew_seconds: float = Field(
        20.0, description="How often the process's one lease keeper renews every held lease."
    )
    wait_seconds: float = Field(
        5.0,
        description=(
            "Wait between two asks of a full gate. Only the first waiting shard of a process "
            "asks, so the rate stays bounded however many wait; a slot the process frees "
            "makes it ask at once."
        ),
    )
    reconcile_after_seconds: float = Field(
        60.0,
        description=(
            "A shard that waited this long for a slot recounts the model's gate from the jobs "
            "Bedrock lists as in flight (once per period per process), healing slots counted "
            "by leases the Prefect server lost. Slots nothing explains are freed only once "
            "the count stayed the same for max(this, 2 x the poll interval, the lease + 15 s): "
            "another process's slot on its way to a job looks the same for a moment, and the "
            "server frees a dead run's lease itself when it expires."
        ),
    )
    retry_max_seconds: float = Field(
        30.0, description="Longest wait between retries of a Prefect API call that failed."
    )
    release_timeout_seconds: float = Field(
        120.0,
        description=(
            "How long a slot release is retried through Prefect API errors before it is left "
            "to expire with its lease."
        ),
    )


class CostSettings(BaseSettings):
    """Prices and the estimate: where overrides live, how the estimate is calibrated."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_COST_")

    prices_file: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "BEDROCK_BATCH_PRICES_FILE", "BEDROCK_BATCH_COST_PRICES_FILE"
        ),
        description="JSON file of price overrides keyed by model id (shape in the README).",
    )
    sample_records: int = Field(
        200, ge=0, description="Records whose input tokens CountTokens counts to calibrate."
    )
    count_tokens: bool = Field(
        True, description="Ask bedrock-runtime CountTokens in the flow's pre-flight estimate."
    )
    chars_per_token: float | None = Field(
        None, gt=0, description="Offline ratio for every family (default: the family's own)."
    )
    expected_output_tokens: int | None = Field(
        None, ge=0, description="Expected output tokens per record (default: unknown)."
    )


class EventsSettings(BaseSettings):
    """Bedrock job state change events: the SQS queue an EventBridge rule feeds, and its relay."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_EVENTS_")

    queue_url: str | None = Field(
        None,
        description=(
            "SQS queue of Bedrock's job state change events (`bedrock-batch events setup` "
            "prints it); unset: the Prefect Variable setup stored, else polling only."
        ),
    )
    wait_seconds: int = Field(
        20,
        ge=0,
        le=20,
        description=(
            "Long-poll wait of each SQS ReceiveMessage (at most 20 s, SQS's limit); a stopped "
            "relay finishes its current wait in the background."
        ),
    )
    receivers: int = Field(
        4,
        ge=1,
        le=20,
        description=(
            "ReceiveMessage long polls a relay keeps going at once: more for runs whose "
            "hundreds of jobs change state together."
        ),
    )
    visibility_timeout_seconds: int = Field(
        60,
        ge=1,
        description=(
            "How long a received message stays hidden from other relays; one that is not "
            "relayed in that time (its process died) goes to another."
        ),
    )
    retry_max_seconds: float = Field(
        60.0, gt=0, description="Longest wait between retries after an SQS or Prefect error."
    )
    listen_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a run waits for its Prefect event subscription."
    )


def _default_merge_workers() -> int:
    """One merge a core, at most 4: each merge already spreads over the cores (Polars), so more
    add memory, not speed."""
    return min(4, os.cpu_count() or 1)


class MergeSettings(BaseSettings):
    """How many shards one process merges at once (a flow run, or `bedrock-batch merge`)."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_MERGE_")

    workers: int = Field(
        default_factory=_default_merge_workers,
        ge=1,
        description=(
            "Shards merged at once by one process; each holds its job's outputs and its rows "
            "in memory until its part is written, so this bounds the process's memory when "
            "many jobs end together (a resumed run). Default: the cores, at most 4."
        ),
    )


class OwnerSettings(BaseSettings):
    """One live owner per run (tasks/run/owner.py), read at each claim: see `read_now`."""

    model_config = SettingsConfigDict(env_prefix="BEDROCK_BATCH_OWNER_")

    expiry_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "A crashed owner's claim on a run is taken over after this long (at once when it "
            "ran on this machine and its process is gone)."
        ),
    )


class Settings(BaseSettings):
    """All settings of the project, one concern each."""

    aws: AwsSettings = Field(default_factory=AwsSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    owner: OwnerSettings = Field(default_factory=OwnerSettings)


@lru_cache
def get_settings() -> Settings:
    """Settings read once from the environment; tests call `get_settings.cache_clear()`.

    Raises:
        RunSettingsError: naming every variable whose value is not valid, and why.
    """
    try:
        return Settings()
    except ValidationError:
        problems = [
            problem
            for field in Settings.model_fields.values()
            for problem in _problems(field.annotation)
        ]
    raise _invalid(problems)


def read_now(group: type[_Group]) -> _Group:
    """One settings group read from the environment as it is now, not cached.

    Raises:
        RunSettingsError: as `get_settings` does, naming each refused variable and value.
    """
    try:
        return group()
    except ValidationError:
        problems = _problems(group)
    raise _invalid(problems)


def _invalid(problems: list[str]) -> RunSettingsError:
    """The one-line error of settings whose environment variables were refused."""
    msg = f"Invalid setting {'; '.join(problems)} (fix the environment variable or unset it)."
    return RunSettingsError(msg)


def _problems(group: type[BaseSettings]) -> list[str]:
    """``VARIABLE='value': what is wrong`` for each refused variable of one settings group."""
    try:
        group()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            if name in group.model_fields:
                alias = group.model_fields[name].validation_alias
                prefix = group.model_config.get("env_prefix", "")
                variable = (
                    alias.choices[0] if isinstance(alias, AliasChoices) else prefix + name
                ).upper()
                name = f"{variable}={os.environ.get(variable, '')!r}"
            problems.append(f"{name}: {error['msg']}")
        return problems
    return []
