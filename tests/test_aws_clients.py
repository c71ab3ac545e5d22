"""AWS clients come from a Prefect AwsCredentials block when one is named, else the chain."""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import claude_jsonl, create_job
from prefect_aws import AwsCredentials

from tasks.aws import clients
from tasks.aws.clients import job_summaries
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


def test_a_run_names_its_credentials_block_as_a_parameter(stack, tmp_path, monkeypatch):
    """The flow builds its clients from the block the run names (region eu-west-3 here)."""
    import polars as pl

    from flows.batch_inference import batch_inference
    from tasks.run.params import BatchParams

    name = f"aws-run-{uuid.uuid4().hex[:8]}"
    AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).save(name)
    source = tmp_path / "topics.csv"
    pl.DataFrame({"topic": [f"t{i}" for i in range(120)]}).write_csv(source)
    clients.reset_clients()
    try:
        summary = batch_inference(
            BatchParams(
                source=str(source),
                prompt_id="joke_about_topic",
                model_id="anthropic.claude-3-haiku-20240307-v1:0",
                output_uri=str(tmp_path / "out"),
                run_name="block-param",
                aws_credentials_block=name,
            )
        )
        # The run's clients came from the block: it was loaded and is the process's choice.
        assert clients.credentials_block() == name
        assert clients._block.cache_info().currsize == 1
    finally:
        clients.use_credentials_block(None)
        clients.reset_clients()
    assert summary["counts"]["records"] == 120


def test_every_shard_thread_of_a_run_can_hold_a_connection_of_each_client(stack):
    # botocore keeps 10 connections by default: a run's threads beyond that opened and threw
    # away a connection per call, with a urllib3 warning each time.
    from flows.batch_inference import MAX_SHARDS_IN_FLIGHT

    for service in ("bedrock", "s3", "bedrock-runtime"):
        assert clients.client(service).meta.config.max_pool_connections >= MAX_SHARDS_IN_FLIGHT


def test_offline_commands_do_not_import_botocore():
    """preprocess and merge never call AWS, so their start-up does not pay for botocore."""
    import subprocess
    import sys

    code = (
        "import sys, flows.cli, tasks.pipeline.preprocess, tasks.pipeline.merge;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'boto3')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_run_against_a_prefect_server_does_not_import_prefects_own_server():
    """Prefect's server modules cost a CLI run ~2 s of CPU; only the temporary server needs
    them, so a run with PREFECT_API_URL set does not import them."""
    import subprocess
    import sys

    code = (
        "import sys, flows.cli; flows.cli.interruptible();"
        "print(sorted(m for m in sys.modules if m.startswith('prefect.server')))"
    )
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == "[]"


def test_error_code_reads_aws_refusals_only():
    from botocore.exceptions import ClientError

    refusal = ClientError({"Error": {"Code": "NoSuchKey", "Message": "x"}}, "GetObject")
    assert clients.error_code(refusal) == "NoSuchKey"
    assert clients.error_code(ValueError("not AWS")) is None


def test_job_summaries_reads_every_page_and_no_page_past_what_is_read(stack):
    # One paging loop serves the watcher, the gate's counts and find_job: every job of a
    # listing longer than a page, and a caller that stops early asks for no further page.
    name = f"paging-{uuid.uuid4().hex[:8]}"
    stack.client("s3").put_object(
        Bucket=stack.bucket, Key=f"in/{name}.jsonl", Body=claude_jsonl(100)
    )
    jobs = [
        create_job(stack, f"{name}-{i}", f"s3://{stack.bucket}/in/{name}.jsonl") for i in range(3)
    ]
    bedrock, calls = stack.client("bedrock"), []

    def list_page(**kwargs):
        calls.append(kwargs.get("nextToken"))
        return bedrock.list_model_invocation_jobs(**kwargs)

    listed = job_summaries(list_page, nameContains=name, maxResults=1, sortOrder="Ascending")
    assert [job["jobArn"] for job in listed] == jobs
    assert len(calls) >= 3 and calls[0] is None and all(calls[1:])
    calls.clear()
    first = next(job_summaries(list_page, nameContains=name, maxResults=1))
    assert first["jobArn"] == jobs[-1] and calls == [None]


def test_shards_that_first_need_a_client_at_once_build_it_once(stack, monkeypatch):
    # A run's first wave of shards reaching their first create together each built a Bedrock
    # client of their own (the cache computes a missing entry in every thread that asks for it):
    # 100 shards at gate 100 cost ~20 s more CPU and ~1 GB more peak RSS.
    clients.reset_clients()
    builds = []
    build = clients._build_client
    monkeypatch.setattr(clients, "_build_client", lambda *key: builds.append(key) or build(*key))
    start = threading.Barrier(16)

    def first_use() -> int:
        start.wait()
        return id(clients.client("bedrock"))

    with ThreadPoolExecutor(max_workers=16) as pool:
        built = {future.result() for future in [pool.submit(first_use) for _ in range(16)]}

    assert (len(built), len(builds)) == (1, 1)
    assert clients.client("bedrock") is clients.client("bedrock")
