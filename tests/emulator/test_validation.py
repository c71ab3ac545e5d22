"""Create-time and validation-time errors: botocore exception class, Code and Message."""

from __future__ import annotations

import json

import pytest
from botocore.config import Config
from emu_helpers import HAIKU, anthropic_body, create_job, put_jsonl, records, unique, wait_for


def _raises(stack, exception: str, **kwargs):
    client = kwargs.pop("client", None) or stack.client("bedrock")
    with pytest.raises(getattr(client.exceptions, exception)) as err:
        create_job(stack, kwargs.pop("name", unique("bad")), client=client, **kwargs)
    assert err.value.response["Error"]["Code"] == exception
    return err.value.response["Error"]["Message"]


def _list_refused(client, **kwargs) -> str:
    """The message of the ValidationException ListModelInvocationJobs answers ``kwargs`` with."""
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.list_model_invocation_jobs(**kwargs)
    assert err.value.response["Error"]["Code"] == "ValidationException"
    return err.value.response["Error"]["Message"]


@pytest.fixture
def input_uri(stack):
    return put_jsonl(stack, f"in/{unique('valid')}.jsonl", records(100))


def test_create_model_invocation_job_bad_job_name(stack, input_uri):
    message = _raises(stack, "ValidationException", name="bad_name!", input_uri=input_uri)
    assert "Value 'bad_name!' at 'jobName'" in message and "regular expression" in message


def test_create_model_invocation_job_bad_role_arn(stack, input_uri):
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.create_model_invocation_job(
            jobName=unique("role"),
            roleArn="not-a-role",
            modelId=HAIKU,
            inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{stack.bucket}/out/"}},
        )
    assert "Value 'not-a-role' at 'roleArn'" in err.value.response["Error"]["Message"]


def test_create_model_invocation_job_unknown_model(stack, input_uri):
    message = _raises(stack, "ValidationException", input_uri=input_uri, model_id="acme.gpt-9")
    assert "'acme.gpt-9' is invalid or not supported for batch inference" in message


def test_create_model_invocation_job_unknown_model_names_the_closest_ids(stack, input_uri):
    typo = HAIKU.replace("haiku", "haikou")
    message = _raises(stack, "ValidationException", input_uri=input_uri, model_id=typo)
    assert f"'{typo}' is invalid" in message and "Closest supported model ids" in message
    assert HAIKU in message


def test_create_model_invocation_job_profile_only_model_with_a_plain_id(stack, input_uri):
    plain = "amazon.nova-premier-v1:0"
    message = _raises(stack, "ValidationException", input_uri=input_uri, model_id=plain)
    assert plain in message and "inference profile" in message


def test_create_model_invocation_job_timeout_above_168_hours(stack, input_uri):
    message = _raises(stack, "ValidationException", input_uri=input_uri, timeoutDurationInHours=200)
    assert message == (
        "1 validation error detected: Value 200 at 'timeoutDurationInHours' failed to satisfy "
        "constraint: Member must have value less than or equal to 168"
    )


def test_create_model_invocation_job_timeout_below_24_hours(stack, input_uri):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    message = _raises(
        stack, "ValidationException", client=client, input_uri=input_uri, timeoutDurationInHours=1
    )
    assert message == (
        "1 validation error detected: Value 1 at 'timeoutDurationInHours' failed to satisfy "
        "constraint: Member must have value greater than or equal to 24"
    )


def test_create_model_invocation_job_missing_input(stack):
    uri = f"s3://{stack.bucket}/in/{unique('nothing')}/"
    message = _raises(stack, "ValidationException", input_uri=uri)
    assert uri in message and ".jsonl" in message


def test_create_model_invocation_job_bad_s3_uri(stack):
    message = _raises(stack, "ValidationException", input_uri="https://example.com/in.jsonl")
    assert "'https://example.com/in.jsonl' at 'inputDataConfig.s3InputDataConfig.s3Uri'" in message


