"""Every boto3 client and the S3 options for Polars, built in one place from settings."""

from __future__ import annotations

import os
from functools import lru_cache

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from tasks.settings import get_settings

# Bedrock control-plane calls get no silent botocore retries: throttling and quota refusals must
# reach our own backoff, which logs them. S3 and CloudWatch keep botocore's standard retries.
_NO_RETRY = Config(retries={"mode": "standard", "max_attempts": 1}, read_timeout=60)
_STANDARD = Config(retries={"mode": "standard", "max_attempts": 5}, read_timeout=60)


@lru_cache(maxsize=32)
def _client(service: str, region: str | None, endpoint: str | None):
    session = boto3.session.Session(region_name=region)
    config = _NO_RETRY if service == "bedrock" else _STANDARD
    return session.client(service, config=config)


def client(service: str):
    """A cached boto3 client; endpoints follow AWS_ENDPOINT_URL_<SERVICE> like any AWS tool."""
    region = get_settings().aws.region
    # The endpoint is part of the cache key so tests that restart the local stack get new clients.
    env_name = "AWS_ENDPOINT_URL_" + service.upper().replace("-", "_")
    return _client(service, region, os.environ.get(env_name) or os.environ.get("AWS_ENDPOINT_URL"))


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError, else None."""
    return exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None


def retry_on_error_codes(codes: frozenset[str] | set[str]):
    """A Prefect ``retry_condition_fn`` that retries only AWS errors with one of ``codes``."""

    def should_retry(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as exc:
            return error_code(exc) in codes
        return False

    return should_retry


def reset_clients() -> None:
    """Forget cached clients (after the environment changed)."""
    _client.cache_clear()


def polars_storage_options() -> dict[str, str]:
    """Options for Polars' object store so `pl.scan_*("s3://...")` reaches the same S3 as boto3."""
    session = boto3.session.Session(region_name=get_settings().aws.region)
    options: dict[str, str] = {}
    if session.region_name:
        options["aws_region"] = session.region_name
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        options["aws_access_key_id"] = frozen.access_key
        options["aws_secret_access_key"] = frozen.secret_key
        if frozen.token:
            options["aws_session_token"] = frozen.token
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint_url"] = endpoint
        options["aws_allow_http"] = "true"
        options["aws_virtual_hosted_style_request"] = "false"
    return options
