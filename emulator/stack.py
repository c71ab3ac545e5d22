"""LocalStack: moto's S3 and CloudWatch plus the Bedrock emulator, on localhost, as one unit."""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.parse
import urllib.request

import boto3
from moto.server import ThreadedMotoServer

from .config import EmulatorConfig
from .server import EmulatorServer

ROLE_ARN = "arn:aws:iam::123456789012:role/BedrockBatchEmulatorRole"
DUMMY_CREDENTIAL = "testing"

log = logging.getLogger("emulator")


class LocalStack:
    """Start moto (S3, CloudWatch) and the emulator; `env` points boto3 and the flows at them.

    Example:
        with LocalStack() as stack:
            os.environ.update(stack.env)
            boto3.client("bedrock").list_model_invocation_jobs()
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        port: int | None = None,
        moto_port: int | None = None,
        region: str = "us-east-1",
        bucket: str = "bedrock-batch-demo",
        host: str = "127.0.0.1",
    ):
        self.config = config or EmulatorConfig()
        self.region = region
        self.bucket = bucket
        self.host = host
        self._port = port or 0
        self._moto_port = moto_port or 0
        self._moto: ThreadedMotoServer | None = None
        self._emulator: EmulatorServer | None = None
        self.moto_url = ""
        self.bedrock_url = ""

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> LocalStack:
        """Start both servers and create the demo bucket."""
        # One access-log line per S3 call drowns the flow's own logs.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto = ThreadedMotoServer(ip_address=self.host, port=self._moto_port, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        self._emulator = EmulatorServer(
            self.config,
            s3_endpoint_url=self.moto_url,
            cloudwatch_endpoint_url=self.moto_url,
            region=self.region,
            host=self.host,
            port=self._port,
        ).start()
        self.bedrock_url = self._emulator.url
        s3 = self.client("s3")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=self.bucket)
        log.info("moto at %s, bedrock emulator at %s", self.moto_url, self.bedrock_url)
        return self

    def stop(self) -> None:
        """Stop both servers."""
        if self._emulator:
            self._emulator.stop()
            self._emulator = None
        if self._moto:
            self._moto.stop()
            self._moto = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- pointing clients at it ----------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto3, the AWS CLI and the project's flows at the stack."""
        return {
            "AWS_ENDPOINT_URL_S3": self.moto_url,
            "AWS_ENDPOINT_URL_CLOUDWATCH": self.moto_url,
            # moto serves SNS too: `bedrock-batch cloudwatch setup` creates its topic there.
            "AWS_ENDPOINT_URL_SNS": self.moto_url,
            "AWS_ENDPOINT_URL_BEDROCK": self.bedrock_url,
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": self.bedrock_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIAL,
            "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIAL,
            "BEDROCK_BATCH_STAGING_URI": f"s3://{self.bucket}/staging",
            "BEDROCK_BATCH_ROLE_ARN": ROLE_ARN,
            "BEDROCK_BATCH_POLL_INTERVAL_SECONDS": "0.2",
        }

    def client(self, service: str, **kwargs):
        """A boto3 client for `service` pointed at the stack (bedrock, s3, cloudwatch, ...)."""
        urls = {"bedrock": self.bedrock_url, "bedrock-runtime": self.bedrock_url}
        kwargs.setdefault("endpoint_url", urls.get(service, self.moto_url))
        kwargs.setdefault("region_name", self.region)
        kwargs.setdefault("aws_access_key_id", DUMMY_CREDENTIAL)
        kwargs.setdefault("aws_secret_access_key", DUMMY_CREDENTIAL)
        return boto3.client(service, **kwargs)

    # -- admin API (over HTTP, so it sees jobs created by any process) -------------------

    def _admin(self, method: str, path: str, payload: dict | None = None, query=None):
        url = f"{self.bedrock_url}/_emulator/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("message", str(exc))
            raise ValueError(detail) from None

    def ledger(self, name_contains: str | None = None) -> list[dict]:
        """Every job the emulator created, oldest first; idempotent repeats add nothing."""
        query = {"nameContains": name_contains} if name_contains else None
        return self._admin("GET", "ledger", query=query)

    def set_faults(self, **faults) -> None:
        """Change faults now (merged into the current ones); see emulator.faults.Faults."""
        self._admin("POST", "faults", faults)

    def configure(self, **config) -> None:
        """Change pace, throughput or quotas now; see emulator.config.EmulatorConfig."""
        self._admin("POST", "config", config)

    def reset_faults(self) -> None:
        """Faults and config back to the config the stack started with."""
        self._admin("POST", "reset", {})

    def current_config(self) -> dict:
        """The config and faults in force, as JSON."""
        return self._admin("GET", "config")
