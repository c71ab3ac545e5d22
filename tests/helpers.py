"""Helpers shared by the tests: waiting on a condition with a deadline instead of sleeping,
Bedrock batch input written by hand, a job created straight on the local stack, how many
jobs Bedrock's own times say were in flight at once, whether each output row carries the
answer to its own prompt, a Prefect server of a test's own that it can stop and start, and
automations a test made removed after it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx
import polars as pl

from emulator.responders import quote
from prompt_templates import get_template
from tasks.pipeline.columns import ERROR_CODE, RECORD_ID, RESPONSE_TEXT

T = TypeVar("T")

# How long a test waits on work Prefect's server does after an event (an automation's action,
# an event made readable). A worker's test server can stop answering for ~60 s under load
# (SQLite's 60-s busy timeout inside it, seen in full suite runs beside other work), and waits
# of 20-30 s failed then; a working server answers in a second or two.
PREFECT_SERVER_WAIT = 90


def eventually(
    probe: Callable[[], T],
    *,
    timeout: float = PREFECT_SERVER_WAIT,
    interval: float = 0.2,
    what: str = "the condition",
    fail: bool = True,
) -> T:
    """Call ``probe`` until it returns something truthy and return that value.

    Servers (Prefect's event persister, the emulator, moto) make results visible a little after
    the call that caused them; tests wait for the result itself, bounded by ``timeout`` (by
    default the longest a stalled Prefect test server was seen to take). After
    the deadline the last value is returned when ``fail`` is False (the caller asserts on it),
    else the test fails naming ``what`` it waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            if fail:
                msg = f"{what} did not happen within {timeout:.0f} s (last value: {value!r})"
                raise AssertionError(msg)
            return value
        time.sleep(interval)


def claude_jsonl(count: int) -> bytes:
    """A Bedrock batch input of ``count`` Claude Messages records (ids r00000, r00001, ...)."""
    lines = [
        json.dumps(
            {
                "recordId": f"r{i:05d}",
                "modelInput": {
                    "anthropic_version": "bedrock-2023-05-31",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"Tell me a joke about topic {i}"}],
                },
            }
        )
        for i in range(count)
    ]
    return ("\n".join(lines) + "\n").encode()


HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def create_job(stack, name: str, input_uri: str, model_id: str = HAIKU, **kwargs) -> str:
    """CreateModelInvocationJob on the local stack with its role, output under out/<name>/
    (``output_uri``, ``client`` and any other request field can be given); the job's ARN."""
    client = kwargs.pop("client", None) or stack.client("bedrock")
    out = kwargs.pop("output_uri", f"s3://{stack.bucket}/out/{name}/")
    return client.create_model_invocation_job(
        jobName=name,
        roleArn=stack.env["BEDROCK_BATCH_ROLE_ARN"],
        modelId=model_id,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": out}},
        **kwargs,
    )["jobArn"]


def job_spans(stack, job_arns: Iterable[str]) -> list[tuple[datetime, datetime]]:
    """Each job's (submitTime, endTime), from Bedrock's own description of it."""
    bedrock = stack.client("bedrock")
    jobs = [bedrock.get_model_invocation_job(jobIdentifier=arn) for arn in job_arns]
    return [(job["submitTime"], job["endTime"]) for job in jobs]


def peak_in_flight(spans: list[tuple[datetime, datetime]]) -> int:
    """The most jobs between their submit and their end at one moment."""
    edges = [(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans]
    in_flight = peak = 0
    for _, step in sorted(edges):  # an end and a submit at the same instant: end first
        in_flight += step
        peak = max(peak, in_flight)
    return peak


def job_output_lines(stack, run_name: str) -> dict[str, dict]:
    """recordId -> the output line (modelInput echoed, modelOutput) the run's jobs wrote."""
    s3 = stack.client("s3")
    lines = {}
    for job in stack.ledger(name_contains=run_name):
        bucket, prefix = job["outputUri"].removeprefix("s3://").split("/", 1)
        base = f"{prefix.rstrip('/')}/{job['jobId']}/"
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix=base).get("Contents", []):
            if obj["Key"].endswith(".jsonl.out"):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
                for line in body.splitlines():
                    record = json.loads(line)
                    lines[record["recordId"]] = record
    return lines


def prompts_of(frame: pl.DataFrame, prompt_id: str) -> pl.Series:
    """Each row's user prompt, the template's text filled by Python's own ``str.format``."""
    text = get_template(prompt_id).text
    return pl.Series([text.format(**row) for row in frame.iter_rows(named=True)])


