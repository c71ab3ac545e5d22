"""Where a run's files go, and the settings errors raised before anything is spent."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tasks.errors import OutputUriError, RunSettingsError
from tasks.run.layout import expand_run_name, resolve_layout, resolve_role_arn
from tasks.settings import get_settings


@pytest.fixture
def settings_env(monkeypatch):
    """Set BEDROCK_BATCH_* variables for one test; settings are re-read around it."""
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_expand_run_name_fills_in_the_date():
    day = datetime(2026, 11, 21, 23, 0, tzinfo=timezone.utc)

    assert expand_run_name("nightly-{date}", today=day) == "nightly-20261121"


def test_expand_run_name_rejects_slashes_and_spaces():
    with pytest.raises(RunSettingsError, match="letters, digits"):
        expand_run_name("my run/1")


def test_resolve_layout_local_output_without_staging_names_the_setting(settings_env, tmp_path):
    settings_env.delenv("BEDROCK_BATCH_STAGING_URI", raising=False)

    with pytest.raises(RunSettingsError, match="BEDROCK_BATCH_STAGING_URI"):
        resolve_layout(str(tmp_path), "run-1")


def test_resolve_layout_rejects_other_schemes():
    with pytest.raises(OutputUriError, match="s3://<bucket>/<prefix> or a local folder"):
        resolve_layout("gs://bucket/runs", "run-1")


def test_resolve_layout_rejects_a_malformed_s3_uri():
    with pytest.raises(OutputUriError, match="not a valid S3 URI"):
        resolve_layout("s3://Bad_Bucket/runs", "run-1")


def test_resolve_role_arn_missing_names_setting_and_command(settings_env):
    settings_env.delenv("BEDROCK_BATCH_ROLE_ARN", raising=False)

    with pytest.raises(RunSettingsError, match="BEDROCK_BATCH_ROLE_ARN") as excinfo:
        resolve_role_arn(None)

    assert "bedrock-batch iam-policy" in str(excinfo.value)


@pytest.mark.parametrize("uri", ["s3:/my-bucket/runs", "S3:/b/p", "gs:/bucket"])
def test_an_output_uri_missing_a_slash_is_refused_before_it_becomes_a_folder(uri):
    from tasks.run.layout import check_output_uri_form

    with pytest.raises(OutputUriError, match="one slash after"):
        check_output_uri_form(uri)
    for fine in ("s3://my-bucket/runs", "out/runs", "C:/runs", "./s3/runs"):
        check_output_uri_form(fine)
