"""Request validation for the bedrock control plane, reported the way AWS reports it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .catalog import ModelSpec, resolve_batch_model
from .exceptions import ValidationException

# Constraints of CreateModelInvocationJob, ListModelInvocationJobs and the job identifier, as in
# botocore's bedrock service-2.json (botocore 1.44.5; VpcConfig and nameContains's
# ModelInvocationJobName read in 1.44.18). AWS anchors every pattern: fullmatch.
JOB_NAME_PATTERN = r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}"
ROLE_ARN_PATTERN = r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+"
TOKEN_PATTERN = r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}"
S3_URI_PATTERN = (
    r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?"
)
KMS_KEY_PATTERN = (
    r"(arn:aws(-[^:]+)?:kms:[a-zA-Z0-9-]*:[0-9]{12}:((key/[a-zA-Z0-9-]{36})|"
    r"(alias/[a-zA-Z0-9-_/]+)))|([a-zA-Z0-9-]{36})|(alias/[a-zA-Z0-9-_/]+)"
)
ACCOUNT_ID_PATTERN = r"[0-9]{12}"
TAG_PATTERN = r"[a-zA-Z0-9\s._:/=+@-]*"
# VpcConfig: subnetIds (SubnetIds, 1-16 of SubnetId) and securityGroupIds (SecurityGroupIds,
# 1-5 of SecurityGroupId), both required; each id a string of length 0-32 and this pattern.
VPC_ID_PATTERN = r"[-0-9a-zA-Z]+"
VPC_ID_MAX_LENGTH = 32
MAX_SUBNET_IDS, MAX_SECURITY_GROUP_IDS = 16, 5
JOB_IDENTIFIER_PATTERN = (
    r"((arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/)?[a-z0-9]{12})"
)
INVOCATION_TYPES = ("InvokeModel", "Converse")
INPUT_FORMATS = ("JSONL",)
SORT_ORDERS = ("Ascending", "Descending")
SORT_BY = ("CreationTime",)
MIN_TIMEOUT_HOURS, MAX_TIMEOUT_HOURS = 24, 168
MAX_TAGS = 200
MAX_LIST_RESULTS = 1000

_JOB_ID = re.compile(
    r"(arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/)?(?P<id>[a-z0-9]{12})"
)


def format_value(value: object) -> str:
    """A value as AWS quotes it in a validation message: 'text', 42 or null."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, list):
        # Lists the way AWS's (Java) messages print them: '[subnet-1, sg_2]'.
        return "'[" + ", ".join(str(item) for item in value) + "]'"
    return str(value)


def validation_exception(errors: Iterable[tuple[str, object, str]]) -> ValidationException:
    """One ValidationException for every (field, value, constraint), in AWS's wording.

    AWS reports all failing members at once: "2 validation errors detected: Value 'x' at
    'jobName' failed to satisfy constraint: ...; Value null at 'roleArn' failed to ...".
    """
    parts = [
        f"Value {format_value(value)} at '{name}' failed to satisfy constraint: {constraint}"
        for name, value, constraint in errors
    ]
    noun = "error" if len(parts) == 1 else "errors"
    msg = f"{len(parts)} validation {noun} detected: " + "; ".join(parts)
    return ValidationException(msg)


