"""AWS clients come from a Prefect AwsCredentials block when one is named, else the chain."""

from __future__ import annotations

import uuid

import pytest
from prefect_aws import AwsCredentials

from tasks.aws import clients
from tasks.errors import RunSettingsError
from tasks.settings import get_settings


@pytest.fixture
def named_block(monkeypatch):
    name = f"aws-test-{uuid.uuid4().hex[:8]}"
    AwsCredentials(
        aws_access_key_id="blockkey", aws_secret_access_key="blocksecret", region_name="eu-west-3"
    ).save(name)
    monkeypatch.setenv("BEDROCK_BATCH_AWS_CREDENTIALS_BLOCK", name)
    get_settings.cache_clear()
    clients.reset_clients()
    yield name
    monkeypatch.delenv("BEDROCK_BATCH_AWS_CREDENTIALS_BLOCK")
    get_settings.cache_clear()
    clients.use_credentials_block(None)
    clients.reset_clients()


def test_client_uses_the_credentials_block_named_in_settings(named_block):
    s3 = clients.client("s3")
    assert s3.meta.region_name == "eu-west-3"
    assert s3._request_signer._credentials.access_key == "blockkey"
    options = clients.polars_storage_options()
    assert options["aws_access_key_id"] == "blockkey"
    assert options["aws_region"] == "eu-west-3"


def test_client_follows_the_endpoint_variables_with_a_block(named_block, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    assert clients.client("s3").meta.endpoint_url == "http://127.0.0.1:9"


def test_unknown_credentials_block_names_the_fix(monkeypatch):
    clients.use_credentials_block("no-such-block-here")
    try:
        with pytest.raises(RunSettingsError, match="no-such-block-here.*AWS Credentials"):
            clients.client("s3")
    finally:
        clients.use_credentials_block(None)


def test_without_a_block_the_standard_chain_applies(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "chainkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chainsecret")
    clients.use_credentials_block(None)
    clients.reset_clients()
    assert clients.session().get_credentials().access_key == "chainkey"