def assert_each_answer_quotes_its_prompt(
    answers: pl.Series, prompts: pl.Series, before: str = "Reply to: ", after: str = " | "
) -> None:
    """Each answer quotes the prompt of its own row, as the emulator quotes one.

    A text reply reads ``Reply to: <quote> | ...``; a structured answer's free strings end
    ``re: <quote>`` (``after=""``). The quotes must differ row to row, so that an answer
    that landed on another row cannot pass.
    """
    assert answers.len() == prompts.len()
    quotes = prompts.to_frame("prompt").select(quote(pl.col("prompt"))).to_series()
    assert quotes.n_unique() == quotes.len(), "the prompts' quotes do not tell the rows apart"
    expected = before + quotes + after
    found = (
        answers.str.ends_with(expected)
        if not after
        else answers.str.contains(expected, literal=True)
    )
    wrong = pl.DataFrame({"answer": answers, "expected": expected}).filter(~found.fill_null(False))
    assert wrong.is_empty(), wrong.head(3).rows()


def assert_answers_match_rows(frame: pl.DataFrame, rows: int) -> None:
    """Every row once, answered, and the answer to its own prompt (question_answering)."""
    assert frame.height == rows
    assert frame[RECORD_ID].n_unique() == rows
    assert frame[ERROR_CODE].null_count() == rows
    prompts = prompts_of(frame.select("source"), "question_answering")
    assert_each_answer_quotes_its_prompt(frame[RESPONSE_TEXT], prompts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One client for the helpers' calls to a server: httpx builds an SSL context (~20 ms of CPU)
# for every client, and `httpx.get` is a client a call, made every 0.2 s while a test waits.
# No kept connections: a restarted server must not meet one its old process dropped.
_HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


class PrefectServer:
    """`prefect server start` in a subprocess: own home, sqlite DB and port; in-memory leases.

    ``stop`` then ``start`` is a real restart on the same port: what a run sees when the
    server it talks to is redeployed (leases and in-flight events gone, the database kept).
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_URL": self.url,
            # Expired leases are freed within 2 s of expiring rather than Prefect's 15: tests
            # of a killed run's slots wait for the lease, not for the service's next pass.
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
        }
        env.pop("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", None)  # the default: in memory
        command = [str(Path(sys.executable).parent / "prefect"), "server", "start"]
        # Services stay on: the repossessor is what frees expired leases.
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        eventually(self._healthy, timeout=120, what="the Prefect server to answer")
        return time.monotonic()

    def _healthy(self) -> bool:
        assert self.process and self.process.poll() is None, "the Prefect server exited"
        try:
            return _HTTP.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def active_slots(self, name: str) -> int:
        response = _HTTP.get(f"{self.url}/v2/concurrency_limits/{name}", timeout=10)
        response.raise_for_status()
        return response.json()["active_slots"]


@contextlib.contextmanager
def automations_removed_after() -> Iterator[None]:
    """Delete the automations made inside, from the worker's Prefect server.

    Left behind, they acted on every later test's `bedrock.batch.run.finished` event; each of
    their actions builds a Prefect app inside the server's event loop, which then answered
    no request for up to a minute, and a test of a few seconds waited out the client's 60 s
    request timeout.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        before = {a.id for a in client.read_automations()}
    try:
        yield
    finally:
        with get_client(sync_client=True) as client:
            for automation in client.read_automations():
                if automation.id not in before:
                    client.delete_automation(automation.id)


def run_gate_of(output_uri: str, run_name: str) -> str:
    """The run's own gate: named by its name and key (its name, folder and incarnation)."""
    from tasks.aws.submit import run_key
    from tasks.run import gate
    from tasks.run.identity import read_identity
    from tasks.run.layout import layout_for

    layout = layout_for(output_uri, run_name)
    identity = read_identity(layout)
    assert identity is not None, f"no run.json in {layout.run_dir}"
    key = run_key(run_name, layout.run_dir, identity.run_id)
    return gate.run_gate_name(gate.gate_run(run_name, key))


def graded_source(tmp_path: Path, rows: int) -> Path:
    """`grade_answer` input: SimpleCoT rows with an answer to grade, as a Parquet file."""
    from data.make_samples import simplecot

    source = tmp_path / "graded.parquet"
    simplecot(rows).with_columns(pl.lit("Answer: B").alias("answer_response_text")).write_parquet(
        source
    )
    return source