@dataclass
class FieldErrors:
    """Collects failing members of one request; `raise_if_any` reports them together."""

    errors: list[tuple[str, object, str]] = field(default_factory=list)

    def add(self, name: str, value: object, constraint: str) -> None:
        """Record one failed constraint."""
        self.errors.append((name, value, constraint))

    def required(self, name: str, value: object) -> bool:
        """Record a missing required member; True when the value is there."""
        if value is None:
            self.add(name, value, "Member must not be null")
            return False
        return True

    def string(
        self,
        name: str,
        value: object,
        *,
        min_length: int = 0,
        max_length: int | None = None,
        pattern: str | None = None,
    ) -> None:
        """Check a string member that is present (None is skipped: see `required`)."""
        if value is None:
            return
        if not isinstance(value, str):
            self.add(name, value, "Member must be a string")
            return
        if len(value) < min_length:
            self.add(name, value, f"Member must have length greater than or equal to {min_length}")
        if max_length is not None and len(value) > max_length:
            self.add(name, value, f"Member must have length less than or equal to {max_length}")
        if pattern is not None and not re.fullmatch(pattern, value):
            self.add(name, value, f"Member must satisfy regular expression pattern: {pattern}")

    def integer(self, name: str, value: object, *, minimum: int, maximum: int) -> None:
        """Check an integer member that is present."""
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(name, value, "Member must be an integer")
            return
        if value < minimum:
            self.add(name, value, f"Member must have value greater than or equal to {minimum}")
        if value > maximum:
            self.add(name, value, f"Member must have value less than or equal to {maximum}")

    def string_list(
        self,
        name: str,
        value: object,
        *,
        min_items: int,
        max_items: int,
        max_length: int,
        pattern: str,
        min_length: int = 0,
    ) -> None:
        """Check a list of strings that is present: its length, then its members as AWS does.

        A bad member is reported on the whole list with every constraint of the member shape,
        as in AWS's own messages (ACM RequestCertificate: "Value '[ccc]' at
        'subjectAlternativeNames' failed to satisfy constraint: Member must satisfy
        constraint: [Member must have length less than or equal to 253, Member must have
        length greater than or equal to 1, Member must satisfy regular expression pattern:
        ...]").
        """
        if value is None:
            return
        if not isinstance(value, list):
            self.add(name, value, "Member must be a list")
            return
        if len(value) < min_items:
            self.add(name, value, f"Member must have length greater than or equal to {min_items}")
        if len(value) > max_items:
            self.add(name, value, f"Member must have length less than or equal to {max_items}")
        if any(
            not isinstance(item, str)
            or not min_length <= len(item) <= max_length
            or not re.fullmatch(pattern, item)
            for item in value
        ):
            constraint = (
                f"Member must satisfy constraint: [Member must have length less than or equal "
                f"to {max_length}, Member must have length greater than or equal to "
                f"{min_length}, Member must satisfy regular expression pattern: {pattern}]"
            )
            self.add(name, value, constraint)

    def enum(self, name: str, value: object, allowed: Iterable[str]) -> None:
        """Check an enum member that is present."""
        allowed = list(allowed)
        if value is not None and value not in allowed:
            self.add(name, value, f"Member must satisfy enum value set: [{', '.join(allowed)}]")

    def raise_if_any(self) -> None:
        """Raise one ValidationException naming every failed member."""
        if self.errors:
            raise validation_exception(self.errors)


def validate_create_model_invocation_job(
    *,
    job_name: object,
    role_arn: object,
    model_id: object,
    input_data_config: object,
    output_data_config: object,
    client_request_token: object,
    timeout_duration_in_hours: object,
    tags: object,
    model_invocation_type: object,
    vpc_config: object = None,
) -> None:
    """Every member constraint of CreateModelInvocationJob, reported together."""
    errors = FieldErrors()
    for name, value in (
        ("jobName", job_name),
        ("roleArn", role_arn),
        ("modelId", model_id),
        ("inputDataConfig", input_data_config),
        ("outputDataConfig", output_data_config),
    ):
        errors.required(name, value)
    errors.string("jobName", job_name, min_length=1, max_length=63, pattern=JOB_NAME_PATTERN)
    errors.string("roleArn", role_arn, max_length=2048, pattern=ROLE_ARN_PATTERN)
    errors.string("modelId", model_id, min_length=1, max_length=2048)
    errors.string(
        "clientRequestToken",
        client_request_token,
        min_length=1,
        max_length=256,
        pattern=TOKEN_PATTERN,
    )
    _s3_config(errors, "inputDataConfig", "s3InputDataConfig", input_data_config)
    _s3_config(errors, "outputDataConfig", "s3OutputDataConfig", output_data_config)
    _vpc_config(errors, vpc_config)
    errors.integer(
        "timeoutDurationInHours",
        timeout_duration_in_hours,
        minimum=MIN_TIMEOUT_HOURS,
        maximum=MAX_TIMEOUT_HOURS,
    )
    _tags(errors, tags)
    errors.enum("modelInvocationType", model_invocation_type, INVOCATION_TYPES)
    errors.raise_if_any()


def model_for_batch(model_id: str, invocation_type: str, region: str) -> ModelSpec:
    """The catalog entry of a batch model supporting `invocation_type`; else ValidationException.

    Unknown ids and ids that cannot run batch in `region` (a profile-only model given a plain
    id, a plain Nova 1 id outside its Regions) are refused by the catalog's own rule.
    """
    spec = resolve_batch_model(model_id, region)
    if invocation_type == "Converse" and not spec.converse:
        msg = (
            f"Model {model_id} does not support the Converse invocation type; "
            "use modelInvocationType InvokeModel for embedding models"
        )
        raise ValidationException(msg)
    return spec


