"""The batch flow's parameters: one typed model, so the Prefect UI shows a proper form."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prompt_templates import prompt_id_to_template
from tasks.bedrock import catalog

# The most jobs one run may keep in flight (its gate); Bedrock's per-model quota is lower on
# most accounts, and the flow sizes its thread pool above it.
MAX_CONCURRENT_JOBS = 100


def known_prompt_ids() -> list[str]:
    """The prompt ids of prompt_templates.py, for the form's drop-down."""
    return sorted(prompt_id_to_template)


def known_model_ids() -> list[str]:
    """The catalog's model ids as a run gives them (profile-only models with their us. id)."""
    return [f"us.{e.model_id}" if e.profile_only else e.model_id for e in catalog.MODELS]


def _prompt_choices(schema: dict[str, Any]) -> None:
    # A drop-down of the templates; null (no prompt) means embeddings.
    schema["anyOf"] = [{"type": "string", "enum": known_prompt_ids()}, {"type": "null"}]


def _model_choices(schema: dict[str, Any]) -> None:
    # A drop-down of the catalog, or free text for a model the catalog does not know yet.
    schema.pop("type", None)
    schema["anyOf"] = [
        {"type": "string", "title": "Catalog model", "enum": known_model_ids()},
        {"type": "string", "title": "Other model id"},
    ]