def test_create_model_invocation_job_converse_for_embedding_model(stack):
    uri = put_jsonl(
        stack, f"in/{unique('embconv')}.jsonl", records(100, body=lambda i: {"inputText": "x"})
    )
    message = _raises(
        stack,
        "ValidationException",
        input_uri=uri,
        model_id="amazon.titan-embed-text-v2:0",
        modelInvocationType="Converse",
    )
    assert "does not support the Converse invocation type" in message


def test_create_model_invocation_job_missing_required_member(stack, input_uri):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.create_model_invocation_job(
            jobName=unique("norole"),
            modelId=HAIKU,
            inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{stack.bucket}/out/"}},
        )
    assert "Value null at 'roleArn'" in err.value.response["Error"]["Message"]


def _failed_job(stack, name, rows=None, body=None):
    if body is not None:
        stack.client("s3").put_object(Bucket=stack.bucket, Key=f"in/{name}.jsonl", Body=body)
        uri = f"s3://{stack.bucket}/in/{name}.jsonl"
    else:
        uri = put_jsonl(stack, f"in/{name}.jsonl", rows)
    job = wait_for(stack, create_job(stack, name, uri))
    assert job["status"] == "Failed"
    assert stack.ledger(name)[0]["statusHistory"] == ["Submitted", "Validating", "Failed"]
    return job["message"]


def test_create_model_invocation_job_too_few_records_fails_in_validation(stack):
    message = _failed_job(stack, unique("few"), records(99))
    assert "99 records" in message and "minimum of 100" in message


def test_create_model_invocation_job_too_many_records_fails_in_validation(stack):
    stack.configure(max_records_per_job=120)
    message = _failed_job(stack, unique("many"), records(121))
    assert "121 records" in message and "maximum of 120" in message


def test_create_model_invocation_job_file_over_size_quota_fails_in_validation(stack):
    stack.configure(max_file_bytes=1000)
    message = _failed_job(stack, unique("bigfile"), records(100))
    assert "over the quota of 1000 bytes per file" in message


def test_create_model_invocation_job_job_over_size_quota_fails_in_validation(stack):
    stack.configure(max_job_bytes=1000)
    message = _failed_job(stack, unique("bigjob"), records(100))
    assert "over the quota of 1000 bytes per job" in message


def test_create_model_invocation_job_malformed_line_fails_in_validation(stack):
    lines = [f'{{"recordId": "r{i}", "modelInput": {{"prompt": "x"}}}}' for i in range(120)]
    lines[6] = "{not json"
    message = _failed_job(stack, unique("malformed"), body="\n".join(lines).encode())
    assert "Malformed input" in message and "line 7" in message


def test_create_model_invocation_job_line_without_model_input_fails_in_validation(stack):
    rows = records(100) + [{"recordId": "x", "body": anthropic_body(1)}]
    message = _failed_job(stack, unique("nomodelinput"), rows)
    assert "line 101 (no modelInput)" in message


def test_create_model_invocation_job_input_without_jsonl_extension_fails_in_validation(stack):
    name = unique("notjsonl")
    key = f"in/{name}.json"
    body = "\n".join(json.dumps(r) for r in records(100)).encode()
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=body)
    job = wait_for(stack, create_job(stack, name, f"s3://{stack.bucket}/{key}"))
    assert job["status"] == "Failed" and "processedRecordCount" not in job
    assert stack.ledger(name)[0]["statusHistory"] == ["Submitted", "Validating", "Failed"]
    assert job["message"].startswith(
        f"Input file s3://{stack.bucket}/{key} does not end in the extension .jsonl"
    )


@pytest.mark.parametrize(
    "model_input",
    ["a prompt", 42, [anthropic_body(1)], json.dumps(anthropic_body(1))],
    ids=["string", "number", "array", "twice-encoded"],
)
def test_create_model_invocation_job_model_input_not_an_object_fails_in_validation(
    stack, model_input
):
    rows = records(100)
    rows[41] = {"recordId": "r00041", "modelInput": model_input}
    message = _failed_job(stack, unique("notobject"), rows)
    assert "Malformed input: 1 line(s)" in message
    assert message.endswith("first at line 42 (modelInput is not a JSON object).")


