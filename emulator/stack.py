"""LocalStack: moto (S3, CloudWatch, EventBridge, SQS) plus the Bedrock emulator, as one unit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import boto3
from moto.server import ThreadedMotoServer

from . import moto_fixes
from .config import EmulatorConfig
from .server import EmulatorServer

ROLE_ARN = "arn:aws:iam::123456789012:role/BedrockBatchEmulatorRole"
DUMMY_CREDENTIAL = "testing"
ADMIN_USER = "local-stack-admin"
# moto authorizes every request after its first INITIAL_NO_AUTH_ACTION_COUNT ones; the
# bootstrap spends exactly these: CreateUser, PutUserPolicy, CreateAccessKey (the admin).
BOOTSTRAP_ACTIONS = 3
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
# moto's IAM switch is process-wide (moto.settings and a class-level request counter) and its
# backends are module globals, so an enforcing moto runs in a process of its own: nothing it
# enforces or creates reaches an in-process moto of another stack.
_MOTO_PROCESS = """
import logging, sys
from moto.server import ThreadedMotoServer
from emulator import moto_fixes
moto_fixes.apply()
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address=sys.argv[1], port=0, verbose=False)
server.start()
print("%s:%s" % server.get_host_and_port(), flush=True)
sys.stdin.read()
server.stop()
"""

log = logging.getLogger("emulator")


class LocalStack:
    """Start moto (S3, CloudWatch) and the emulator; `env` points boto3 and the flows at them.

    With ``enforce_iam=True`` moto authorizes every S3, CloudWatch, SNS, STS and IAM call against
    the caller's IAM policies (its ``INITIAL_NO_AUTH_ACTION_COUNT`` setting), in a moto process
    of its own. The stack's own clients and ``env`` then carry an all-allowing admin user's keys;
    ``create_user`` and ``create_role`` make narrower identities, and ``assume_job_role`` makes
    Bedrock jobs read and write S3 as a role, as Bedrock does. Until then jobs have no valid
    credentials at all. The Bedrock control plane (our emulator) evaluates no IAM policy.

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
        enforce_iam: bool = False,
    ):
        self.config = config or EmulatorConfig()
        self.enforce_iam = enforce_iam
        self._moto_process: subprocess.Popen | None = None
        self._credentials = (DUMMY_CREDENTIAL, DUMMY_CREDENTIAL)
        self.admin_arn = ""
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
        if self.enforce_iam:
            self.moto_url = self._start_enforcing_moto()
            self._bootstrap_admin()
        else:
            moto_fixes.apply()
            self._moto = ThreadedMotoServer(
                ip_address=self.host, port=self._moto_port, verbose=False
            )
            self._moto.start()
            host, port = self._moto.get_host_and_port()
            self.moto_url = f"http://{host}:{port}"
        self._emulator = EmulatorServer(
            self.config,
            s3_endpoint_url=self.moto_url,
            cloudwatch_endpoint_url=self.moto_url,
            events_endpoint_url=self.moto_url,
            region=self.region,
            host=self.host,
            port=self._port,
        ).start()
        self.bedrock_url = self._emulator.url
        if self.enforce_iam:
            # Bedrock publishes its own metrics and events; no policy of the user's is involved.
            self._emulator.metrics.cloudwatch = self.client("cloudwatch")
            self._emulator.events.client = self.client("events")
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
        if self._moto_process:
            self._moto_process.stdin.close()  # the process stops its server and exits
            try:
                self._moto_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._moto_process.kill()
                self._moto_process.wait()
            self._moto_process = None

    def _start_enforcing_moto(self) -> str:
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_ACTIONS)}
        if self._moto_port:
            msg = "enforce_iam runs moto in its own process on a free port; leave moto_port unset"
            raise ValueError(msg)
        self._moto_process = subprocess.Popen(
            [sys.executable, "-c", _MOTO_PROCESS, self.host],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        address = self._moto_process.stdout.readline().strip()
        if not address:
            self._moto_process.wait()
            msg = f"moto did not start (exit code {self._moto_process.returncode})"
            raise RuntimeError(msg)
        return f"http://{address}"

    def _bootstrap_admin(self) -> None:
        """Spend moto's unauthenticated actions on an admin user; every later call is checked."""
        iam = self.client("iam")
        self.admin_arn = iam.create_user(UserName=ADMIN_USER)["User"]["Arn"]
        iam.put_user_policy(
            UserName=ADMIN_USER, PolicyName="AllowAll", PolicyDocument=json.dumps(ALLOW_ALL)
        )
        key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
        self._credentials = (key["AccessKeyId"], key["SecretAccessKey"])

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
            # Bedrock's job state change events: moto's EventBridge routes them to SQS. botocore
            # reads EventBridge's endpoint from AWS_ENDPOINT_URL_EVENTBRIDGE (its serviceId;
            # botocore.utils.CLIENT_NAME_TO_HYPHENIZED_SERVICE_ID_OVERRIDES maps the "events"
            # client to it), not AWS_ENDPOINT_URL_EVENTS.
            "AWS_ENDPOINT_URL_EVENTBRIDGE": self.moto_url,
            "AWS_ENDPOINT_URL_SQS": self.moto_url,
            "AWS_ENDPOINT_URL_BEDROCK": self.bedrock_url,
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": self.bedrock_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self._credentials[0],
            "AWS_SECRET_ACCESS_KEY": self._credentials[1],
            "BEDROCK_BATCH_STAGING_URI": f"s3://{self.bucket}/staging",
            "BEDROCK_BATCH_ROLE_ARN": ROLE_ARN,
            "BEDROCK_BATCH_POLL_INTERVAL_SECONDS": "0.2",
        }

    def client(self, service: str, **kwargs):
        """A boto3 client for `service` pointed at the stack (bedrock, s3, cloudwatch, ...)."""
        urls = {"bedrock": self.bedrock_url, "bedrock-runtime": self.bedrock_url}
        kwargs.setdefault("endpoint_url", urls.get(service, self.moto_url))
        kwargs.setdefault("region_name", self.region)
        kwargs.setdefault("aws_access_key_id", self._credentials[0])
        kwargs.setdefault("aws_secret_access_key", self._credentials[1])
        return boto3.client(service, **kwargs)

    # -- IAM identities (enforce_iam) ----------------------------------------------------

    def create_user(self, name: str, policy: dict) -> dict[str, str]:
        """An IAM user with ``policy`` inline; its keys as AWS_ACCESS_KEY_ID / _SECRET_ env."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def create_role(self, name: str, policy: dict) -> str:
        """An IAM role with ``policy`` inline that the emulator may assume; returns its ARN.

        The trust policy names the stack's admin, which assumes roles for the emulator: moto
        checks a trust policy's AWS principals only (a Service principal such as
        bedrock.amazonaws.com is not evaluated), so `iam-policy`'s trust policy cannot be used.
        """
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": self.admin_arn},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        iam = self.client("iam")
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"][
            "Arn"
        ]
        iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
        return arn

    def assume_job_role(self, role_arn: str) -> None:
        """Bedrock jobs read inputs and write outputs as ``role_arn`` from now on (sts:AssumeRole).

        Bedrock assumes each job's roleArn; the emulator assumes one role for all its jobs, so
        a test names the role its jobs pass.
        """
        sts = self.client("sts")
        found = sts.assume_role(RoleArn=role_arn, RoleSessionName="bedrock-batch-emulator")
        credentials = found["Credentials"]
        self._emulator.state.use_s3_credentials(
            credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials["SessionToken"]
        )

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

    def api_calls(self) -> dict:
        """Bedrock calls so far by operation (calls, throttled, errors, per epoch second).

        Counted by the emulator since it started or since `reset_api_calls`; see
        emulator.responses.ApiCalls for the shape.
        """
        return self._admin("GET", "calls")

    def reset_api_calls(self) -> None:
        """Start counting Bedrock calls from zero."""
        self._admin("DELETE", "calls")

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
