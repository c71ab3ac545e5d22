"""`python -m emulator` prints the export lines, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_CLOUDWATCH",
    "AWS_ENDPOINT_URL_BEDROCK",
    "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}


def test_python_m_emulator_prints_exports_and_serves():
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--fast"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        exports = {}
        for line in process.stdout:  # blocks until the stack prints; ends if it dies
            assert line.startswith("export "), line
            key, value = line.removeprefix("export ").strip().split("=", 1)
            exports[key] = value
            if key == "BEDROCK_BATCH_POLL_INTERVAL_SECONDS":
                break
        assert set(exports) >= EXPECTED
        bedrock = boto3.client(
            "bedrock",
            endpoint_url=exports["AWS_ENDPOINT_URL_BEDROCK"],
            region_name=exports["AWS_DEFAULT_REGION"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        assert bedrock.list_model_invocation_jobs()["invocationJobSummaries"] == []
        s3 = boto3.client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL_S3"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        assert "bedrock-batch-demo" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0
