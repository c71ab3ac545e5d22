"""Least-privilege IAM policies, built from a RunLayout: the Bedrock service role and the runner.

The layout is the only code that knows a run's keys, so the policies ask it: the service role
may read the run's job inputs and write Bedrock's outputs, nothing else under S3; the runner may
read and write the run folder and the job prefix. A layout whose run segment is
``layout.ANY_RUN`` (``*``) stands for every run under an output (or staging) prefix.
"""

from __future__ import annotations

import re
from typing import Any

import boto3

from tasks.aws import storage
from tasks.aws.job_events import DEFAULT_QUEUE_NAME
from tasks.bedrock.model_ids import base_model_id
from tasks.errors import RunSettingsError
from tasks.run.layout import ANY_RUN, RunLayout
from tasks.settings import get_settings


def resolve_region(region: str | None = None) -> str:
    """The region for ARNs: the argument, BEDROCK_BATCH_REGION, or the AWS session's region."""
    found = region or get_settings().aws.region or boto3.session.Session().region_name
    if not found:
        msg = (
            "No AWS region for the policies' ARNs: pass --region, or set BEDROCK_BATCH_REGION "
            "or AWS_DEFAULT_REGION (or a region in your AWS profile)."
        )
        raise RunSettingsError(msg)
    return found


def region_partition(region: str) -> str:
    """The partition a region belongs to, from botocore's endpoint data; refused if unknown."""
    from botocore.exceptions import UnknownRegionError
    from botocore.session import get_session

    try:
        return get_session().get_partition_for_region(region)
    except UnknownRegionError:
        msg = f"--region {region!r} is not an AWS region botocore knows (e.g. us-east-1)."
        raise RunSettingsError(msg) from None


def partition_of(role_arn: str) -> str:
    """The AWS partition of an ARN: aws, aws-us-gov, aws-cn."""
    return role_arn.split(":")[1]


def in_partition(document: Any, partition: str) -> Any:
    """``document`` with the ARNs the policies write (``arn:aws:...``) in ``partition``.

    The policies are written for the aws partition; in GovCloud or China the same ARNs under
    arn:aws: match nothing. ARNs the user gave (the role, a KMS key) keep their own.
    """
    if partition == "aws":
        return document
    if isinstance(document, dict):
        return {k: in_partition(v, partition) for k, v in document.items()}
    if isinstance(document, list):
        return [in_partition(v, partition) for v in document]
    if isinstance(document, str) and document.startswith("arn:aws:"):
        return f"arn:{partition}:" + document.removeprefix("arn:aws:")
    return document


def _object_arn(uri: str) -> str:
    bucket, key = storage.split_s3(uri)
    return f"arn:aws:s3:::{bucket}/{key.rstrip('/')}/*" if key else f"arn:aws:s3:::{bucket}/*"


def _key(uri: str) -> str:
    return storage.split_s3(uri)[1]


def _source_object_arn(prefix: str) -> str:
    """Objects under a source prefix (a file's own key, or every key below a folder/glob)."""
    bucket, key = storage.split_s3(prefix)
    return f"arn:aws:s3:::{bucket}/{key}*"


def _bucket_arn(uri: str) -> str:
    return f"arn:aws:s3:::{storage.split_s3(uri)[0]}"


def _prefix_condition(uri: str) -> dict[str, Any]:
    key = storage.split_s3(uri)[1].rstrip("/")
    return {"StringLike": {"s3:prefix": [f"{key}/*", key]}} if key else {}


