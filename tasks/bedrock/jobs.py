"""Batch job identifiers: the jobName rules and the job id inside a job ARN.

From botocore's bedrock service model: jobName is 1-63 characters matching
``[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\\+\\-\\.]){0,63}``; a job ARN is
``arn:aws:bedrock:<region>:<account>:model-invocation-job/<12-character id>``, and the id is
the folder Bedrock writes the job's outputs under.
"""

from __future__ import annotations

import re

JOB_NAME_MAX_LENGTH = 63
JOB_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}$")


def job_id_from_arn(job_arn: str) -> str:
    """The job id: the last path segment of a model-invocation-job ARN (or the id itself)."""
    return job_arn.rsplit("/", 1)[-1]


def is_valid_job_name(name: str) -> bool:
    """Whether Bedrock accepts ``name`` as a jobName."""
    return len(name) <= JOB_NAME_MAX_LENGTH and bool(JOB_NAME_PATTERN.match(name))
