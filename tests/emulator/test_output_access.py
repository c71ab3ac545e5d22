"""A service role that may not write the output location fails its job in Validating.

The stack's moto enforces IAM (a moto process of its own), so the job's S3 calls are authorized
against the role's policy, as Bedrock's are against the job's roleArn.
"""

from __future__ import annotations

import pytest
from emu_helpers import HAIKU, put_jsonl, records, unique, wait_for

from emulator.stack import LocalStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def iam_stack():
    """A local stack of its own whose moto enforces IAM; the session's stack is untouched."""
    with LocalStack(enforce_iam=True) as stack:
        yield stack


def _read_only_role(stack, name: str) -> str:
    """A role that may read and list the stack's bucket but write nothing."""
    bucket = f"arn:aws:s3:::{stack.bucket}"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{bucket}/*"]},
            # moto authorizes HeadBucket as s3:HeadBucket; AWS as s3:ListBucket.
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:HeadBucket"],
                "Resource": [bucket],
            },
        ],
    }
    return stack.create_role(name, policy)


def test_create_model_invocation_job_role_may_not_write_output_fails_in_validation(iam_stack):
    name = unique("nowrite")
    role_arn = _read_only_role(iam_stack, f"{name}-role")
    iam_stack.assume_job_role(role_arn)
    uri = put_jsonl(iam_stack, f"in/{name}.jsonl", records(100))
    output = f"s3://{iam_stack.bucket}/out/{name}/"
    arn = iam_stack.client("bedrock").create_model_invocation_job(
        jobName=name,
        roleArn=role_arn,
        modelId=HAIKU,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": uri}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": output}},
    )["jobArn"]
    job = wait_for(iam_stack, arn)
    assert job["status"] == "Failed" and "processedRecordCount" not in job
    assert iam_stack.ledger(name)[0]["statusHistory"] == ["Submitted", "Validating", "Failed"]
    assert job["message"] == (
        f"AccessDenied: the service role {role_arn} may not write the job's outputs under "
        f"{output} in bucket {iam_stack.bucket} (s3:PutObject). Allow it in the role's policy "
        "(`bedrock-batch iam-policy` prints one) and submit the job again"
    )
