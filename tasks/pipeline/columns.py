"""Column names shared by preprocess, merge and the output Parquet files."""

from __future__ import annotations

# Identity of a record; Bedrock's recordId is an 11-character alphanumeric string.
RECORD_ID = "record_id"

# Results of a text model.
RESPONSE_TEXT = "response_text"
STOP_REASON = "stop_reason"
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"

# Result of an embedding model: list[float32].
EMBEDDING = "embedding"


def embedding_column(embedding_type: str) -> str:
    """The column of one embedding type: `embedding` for floats, `embedding_<type>` else
    (`embedding_int8`, `embedding_uint8`, `embedding_binary`, `embedding_ubinary`)."""
    return EMBEDDING if embedding_type == "float" else f"{EMBEDDING}_{embedding_type}"


# Failure of a record (its own error, its job's error, or a skip by on_missing="skip").
ERROR_CODE = "error_code"
ERROR_MESSAGE = "error_message"
# The modelOutput JSON of a record that answered in a shape its family cannot parse (kept so
# nothing paid for is lost); null for every other row.
RAW_OUTPUT = "raw_output"

# Provenance: which job served the row, how ("batch", "on_demand", "skipped"), after how many tries.
JOB_ID = "job_id"
SERVED_BY = "served_by"
ATTEMPTS = "attempts"

SERVED_BATCH = "batch"
SERVED_ON_DEMAND = "on_demand"
SERVED_SKIPPED = "skipped"

# Error codes the project writes itself (Bedrock's own record errors keep their numeric code).
MISSING_OUTPUT = "MissingOutput"
MISSING_INPUT = "MissingInput"
# The model answered (and was paid) but its output lacks what the family must return: not
# retryable, since a retry would likely answer alike and pay again.
UNPARSEABLE_OUTPUT = "UnparseableOutput"
# An output line that is valid JSON but has neither modelOutput nor error.
INVALID_OUTPUT = "InvalidOutput"
# The model refused or a content filter stopped the answer (its family's stop reasons for
# that, `ModelFamily.filtered_stop_reasons`): what was written and the tokens are kept, and
# the record is not retried, as the same request would be refused again.
CONTENT_FILTERED = "ContentFiltered"

TEXT_RESULT_COLUMNS = (RESPONSE_TEXT, STOP_REASON, INPUT_TOKENS, OUTPUT_TOKENS)
EMBEDDING_RESULT_COLUMNS = (EMBEDDING, INPUT_TOKENS)
STATUS_COLUMNS = (ERROR_CODE, ERROR_MESSAGE, RAW_OUTPUT, JOB_ID, SERVED_BY, ATTEMPTS)
