"""The Bedrock facts the run relies on: the status table, retryable codes, ids and prefixes."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from tasks.aws.clients import retry_on_error_codes
from tasks.bedrock import error_codes
from tasks.bedrock.jobs import is_valid_job_name, job_id_from_arn
from tasks.bedrock.model_ids import base_model_id, profile_prefix
from tasks.bedrock.statuses import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    MERGEABLE_STATUSES,
    STATUS_OUTCOMES,
    outcome,
    retry_statuses,
)

# botocore's bedrock ModelInvocationJobStatus enum.
BOTOCORE_STATUSES = {
    "Submitted",
    "InProgress",
    "Completed",
    "Failed",
    "Stopping",
    "Stopped",
    "PartiallyCompleted",
    "Expired",
    "Validating",
    "Scheduled",
}


def test_status_table_covers_every_botocore_status():
    assert set(STATUS_OUTCOMES) == BOTOCORE_STATUSES


@pytest.mark.parametrize("status", sorted(FINAL_STATUSES))
def test_final_status_is_not_active(status):
    assert outcome(status).final and not outcome(status).active


@pytest.mark.parametrize("status", sorted(ACTIVE_STATUSES))
def test_in_flight_status_is_neither_mergeable_nor_retryable(status):
    o = outcome(status)
    assert not (o.final or o.mergeable or o.retryable or o.stopped)


def test_mergeable_statuses_are_completed_and_partially_completed():
    assert {"Completed", "PartiallyCompleted"} == MERGEABLE_STATUSES


@pytest.mark.parametrize(
    ("retry_stopped", "expected"),
    [(False, {"Failed", "Expired"}), (True, {"Failed", "Expired", "Stopped"})],
)
def test_retry_statuses_take_stopped_only_when_asked(retry_stopped, expected):
    assert retry_statuses(retry_stopped) == expected


def test_outcome_of_unknown_status_is_in_flight():
    assert not outcome(None).final and not outcome("Bogus").final


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "CreateModelInvocationJob")


class _State:
    def __init__(self, exc: Exception | None):
        self.exc = exc

    def result(self):
        if self.exc:
            raise self.exc
        return "ok"


@pytest.mark.parametrize("code", sorted(error_codes.RETRYABLE_CREATE))
def test_create_retry_condition_retries_throttling_and_quota(code):
    assert retry_on_error_codes(error_codes.RETRYABLE_CREATE)(
        None, None, _State(_client_error(code))
    )


@pytest.mark.parametrize("code", ["ValidationException", "AccessDeniedException"])
def test_create_retry_condition_does_not_retry_caller_mistakes(code):
    condition = retry_on_error_codes(error_codes.RETRYABLE_CREATE)
    assert not condition(None, None, _State(_client_error(code)))


def test_retry_condition_does_not_retry_non_aws_errors_or_success():
    condition = retry_on_error_codes(error_codes.RETRYABLE_CREATE)
    assert not condition(None, None, _State(ValueError("boom")))
    assert not condition(None, None, _State(None))


def test_retryable_record_errors_are_transient_http_statuses():
    assert {"429", "500", "503"} <= error_codes.RETRYABLE_RECORD
    assert "400" not in error_codes.RETRYABLE_RECORD


def test_job_id_from_arn_is_the_last_path_segment():
    arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdef123456"
    assert job_id_from_arn(arn) == "abcdef123456"
    assert job_id_from_arn("abcdef123456") == "abcdef123456"


@pytest.mark.parametrize(
    ("name", "ok"),
    [("run-shard-00001-a1", True), ("a" * 63, True), ("a" * 64, False), ("-run", False)],
)
def test_job_name_rules_follow_botocore_pattern(name, ok):
    assert is_valid_job_name(name) is ok


@pytest.mark.parametrize(
    ("model_id", "prefix", "base"),
    [
        (
            "us.anthropic.claude-3-haiku-20240307-v1:0",
            "us.",
            "anthropic.claude-3-haiku-20240307-v1:0",
        ),
        ("jp.anthropic.claude-sonnet-4-5-v1:0", "jp.", "anthropic.claude-sonnet-4-5-v1:0"),
        ("us-gov.meta.llama3-8b", "us-gov.", "meta.llama3-8b"),
        ("global.amazon.nova-2-lite-v1:0", "global.", "amazon.nova-2-lite-v1:0"),
        ("amazon.nova-lite-v1:0", None, "amazon.nova-lite-v1:0"),
        (
            "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-lite-v1:0",
            None,
            "amazon.nova-lite-v1:0",
        ),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.amazon.nova-lite-v1:0",
            "eu.",
            "amazon.nova-lite-v1:0",
        ),
    ],
)
def test_model_ids_strip_profile_prefixes_and_arns(model_id, prefix, base):
    assert profile_prefix(model_id) == prefix
    assert base_model_id(model_id) == base
