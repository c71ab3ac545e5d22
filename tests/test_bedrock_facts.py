"""The Bedrock facts the run relies on: the status table, retryable codes, ids and prefixes."""

from __future__ import annotations

import logging

import pytest
from botocore.exceptions import ClientError

from tasks.aws import submit
from tasks.aws.submit import JobRequest
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


class _Bedrock:
    """CreateModelInvocationJob refusing with ``errors`` in turn, then creating the job."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.calls = 0

    def create_model_invocation_job(self, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {
            "jobArn": f"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/{self.calls}"
        }


_REQUEST = JobRequest(
    "j", "t", "anthropic.claude-3-haiku-20240307-v1:0", "r", "s3://b/i", "s3://b/o"
)
_LOG = logging.getLogger("test.create")


@pytest.fixture
def bedrock(monkeypatch):
    def install(*errors):
        fake = _Bedrock(*errors)
        monkeypatch.setattr(submit, "client", lambda service: fake)
        monkeypatch.setattr(submit.time, "sleep", lambda seconds: None)
        return fake

    return install


@pytest.mark.parametrize("code", sorted(error_codes.RETRYABLE_CREATE))
def test_create_waits_out_throttling_and_a_full_quota(bedrock, caplog, code):
    fake = bedrock(_client_error(code), _client_error(code))
    with caplog.at_level(logging.WARNING, logger="test.create"):
        arn = submit.create_job(_REQUEST, [1.0, 2.0, 4.0], _LOG)
    assert arn.endswith("/3") and fake.calls == 3
    assert [code in r.getMessage() for r in caplog.records] == [True, True]


@pytest.mark.parametrize("code", ["ValidationException", "AccessDeniedException"])
def test_create_does_not_retry_caller_mistakes(bedrock, code):
    fake = bedrock(_client_error(code))
    with pytest.raises(ClientError, match=code):
        submit.create_job(_REQUEST, [1.0, 2.0], _LOG)
    assert fake.calls == 1


def test_create_gives_up_when_the_backoff_is_spent_and_never_retries_other_errors(bedrock):
    fake = bedrock(*[_client_error("ThrottlingException")] * 3)
    with pytest.raises(ClientError, match="ThrottlingException"):
        submit.create_job(_REQUEST, [1.0, 2.0], _LOG)
    assert fake.calls == 3
    fake = bedrock(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        submit.create_job(_REQUEST, [1.0], _LOG)
    assert fake.calls == 1


def test_create_waits_out_a_full_quota_while_jobs_hold_it_past_the_backoff(bedrock):
    """A quota held by jobs of hours (others' too) outlasts any fixed backoff: wait for them."""
    fake = bedrock(*[_client_error(error_codes.QUOTA_EXCEEDED)] * 6)
    asked = []

    arn = submit.create_job(_REQUEST, [1.0, 2.0], _LOG, lambda: asked.append(1) or True)

    assert arn.endswith("/7") and fake.calls == 7
    assert len(asked) == 4  # asked only once the backoff was spent


def test_create_gives_up_on_a_full_quota_that_no_job_holds(bedrock):
    fake = bedrock(*[_client_error(error_codes.QUOTA_EXCEEDED)] * 6)
    with pytest.raises(ClientError, match=error_codes.QUOTA_EXCEEDED):
        submit.create_job(_REQUEST, [1.0, 2.0], _LOG, lambda: False)
    assert fake.calls == 3


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
