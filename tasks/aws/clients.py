"""Every boto3 client and the S3 options for Polars, built in one place from settings."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from tasks.errors import RunSettingsError
from tasks.settings import get_settings

if TYPE_CHECKING:
    import boto3

# Connections each cached client keeps: one per thread that may call at once (a run's shard
# threads, flows.batch_inference.MAX_SHARDS_IN_FLIGHT). botocore's default of 10 made a run of
# 200 shards open and discard connections, with a urllib3 warning each time.
POOL_CONNECTIONS = 128
# Bedrock control-plane calls get no silent botocore retries: throttling and quota refusals must
# reach our own backoff, which logs them. S3 and CloudWatch keep botocore's standard retries.
_BEDROCK_ATTEMPTS = 1
_STANDARD_ATTEMPTS = 5
# botocore is imported when the first client is made, not with this module: the offline
# commands (preprocess, merge) import the run layout through here and never call AWS (~70 ms).


# A Prefect AwsCredentials block a run, the monitor or the CLI named; None: the standard chain.
_credentials_block: str | None = None


def use_credentials_block(name: str | None) -> None:
    """Build every client from the named Prefect ``AwsCredentials`` block (None: the default).

    Prefect users keep AWS access (profile, keys, region, client parameters) in such a block;
    without one, boto3's standard credential chain applies. AWS_ENDPOINT_URL_<SERVICE> variables
    point either at the local stack, since botocore reads them for any session.
    """
    global _credentials_block
    if name != _credentials_block:
        _credentials_block = name
        reset_clients()


def credentials_block() -> str | None:
    """The block named for this process: the one set by a run, else the setting."""
    return _credentials_block or get_settings().aws.aws_credentials_block


@lru_cache(maxsize=4)
def _block(name: str):
    from prefect_aws import AwsCredentials

    try:
        return AwsCredentials.load(name)
    except ValueError as exc:
        msg = (
            f"No AwsCredentials block named {name!r} on the Prefect server: create it in the UI "
            "(Blocks → AWS Credentials) or with AwsCredentials(...).save(name), or leave "
            f"aws_credentials_block / BEDROCK_BATCH_AWS_CREDENTIALS_BLOCK unset ({exc})."
        )
        raise RunSettingsError(msg) from None


def session() -> boto3.session.Session:
    """The boto3 session every client comes from: the credentials block's, or the default."""
    import boto3  # here, not above: commands that touch no AWS (merge, dry run) skip its import

    name = credentials_block()
    region = get_settings().aws.region
    if name:
        block = _block(name)
        if region and not block.region_name:
            block = block.model_copy(update={"region_name": region})
        return block.get_boto3_session()
    return boto3.session.Session(region_name=region)


def _build_client(service: str, block: str | None, region: str | None, endpoint: str | None):
    from botocore.config import Config

    attempts = _BEDROCK_ATTEMPTS if service == "bedrock" else _STANDARD_ATTEMPTS
    config = Config(
        retries={"mode": "standard", "max_attempts": attempts},
        read_timeout=60,
        max_pool_connections=POOL_CONNECTIONS,
    )
    overrides: dict = {}
    if block:
        overrides = _block(block).aws_client_parameters.get_params_override()
        overrides.pop("config", None)
    return session().client(service, config=config, **overrides)


# Clients by (service, credentials block, region, endpoint). A missing one is built under the
# lock, once: functools.lru_cache, used before, builds it in every thread that asks meanwhile,
# and a run's first wave of shards reaching their first create together built one each (400
# shards at gate 100, 2026-12-04: +22 s of CPU, +1 GB of peak RSS). Built ones are read
# without the lock, on every AWS call of every shard thread.
_clients: dict[tuple[str, str | None, str | None, str | None], Any] = {}
_building = threading.Lock()


def client(service: str):
    """A cached boto3 client; endpoints follow AWS_ENDPOINT_URL_<SERVICE> like any AWS tool."""
    from botocore.utils import CLIENT_NAME_TO_HYPHENIZED_SERVICE_ID_OVERRIDES

    region = get_settings().aws.region
    # The endpoint is part of the cache key so tests that restart the local stack get new clients.
    # botocore names the variable after the serviceId: "events" reads ..._EVENTBRIDGE.
    service_id = CLIENT_NAME_TO_HYPHENIZED_SERVICE_ID_OVERRIDES.get(service, service)
    env_name = "AWS_ENDPOINT_URL_" + service_id.upper().replace("-", "_")
    endpoint = os.environ.get(env_name) or os.environ.get("AWS_ENDPOINT_URL")
    key = (service, credentials_block(), region, endpoint)
    made = _clients.get(key)
    if made is None:
        with _building:
            made = _clients.get(key)
            if made is None:
                made = _clients[key] = _build_client(*key)
    return made


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError, else None (any other exception).

    Without botocore loaded no exception can be one, so this never imports it.
    """
    exceptions = sys.modules.get("botocore.exceptions")
    if exceptions is None or not isinstance(exc, exceptions.ClientError):
        return None
    return exc.response.get("Error", {}).get("Code")


def job_summaries(list_page: Callable[..., dict], **filters: Any) -> Iterator[dict[str, Any]]:
    """Every ListModelInvocationJobs summary for ``filters``, page after page by nextToken.

    ``list_page`` makes one call (the client's method, or one that counts or retries it):
    botocore's paginator for it cannot retry a single throttled page. A caller that stops
    reading asks for no further page.
    """
    token = None
    while True:
        page = list_page(**filters, **({"nextToken": token} if token else {}))
        yield from page.get("invocationJobSummaries", [])
        token = page.get("nextToken")
        if not token:
            return


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
    """Forget cached clients and blocks (after the environment changed)."""
    _clients.clear()
    _block.cache_clear()


def polars_storage_options() -> dict[str, str]:
    """Options for Polars' object store so `pl.scan_*("s3://...")` reaches the same S3 as boto3."""
    current = session()
    options: dict[str, str] = {}
    if current.region_name:
        options["aws_region"] = current.region_name
    credentials = current.get_credentials()
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