def test_create_model_invocation_job_missing_output_bucket_fails_in_validation(stack):
    name = unique("nooutbucket")
    uri = put_jsonl(stack, f"in/{name}.jsonl", records(100))
    output = "s3://no-such-output-bucket/out/"
    job = wait_for(stack, create_job(stack, name, uri, output_uri=output))
    assert job["status"] == "Failed" and "processedRecordCount" not in job
    assert stack.ledger(name)[0]["statusHistory"] == ["Submitted", "Validating", "Failed"]
    assert job["message"] == (
        f"The output bucket no-such-output-bucket of {output} does not exist (NoSuchBucket). "
        "Create it, or give an s3OutputDataConfig.s3Uri in an existing bucket, and submit the "
        "job again"
    )


NAME_PATTERN = r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}"
ROLE_PATTERN = "arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+"


def test_create_model_invocation_job_several_bad_members_in_one_message(stack, input_uri):
    client = stack.client("bedrock")
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.create_model_invocation_job(
            jobName="bad_name!",
            roleArn="not-a-role",
            modelId=HAIKU,
            inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{stack.bucket}/out/"}},
            timeoutDurationInHours=200,
        )
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert err.value.response["Error"]["Message"] == (
        "3 validation errors detected: "
        "Value 'bad_name!' at 'jobName' failed to satisfy constraint: Member must satisfy "
        f"regular expression pattern: {NAME_PATTERN}; "
        "Value 'not-a-role' at 'roleArn' failed to satisfy constraint: Member must satisfy "
        f"regular expression pattern: {ROLE_PATTERN}; "
        "Value 200 at 'timeoutDurationInHours' failed to satisfy constraint: Member must have "
        "value less than or equal to 168"
    )


def test_create_model_invocation_job_missing_members_in_one_message(stack, input_uri):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    with pytest.raises(client.exceptions.ValidationException) as err:
        client.create_model_invocation_job(
            jobName=unique("nothing"),
            inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{stack.bucket}/out/"}},
        )
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert err.value.response["Error"]["Message"] == (
        "2 validation errors detected: "
        "Value null at 'roleArn' failed to satisfy constraint: Member must not be null; "
        "Value null at 'modelId' failed to satisfy constraint: Member must not be null"
    )


def test_create_model_invocation_job_job_name_over_63_characters(stack, input_uri):
    name = "a" * 64
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    message = _raises(stack, "ValidationException", client=client, name=name, input_uri=input_uri)
    assert message == (
        f"1 validation error detected: Value '{name}' at 'jobName' failed to satisfy "
        "constraint: Member must have length less than or equal to 63"
    )


def test_create_model_invocation_job_bad_tag_key(stack, input_uri):
    message = _raises(
        stack,
        "ValidationException",
        input_uri=input_uri,
        tags=[{"key": "team", "value": "ml"}, {"key": "cost#centre", "value": "42"}],
    )
    assert message == (
        "1 validation error detected: Value 'cost#centre' at 'tags.2.member.key' failed to "
        r"satisfy constraint: Member must satisfy regular expression pattern: "
        r"[a-zA-Z0-9\s._:/=+@-]*"
    )


def test_create_model_invocation_job_bad_invocation_type(stack, input_uri):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    message = _raises(
        stack,
        "ValidationException",
        client=client,
        input_uri=input_uri,
        modelInvocationType="Chat",
    )
    assert message == (
        "1 validation error detected: Value 'Chat' at 'modelInvocationType' failed to satisfy "
        "constraint: Member must satisfy enum value set: [InvokeModel, Converse]"
    )


def test_list_model_invocation_jobs_bad_status_and_sort_order_in_one_message(stack):
    client = stack.client("bedrock")
    assert _list_refused(client, statusEquals="Done", sortOrder="Sideways") == (
        "2 validation errors detected: "
        "Value 'Done' at 'statusEquals' failed to satisfy constraint: Member must satisfy enum "
        "value set: [Submitted, Validating, Scheduled, InProgress, Completed, "
        "PartiallyCompleted, Failed, Stopping, Stopped, Expired]; "
        "Value 'Sideways' at 'sortOrder' failed to satisfy constraint: Member must satisfy enum "
        "value set: [Ascending, Descending]"
    )


