"""EmulatorConfig from env, the status table, and the catalog's id handling (no HTTP)."""

from __future__ import annotations

import pytest

from emulator import TRANSITIONS, EmulatorConfig, JobStatus, base_model_id, lookup


def test_config_from_env_reads_settings_and_faults():
    config = EmulatorConfig.from_env(
        environ={
            "BEDROCK_EMULATOR_RECORDS_PER_SECOND": "25",
            "BEDROCK_EMULATOR_MAX_JOBS_PER_MODEL": "20",
            "BEDROCK_EMULATOR_FAULT_SEED": "9",
            "BEDROCK_EMULATOR_FAULT_STUCK_JOB_NAMES_CONTAINING": "shard-00003",
            "BEDROCK_EMULATOR_FAULT_RECORD_ERROR_MIX": '{"ThrottlingException": 1}',
        }
    )
    assert config.records_per_second == 25.0 and config.max_jobs_per_model == 20
    assert config.faults.seed == 9 and config.faults.stuck_job_names_containing == "shard-00003"
    assert config.faults.record_error_mix == {"ThrottlingException": 1}


def test_config_defaults_are_fast_and_demo_is_watchable():
    fast, demo = EmulatorConfig(), EmulatorConfig.demo()
    assert fast.status_step_seconds == 0 and fast.records_per_second is None
    assert demo.status_step_seconds > 0 and demo.records_per_second
    assert (fast.min_records_per_job, fast.max_records_per_job) == (100, 50_000)
    assert fast.max_jobs_per_model == 10


def test_config_updated_unknown_setting_lists_known_ones():
    with pytest.raises(ValueError, match="known settings"):
        EmulatorConfig().updated(warp_speed=True)


def test_status_transitions_end_in_final_statuses():
    final = {s for s in JobStatus if s.final}
    assert final == {
        JobStatus.COMPLETED,
        JobStatus.PARTIALLY_COMPLETED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
        JobStatus.EXPIRED,
    }
    assert TRANSITIONS[JobStatus.STOPPING] == {JobStatus.STOPPED}
    assert JobStatus.IN_PROGRESS not in TRANSITIONS[JobStatus.SUBMITTED]


def test_status_transitions_expired_only_from_scheduled():
    # Expired = scheduled but did not start before the timeout (botocore's status docs).
    assert [s for s in JobStatus if JobStatus.EXPIRED in TRANSITIONS[s]] == [JobStatus.SCHEDULED]
    assert JobStatus.PARTIALLY_COMPLETED in TRANSITIONS[JobStatus.IN_PROGRESS]


@pytest.mark.parametrize(
    "model_id",
    [
        "us.anthropic.claude-3-haiku-20240307-v1:0",
        "global.anthropic.claude-3-haiku-20240307-v1:0",
        "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0",
    ],
)
def test_catalog_lookup_accepts_profiles_and_arns(model_id):
    assert base_model_id(model_id) == "anthropic.claude-3-haiku-20240307-v1:0"
    assert lookup(model_id).family == "anthropic"
