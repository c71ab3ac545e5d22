"""Least-privilege IAM policies: the Bedrock service role and the identity that runs the flows."""

from __future__ import annotations

from typing import Any

from tasks.aws import storage
from tasks.bedrock.model_ids import base_model_id


def _object_arn(uri: str) -> str:
    bucket, key = storage.split_s3(uri)
    return f"arn:aws:s3:::{bucket}/{key.rstrip('/')}/*" if key else f"arn:aws:s3:::{bucket}/*"


def _bucket_arn(uri: str) -> str:
    return f"arn:aws:s3:::{storage.split_s3(uri)[0]}"


def _prefix_condition(uri: str) -> dict[str, Any]:
    key = storage.split_s3(uri)[1].rstrip("/")
    return {"StringLike": {"s3:prefix": [f"{key}/*", key]}} if key else {}


def _model_arns(model_ids: list[str], region: str, account: str) -> list[str]:
    """Foundation models, and inference profiles for ids with a geography prefix."""
    arns = []
    for model_id in model_ids:
        base = base_model_id(model_id)
        arns.append(f"arn:aws:bedrock:*::foundation-model/{base}")
        if base != model_id:
            arns.append(f"arn:aws:bedrock:{region}:{account}:inference-profile/{model_id}")
    return arns


def service_role_trust_policy(account: str) -> dict[str, Any]:
    """Who may assume the service role: Bedrock, for batch jobs of this account only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "bedrock.amazonaws.com"},
                "Action": "sts:AssumeRole",
                "Condition": {
                    "StringEquals": {"aws:SourceAccount": account},
                    "ArnEquals": {
                        "aws:SourceArn": f"arn:aws:bedrock:*:{account}:model-invocation-job/*"
                    },
                },
            }
        ],
    }


def service_role_policy(
    job_prefix: str, model_ids: list[str], region: str, account: str, kms_key_id: str | None
) -> dict[str, Any]:
    """What Bedrock needs during a job: read the inputs, write the outputs, use the models."""
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ReadJobInputs",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [_object_arn(storage.join(job_prefix, "input"))],
        },
        {
            "Sid": "ListJobPrefix",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [_bucket_arn(job_prefix)],
            **(
                {"Condition": _prefix_condition(job_prefix)}
                if _prefix_condition(job_prefix)
                else {}
            ),
        },
        {
            "Sid": "WriteJobOutputs",
            "Effect": "Allow",
            "Action": ["s3:PutObject"],
            "Resource": [_object_arn(job_prefix)],
        },
        {
            "Sid": "InvokeChosenModels",
            "Effect": "Allow",
            "Action": ["bedrock:InvokeModel"],
            "Resource": _model_arns(model_ids, region, account),
        },
    ]
    if kms_key_id:
        statements.append(
            {
                "Sid": "EncryptOutputs",
                "Effect": "Allow",
                "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                "Resource": [kms_key_id],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def runner_policy(
    job_prefix: str,
    output_uri: str | None,
    role_arn: str,
    model_ids: list[str],
    region: str,
    account: str,
) -> dict[str, Any]:
    """What the identity running the flows needs: jobs, PassRole, its S3 prefixes, metrics."""
    prefixes = [job_prefix] + ([output_uri] if output_uri and storage.is_s3(output_uri) else [])
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "BatchJobs",
                "Effect": "Allow",
                "Action": [
                    "bedrock:CreateModelInvocationJob",
                    "bedrock:GetModelInvocationJob",
                    "bedrock:ListModelInvocationJobs",
                    "bedrock:StopModelInvocationJob",
                    "bedrock:TagResource",
                ],
                "Resource": "*",
            },
            {
                "Sid": "OnDemandRemainders",
                "Effect": "Allow",
                "Action": ["bedrock:InvokeModel"],
                "Resource": _model_arns(model_ids, region, account),
            },
            {
                "Sid": "PassServiceRole",
                "Effect": "Allow",
                "Action": ["iam:PassRole"],
                "Resource": [role_arn],
                "Condition": {"StringEquals": {"iam:PassedToService": "bedrock.amazonaws.com"}},
            },
            {
                "Sid": "RunFiles",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": [_object_arn(p) for p in prefixes],
            },
            {
                "Sid": "ListRunFiles",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": sorted({_bucket_arn(p) for p in prefixes}),
            },
            {
                "Sid": "BatchMetrics",
                "Effect": "Allow",
                "Action": ["cloudwatch:GetMetricData", "cloudwatch:ListMetrics"],
                "Resource": "*",
            },
        ],
    }
