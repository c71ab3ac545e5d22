"""Bedrock error codes, and which of them are worth retrying, one set per purpose.

Codes of the control plane (CreateModelInvocationJob, GetModelInvocationJob) and of
bedrock-runtime (InvokeModel, Converse) as botocore's service models list them; record errors
are the `errorCode` of a batch output line (an HTTP status, e.g. 429).
"""

from __future__ import annotations

THROTTLING = "ThrottlingException"
QUOTA_EXCEEDED = "ServiceQuotaExceededException"
INTERNAL = "InternalServerException"
VALIDATION = "ValidationException"
NOT_FOUND = "ResourceNotFoundException"
CONFLICT = "ConflictException"
ACCESS_DENIED = "AccessDeniedException"
MODEL_TIMEOUT = "ModelTimeoutException"
UNAVAILABLE = "ServiceUnavailableException"
MODEL_ERROR = "ModelErrorException"

# CreateModelInvocationJob refusals that clear up with time: back off and try again.
RETRYABLE_CREATE = frozenset({THROTTLING, QUOTA_EXCEEDED, INTERNAL})
# GetModelInvocationJob / ListModelInvocationJobs: a poll can always wait longer.
RETRYABLE_GET = frozenset({THROTTLING, INTERNAL})
# bedrock-runtime calls of the on-demand tail.
RETRYABLE_RUNTIME = frozenset({THROTTLING, UNAVAILABLE, MODEL_TIMEOUT, INTERNAL})
# Record errors that say nothing about the record itself: throttling, timeouts, server faults.
RETRYABLE_RECORD = frozenset(
    {"408", "424", "429", "500", "502", "503", "504"}
    | {THROTTLING, MODEL_TIMEOUT, INTERNAL, UNAVAILABLE, MODEL_ERROR}
)
# CloudWatch (GetMetricData / ListMetrics of AWS/Bedrock/Batch) throttles under its own names.
RETRYABLE_CLOUDWATCH = frozenset({"Throttling", THROTTLING, "TooManyRequestsException"})
