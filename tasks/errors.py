"""Exceptions raised by the project."""

from __future__ import annotations


class BedrockBatchError(Exception):
    """Base of every error the project raises on purpose."""


class TemplateError(BedrockBatchError, ValueError):
    """A prompt template is malformed or unknown."""


class UnknownModelError(BedrockBatchError, ValueError):
    """A model id matches no registered model family."""


class InvalidOptionsError(BedrockBatchError, ValueError):
    """Inference parameters do not fit the model family's options."""


class SourceError(BedrockBatchError, ValueError):
    """A source URI is malformed, matches no file, or cannot be read."""


class SourceEncodingError(SourceError):
    """A CSV source is not UTF-8."""


class OutputUriError(BedrockBatchError, ValueError):
    """An output URI is malformed."""


class InputValidationError(BedrockBatchError, ValueError):
    """The input rows cannot be sent to Bedrock as they are."""


class MissingColumnsError(InputValidationError):
    """Columns the template or settings refer to are not in the source."""


class MissingValuesError(InputValidationError):
    """Rows have nulls or empty strings in the columns the prompt needs."""


class EmptyDatasetError(InputValidationError):
    """The source has no rows to send."""


class TooFewRecordsError(InputValidationError):
    """Fewer records than one batch job accepts."""


class RecordTooLargeError(InputValidationError):
    """A record is over the model's input limit or the input file limit."""


class DuplicateIdError(InputValidationError):
    """The user id column holds the same id more than once."""


class ShardingError(InputValidationError):
    """The records cannot be cut into jobs within the quotas."""


class PlanError(BedrockBatchError):
    """A run folder has no readable plan, or its outputs do not match it."""


class RunSettingsError(BedrockBatchError, ValueError):
    """A run parameter or setting is missing or invalid (named in the message)."""


class OutputsLostError(BedrockBatchError):
    """Bedrock's outputs of a finished job lack answers it processed (deleted or cut files)."""


class JobLostError(BedrockBatchError):
    """Bedrock no longer answers for a job the run created."""


class IncompleteOutputError(BedrockBatchError):
    """The output does not hold every input record exactly once."""


class RunIdentityError(BedrockBatchError):
    """A run name already holds a run made from different inputs."""


class RunOwnedError(BedrockBatchError):
    """Another live process owns the run."""


class CostCeilingError(BedrockBatchError):
    """The run's estimated cost is over its max_cost_usd; nothing (more) was submitted.

    What a pipeline needs to say it in its own terms: ``upper_bound_usd``, the estimate's
    upper bound that passed the ceiling (None when the price is unknown); ``on_demand``, the
    estimate is at the on-demand price (fewer rows than a batch job's minimum);
    ``jobs_created``, the jobs a resumed run had created before, which go on.
    """

    def __init__(
        self,
        message: str,
        upper_bound_usd: float | None = None,
        on_demand: bool = False,
        jobs_created: int = 0,
    ) -> None:
        super().__init__(message)
        self.upper_bound_usd = upper_bound_usd
        self.on_demand = on_demand
        self.jobs_created = jobs_created


class StopJobsError(BedrockBatchError):
    """Some of a run's jobs could not be stopped; the others were."""


class RunInterrupted(BedrockBatchError):
    """The run's process was interrupted (Ctrl-C, SIGTERM): its shards stop where they wait."""