def _list_statement(sid: str, prefixes: list[str]) -> dict[str, Any]:
    """ListBucket on each bucket, limited to the given prefixes."""
    buckets = sorted({_bucket_arn(p) for p in prefixes})
    conditions = [_prefix_condition(p) for p in prefixes]
    keys = sorted({k for c in conditions for k in c.get("StringLike", {}).get("s3:prefix", [])})
    statement: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Action": ["s3:ListBucket"],
        "Resource": buckets,
    }
    if keys and all(conditions):
        statement["Condition"] = {"StringLike": {"s3:prefix": keys}}
    return statement


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
    layout: RunLayout, model_ids: list[str], region: str, account: str, kms_key_id: str | None
) -> dict[str, Any]:
    """What Bedrock needs during a job: read the inputs, write the outputs, use the models."""
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ReadJobInputs",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [_object_arn(layout.input_prefix)],
        },
        _list_statement("ListJobPrefix", [layout.job_prefix]),
        {
            "Sid": "WriteJobOutputs",
            "Effect": "Allow",
            "Action": ["s3:PutObject"],
            "Resource": [_object_arn(layout.bedrock_output_root)],
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


def _source_prefix(uri: str) -> str:
    """What a source reads: its key, or for a glob the folder its files are listed from."""
    uri = uri.split("?", 1)[0]
    literal = re.split(r"[*?\[]", uri, maxsplit=1)[0]
    return literal if literal == uri else literal.rsplit("/", 1)[0] + "/"


def runner_policy(
    layout: RunLayout,
    role_arn: str,
    model_ids: list[str],
    region: str,
    account: str,
    sources: list[str] | tuple[str, ...] = (),
    events_queue: str = DEFAULT_QUEUE_NAME,
) -> dict[str, Any]:
    """What the identity running the flows needs: jobs, PassRole, the run's S3 keys, metrics.

    The job events relay reads the queue `events setup` made (``events_queue``): it checks the
    queue with GetQueueAttributes, receives and deletes (tasks/aws/job_events.py).

    DeleteObject covers releasing the run's claim and ``restart`` moving a run aside.
    AbortMultipartUpload lets boto3 clean up an upload of a shard or part over its multipart
    threshold (8 MB) that failed: creating, uploading and completing the parts need only
    s3:PutObject, aborting needs its own action (S3 user guide, "Multipart upload API and
    permissions"; S3 API reference, AbortMultipartUpload, "Permissions").
    """
    # s3:// datasets the runs read (local and hf:// sources need no grant).
    source_prefixes = [_source_prefix(u) for u in sources if storage.is_s3(u)]
    read_sources = (
        [
            {
                "Sid": "ReadSources",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": sorted({_source_object_arn(p) for p in source_prefixes}),
            },
            {
                "Sid": "ListSources",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": sorted({_bucket_arn(p) for p in source_prefixes}),
                "Condition": {
                    "StringLike": {
                        "s3:prefix": sorted(
                            {k for p in source_prefixes for k in (_key(p), _key(p) + "*")}
                        )
                    }
                },
            },
        ]
        if source_prefixes
        else []
    )
    # The run, and where ``restart`` moves an earlier run of the same name.
    aside = layout.aside(ANY_RUN)
    candidates = [layout.job_prefix, layout.run_dir, aside.job_prefix, aside.run_dir]
    prefixes = [p for p in dict.fromkeys(candidates) if storage.is_s3(p)]
    if layout.kms_key_id:
        kms = [
            {
                "Sid": "EncryptRunFiles",
                "Effect": "Allow",
                "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                "Resource": [layout.kms_key_id],
            }
        ]
    else:
        kms = []
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
                # The cost estimate asks bedrock-runtime CountTokens for a sample of the run's
                # requests (tasks/pipeline/estimate.py); without the grant every run fell back
                # to the characters-per-token guess, "CountTokens unavailable: ... not
                # authorized".
                "Sid": "EstimateInputTokens",
                "Effect": "Allow",
                "Action": ["bedrock:CountTokens"],
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
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                ],
                "Resource": [_object_arn(p) for p in prefixes],
            },
            _list_statement("ListRunFiles", prefixes),
            {
                "Sid": "BatchMetrics",
                "Effect": "Allow",
                "Action": ["cloudwatch:GetMetricData", "cloudwatch:ListMetrics"],
                "Resource": "*",
            },
            {
                "Sid": "RelayJobEvents",
                "Effect": "Allow",
                "Action": ["sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:DeleteMessage"],
                "Resource": [f"arn:aws:sqs:{region}:{account}:{events_queue}"],
            },
            *read_sources,
            *kms,
        ],
    }