def warn_if_unknown_model(model_id: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Log a warning when the run's model is not in the batch catalog (it still runs)."""
    if catalog.find(model_id) is not None:
        return
    near = catalog.closest_ids(model_id, 3)
    logger.warning(
        "Model id %s is not in the batch model catalog (%s, read %s); the run uses the family "
        "its id prefix names, and Bedrock decides whether it runs batch.%s",
        model_id,
        catalog.SOURCE_URL,
        catalog.SOURCE_READ,
        f" Closest known ids: {', '.join(near)}." if near else "",
    )


class InferenceOverrides(BaseModel):
    """Inference parameters that override the prompt template's; unset ones keep its values."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per record.")
    temperature: float | None = Field(None, ge=0, le=1, description="Sampling temperature.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass.")
    stop_sequences: list[str] | None = Field(None, description="Texts that end generation.")
    dimensions: int | None = Field(
        None, description="Embedding size (Titan v2: 256/512/1024; Cohere Embed v4: 256 to 1536)."
    )
    normalize: bool | None = Field(None, description="Unit-norm embeddings (Titan v2).")
    input_type: str | None = Field(None, description="Cohere Embed input_type.")
    embedding_types: list[str] | None = Field(
        None,
        description=(
            "Embedding types to return (Cohere Embed: float, int8, uint8, binary, ubinary; "
            "Titan v2: float, binary); each lands in its own column: embedding (floats), "
            "embedding_int8, embedding_uint8, embedding_binary, embedding_ubinary."
        ),
    )

    def as_dict(self) -> dict:
        """Only the fields that were set."""
        return self.model_dump(exclude_none=True)


class BatchParams(BaseModel):
    """One batch inference run."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        ...,
        description=(
            "hf://DATASET?split=train&config=NAME, s3://bucket/key, a local path or a glob "
            "of CSV / Parquet / JSONL files."
        ),
    )
    model_id: str = Field(
        ...,
        description=(
            "Bedrock model id: pick one of the catalog, or type another (e.g. an eu. or "
            "global. inference profile); an id the catalog does not know runs with a warning."
        ),
        json_schema_extra=_model_choices,
    )
    output_uri: str = Field(
        ...,
        description="s3://bucket/prefix or a local folder; the run writes RUN_NAME/ in it.",
    )
    prompt_id: str | None = Field(
        None,
        description="A template of prompt_templates.py; none for embeddings.",
        json_schema_extra=_prompt_choices,
    )
    text_column: str | None = Field(
        None, description="Column to embed when there is no prompt (default: input_text)."
    )
    id_column: str | None = Field(
        None, description="Your own unique id column, kept beside the record id."
    )
    run_name: str | None = Field(
        None,
        description=(
            "Stable name of the run: re-running with it resumes or reports the finished run, "
            "and is refused if the inputs changed. {date} becomes today's date. Default: "
            "derived from the run's identity (source content, prompt, model, parameters)."
        ),
    )
    role_arn: str | None = Field(
        None, description="Service role Bedrock assumes (default: BEDROCK_BATCH_ROLE_ARN)."
    )
    max_concurrent_jobs: int = Field(
        10,
        ge=1,
        le=MAX_CONCURRENT_JOBS,
        description=(
            "Jobs of this run in flight at once (its gate, bedrock-batch-run-RUN_NAME-KEY). Each "
            "job also takes a slot of the model's gate, shared by every run of the model and "
            "sized by BEDROCK_BATCH_QUOTA_MAX_JOBS_PER_MODEL (the account's job quota)."
        ),
    )
    max_records_per_job: int | None = Field(
        None, ge=1, description="Cap per job; default spreads the rows over the gate."
    )
    invocation_type: Literal["InvokeModel", "Converse"] = Field(
        "InvokeModel", description="InvokeModel bodies, or Converse requests for text models."
    )
    inference: InferenceOverrides = Field(default_factory=InferenceOverrides)
    csv_types: Literal["text", "infer"] = Field(
        "text",
        description=(
            "CSV columns are read as text so values reach prompts and output as written "
            "(00007 stays 00007); infer guesses numbers and dates."
        ),
    )
    on_missing: Literal["fail", "skip"] = Field(
        "fail",
        description="Rows with empty prompt columns: stop the run, or skip them with an error.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description=(
            "Tries per record: failed jobs and records that failed for reasons not their own "
            "(throttling, timeouts, 5xx, missing from partial or expired jobs) are sent again."
        ),
    )
    retry_stopped: bool = Field(
        False, description="Also resubmit the records of jobs someone stopped."
    )
    resend_lost_outputs: bool = Field(
        False,
        description=(
            "Send again, and pay again, the records a finished job (or on-demand tail) "
            "answered whose output lines are gone (files deleted or cut); by default the run "
            "stops and names them."
        ),
    )
    on_demand: bool = Field(
        True,
        description=(
            "Serve records too few for a batch job through bedrock-runtime (InvokeModel or "
            "Converse) at the on-demand price: a retry remainder under the job minimum "
            "instead of leaving it failed, and a run (or pipeline stage) under it instead of "
            "refusing it."
        ),
    )
    on_demand_rps: float = Field(
        5.0, gt=0, description="Rate limit of on-demand calls, requests per second per model."
    )
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        description=(
            "Cost ceiling in USD: the run is refused before any job when the estimate's upper "
            "bound is over it, and stops submitting jobs (and the on-demand tail) once actual "
            "plus in-flight estimated cost would pass it. Default: no ceiling."
        ),
    )
    timeout_hours: int | None = Field(
        None, ge=24, le=168, description="Bedrock job timeout (24-168 h; default 72 h)."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Tags put on every job.")
    kms_key_id: str | None = Field(None, description="KMS key for the job outputs.")
    aws_credentials_block: str | None = Field(
        None,
        description=(
            "Name of a Prefect AwsCredentials block every AWS client of the run is built from; "
            "empty uses BEDROCK_BATCH_AWS_CREDENTIALS_BLOCK, else the standard credential chain."
        ),
    )
    restart: bool = Field(
        False,
        description=(
            "Start the run again from scratch: its old folder (and job files) are moved aside "
            "to RUN_NAME.replaced-TIME first. Needed to reuse a run_name whose inputs "
            "changed."
        ),
    )

    @field_validator("model_id", "source", "output_uri", "prompt_id", "id_column", "text_column")
    @classmethod
    def _no_surrounding_spaces(cls, value: str | None) -> str | None:
        """A value pasted with spaces around it names the same thing; Bedrock would refuse it."""
        return value.strip() if isinstance(value, str) else value