VPC_ID_CONSTRAINT = (
    "Member must satisfy constraint: [Member must have length less than or equal to 32, Member "
    "must have length greater than or equal to 0, Member must satisfy regular expression "
    "pattern: [-0-9a-zA-Z]+]"
)


def test_create_model_invocation_job_bad_vpc_config_ids(stack, input_uri):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    message = _raises(
        stack,
        "ValidationException",
        client=client,
        input_uri=input_uri,
        vpcConfig={
            "subnetIds": ["subnet-0abc", "subnet_1!"],
            "securityGroupIds": [f"sg-{i}" for i in range(6)],
        },
    )
    assert message == (
        "2 validation errors detected: "
        "Value '[subnet-0abc, subnet_1!]' at 'vpcConfig.subnetIds' failed to satisfy constraint: "
        f"{VPC_ID_CONSTRAINT}; "
        "Value '[sg-0, sg-1, sg-2, sg-3, sg-4, sg-5]' at 'vpcConfig.securityGroupIds' failed to "
        "satisfy constraint: Member must have length less than or equal to 5"
    )


def test_create_model_invocation_job_vpc_config_without_ids(stack, input_uri):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    message = _raises(
        stack,
        "ValidationException",
        client=client,
        input_uri=input_uri,
        vpcConfig={"subnetIds": []},
    )
    assert message == (
        "2 validation errors detected: "
        "Value '[]' at 'vpcConfig.subnetIds' failed to satisfy constraint: Member must have "
        "length greater than or equal to 1; "
        "Value null at 'vpcConfig.securityGroupIds' failed to satisfy constraint: Member must "
        "not be null"
    )


def test_create_model_invocation_job_vpc_config_id_over_32_characters(stack, input_uri):
    long_id = "subnet-" + "0" * 26
    message = _raises(
        stack,
        "ValidationException",
        input_uri=input_uri,
        vpcConfig={"subnetIds": [long_id], "securityGroupIds": ["sg-1"]},
    )
    assert message == (
        f"1 validation error detected: Value '[{long_id}]' at 'vpcConfig.subnetIds' failed to "
        f"satisfy constraint: {VPC_ID_CONSTRAINT}"
    )


def test_create_model_invocation_job_valid_vpc_config_is_kept(stack, input_uri):
    vpc = {"subnetIds": ["subnet-0abc123"], "securityGroupIds": ["sg-0def456"]}
    arn = create_job(stack, unique("vpc"), input_uri, vpcConfig=vpc)
    job = stack.client("bedrock").get_model_invocation_job(jobIdentifier=arn)
    assert job["vpcConfig"] == vpc


def test_list_model_invocation_jobs_bad_name_contains(stack):
    client = stack.client("bedrock")
    assert _list_refused(client, nameContains="run_1") == (
        "1 validation error detected: Value 'run_1' at 'nameContains' failed to satisfy "
        f"constraint: Member must satisfy regular expression pattern: {NAME_PATTERN}"
    )


def test_list_model_invocation_jobs_name_contains_over_63_characters(stack):
    client = stack.client("bedrock", config=Config(parameter_validation=False))
    name = "a" * 64
    assert _list_refused(client, nameContains=name) == (
        f"1 validation error detected: Value '{name}' at 'nameContains' failed to satisfy "
        "constraint: Member must have length less than or equal to 63"
    )


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=["LS", "PS", "NEL"])
def test_parse_input_splits_lines_at_newlines_only(separator):
    # JSON leaves U+2028, U+2029 and U+0085 unescaped inside strings (Polars' encoder writes
    # them raw) and JSON Lines separates records by "\n" only; str.splitlines() also cut there,
    # and a prompt holding one failed the whole job as malformed, where Bedrock answers it.
    from emulator.runner import parse_input

    body = {"messages": [{"role": "user", "content": f"one{separator}two"}]}
    line = json.dumps({"recordId": "R0000000000", "modelInput": body}, ensure_ascii=False)

    frame = parse_input((line + "\n").encode(), "s3://b/in.jsonl")

    assert frame["recordId"].to_list() == ["R0000000000"]
    assert json.loads(frame["modelInput"][0]) == body