def _s3_config(errors: FieldErrors, name: str, member: str, config: object) -> None:
    if config is None:
        return
    inner = config.get(member) if isinstance(config, dict) else None
    if not isinstance(inner, dict):
        errors.add(f"{name}.{member}", inner, "Member must not be null")
        return
    path = f"{name}.{member}"
    uri = inner.get("s3Uri")
    if errors.required(f"{path}.s3Uri", uri):
        errors.string(f"{path}.s3Uri", uri, min_length=1, max_length=1024, pattern=S3_URI_PATTERN)
    if "s3InputFormat" in inner:
        errors.enum(f"{path}.s3InputFormat", inner["s3InputFormat"], INPUT_FORMATS)
    errors.string(
        f"{path}.s3EncryptionKeyId",
        inner.get("s3EncryptionKeyId"),
        min_length=1,
        max_length=2048,
        pattern=KMS_KEY_PATTERN,
    )
    errors.string(f"{path}.s3BucketOwner", inner.get("s3BucketOwner"), pattern=ACCOUNT_ID_PATTERN)


def _vpc_config(errors: FieldErrors, vpc_config: object) -> None:
    if vpc_config is None:
        return
    if not isinstance(vpc_config, dict):
        errors.add("vpcConfig", vpc_config, "Member must be a structure")
        return
    for member, max_items in (
        ("subnetIds", MAX_SUBNET_IDS),
        ("securityGroupIds", MAX_SECURITY_GROUP_IDS),
    ):
        path, value = f"vpcConfig.{member}", vpc_config.get(member)
        if errors.required(path, value):
            errors.string_list(
                path,
                value,
                min_items=1,
                max_items=max_items,
                max_length=VPC_ID_MAX_LENGTH,
                pattern=VPC_ID_PATTERN,
            )


def _tags(errors: FieldErrors, tags: object) -> None:
    if tags is None:
        return
    if not isinstance(tags, list):
        errors.add("tags", tags, "Member must be a list")
        return
    if len(tags) > MAX_TAGS:
        errors.add("tags", len(tags), f"Member must have length less than or equal to {MAX_TAGS}")
    for i, tag in enumerate(tags, start=1):
        tag = tag if isinstance(tag, dict) else {}
        key, value = tag.get("key"), tag.get("value")
        path = f"tags.{i}.member"
        if errors.required(f"{path}.key", key):
            errors.string(f"{path}.key", key, min_length=1, max_length=128, pattern=TAG_PATTERN)
        if errors.required(f"{path}.value", value):
            errors.string(f"{path}.value", value, max_length=256, pattern=TAG_PATTERN)


def job_id_from_identifier(identifier: object) -> str:
    """The 12-character job id of an ARN or id, or a ValidationException."""
    match = _JOB_ID.fullmatch(identifier) if isinstance(identifier, str) else None
    if match is None:
        errors = FieldErrors()
        errors.add(
            "jobIdentifier",
            identifier,
            f"Member must satisfy regular expression pattern: {JOB_IDENTIFIER_PATTERN}",
        )
        errors.raise_if_any()
    return match.group("id")


def validate_list_model_invocation_jobs(
    *,
    status_equals: object,
    statuses: Iterable[str],
    max_results: object,
    sort_by: object,
    sort_order: object,
    name_contains: object = None,
) -> None:
    """Every member constraint of ListModelInvocationJobs, reported together."""
    errors = FieldErrors()
    errors.enum("statusEquals", status_equals, statuses)
    # nameContains is a ModelInvocationJobName, with jobName's length and pattern.
    errors.string(
        "nameContains", name_contains, min_length=1, max_length=63, pattern=JOB_NAME_PATTERN
    )
    errors.integer("maxResults", max_results, minimum=1, maximum=MAX_LIST_RESULTS)
    errors.enum("sortBy", sort_by, SORT_BY)
    errors.enum("sortOrder", sort_order, SORT_ORDERS)
    errors.raise_if_any()


def parse_timestamp(name: str, raw: str | None) -> datetime | None:
    """An ISO 8601 query-string timestamp (botocore sends them so), or a ValidationException."""
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise validation_exception([(name, raw, "Member must be an ISO 8601 timestamp")]) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
