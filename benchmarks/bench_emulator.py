"""Benchmark: records per second of the emulator's job runner at full speed.

Settings come from the environment (BENCH_EMULATOR_ prefix):
  BENCH_EMULATOR_RECORDS   records per job (default 50000, the Bedrock per-job maximum)
  BENCH_EMULATOR_MODEL     model id (default anthropic.claude-3-haiku-20240307-v1:0)
  BENCH_EMULATOR_CSV       results file (default benchmarks/results/bench_emulator.csv)

  BENCH_EMULATOR_PACED_JOBS  paced jobs created side by side (default 20)

Three figures: the runner alone (parse JSONL, answer every record, format output lines), a
whole job end to end through the local stack (S3 read, Submitted → Completed, S3 write), and
how long paced jobs created together last (2,000 records at a 6.5 s pace each, as in the
orchestration benchmark's refill scenario): each should last its pace, since the emulator's own
work runs inside it, also when the jobs end, and write their outputs, side by side.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from botocore.config import Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_orchestration import DEFAULTS  # noqa: E402
from emulator import EmulatorConfig, LocalStack, lookup  # noqa: E402
from emulator.faults import Faults  # noqa: E402
from emulator.runner import answer, parse_input  # noqa: E402
from tasks.bedrock.statuses import FINAL_STATUSES  # noqa: E402

RECORDS = int(os.environ.get("BENCH_EMULATOR_RECORDS", "50000"))
MODEL = os.environ.get("BENCH_EMULATOR_MODEL", "anthropic.claude-3-haiku-20240307-v1:0")
PACED_JOBS = int(os.environ.get("BENCH_EMULATOR_PACED_JOBS", "20"))
# The orchestration benchmark's refill jobs, whose service time this scenario checks.
PACED_RECORDS = DEFAULTS["refill"]["records_per_job"]
PACE_SECONDS = DEFAULTS["refill"]["pace_seconds"]
CSV_PATH = Path(
    os.environ.get("BENCH_EMULATOR_CSV", ROOT / "benchmarks" / "results" / "bench_emulator.csv")
)


def make_input(n: int, model_id: str) -> bytes:
    """A JSONL job input of `n` records shaped for the model's family."""
    family = lookup(model_id).family
    bodies = {
        "anthropic": lambda i: {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": f"Explain step by step: what is {i} + {i}?"}],
        },
        "nova": lambda i: {"messages": [{"role": "user", "content": [{"text": f"q {i}"}]}]},
        "titan-embed": lambda i: {"inputText": f"document number {i}", "dimensions": 256},
        "cohere-embed": lambda i: {"texts": [f"document {i}"], "input_type": "search_document"},
        "llama": lambda i: {"prompt": f"question {i}", "max_gen_len": 256},
        "mistral": lambda i: {"prompt": f"question {i}", "max_tokens": 256},
    }[family]
    lines = (json.dumps({"recordId": f"r{i:08d}", "modelInput": bodies(i)}) for i in range(n))
    return ("\n".join(lines) + "\n").encode()


def bench_runner(data: bytes) -> float:
    """Seconds for parse + answer + output lines of one file, in process."""
    spec = lookup(MODEL)
    start = time.perf_counter()
    frame = parse_input(data, "bench.jsonl")
    results = answer([("bench.jsonl", frame)], spec, "InvokeModel", Faults(), "bench", 0)
    body = results.frame["line"].str.join("\n").item()
    elapsed = time.perf_counter() - start
    assert results.total == RECORDS and body
    return elapsed


def _create_job(bedrock, stack, name: str, input_key: str, output_prefix: str) -> str:
    """CreateModelInvocationJob on s3://<stack bucket>/<input_key>; its ARN."""
    return bedrock.create_model_invocation_job(
        jobName=name,
        roleArn=stack.env["BEDROCK_BATCH_ROLE_ARN"],
        modelId=MODEL,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": f"s3://{stack.bucket}/{input_key}"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{stack.bucket}/{output_prefix}"}},
    )["jobArn"]


def _completed(bedrock, arns: list[str], deadline: float, interval: float) -> list[dict]:
    """GetModelInvocationJob of each job until all are final; each must have Completed."""
    ended: dict[str, dict] = {}
    while True:
        for arn in arns:
            if arn not in ended:
                job = bedrock.get_model_invocation_job(jobIdentifier=arn)
                if job["status"] in FINAL_STATUSES:
                    ended[arn] = job
        if len(ended) == len(arns):
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(arns) - len(ended)} jobs still running")
        time.sleep(interval)
    assert all(job["status"] == "Completed" for job in ended.values()), ended
    return [ended[arn] for arn in arns]


def bench_end_to_end(data: bytes) -> float:
    """Seconds from CreateModelInvocationJob to Completed through the local stack."""
    with LocalStack() as stack:
        stack.configure(max_records_per_job=max(RECORDS, 50_000))
        s3, bedrock = stack.client("s3"), stack.client("bedrock")
        s3.put_object(Bucket=stack.bucket, Key="bench/input.jsonl", Body=data)
        start = time.perf_counter()
        arn = _create_job(bedrock, stack, "bench", "bench/input.jsonl", "bench/out/")
        _completed(bedrock, [arn], start + 600, 0.05)
        return time.perf_counter() - start


def bench_paced_together(jobs: int) -> list[float]:
    """Each job's endTime - submitTime, for ``jobs`` paced jobs created side by side."""
    config = EmulatorConfig(
        records_per_second=PACED_RECORDS / PACE_SECONDS, max_jobs_per_model=max(jobs, 1)
    )
    data = make_input(PACED_RECORDS, MODEL)
    with LocalStack(config) as stack:
        s3 = stack.client("s3")
        bedrock = stack.client("bedrock", config=Config(max_pool_connections=max(jobs, 10)))
        for i in range(jobs):
            s3.put_object(Bucket=stack.bucket, Key=f"paced/{i}.jsonl", Body=data)
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            arns = list(
                pool.map(
                    lambda i: _create_job(
                        bedrock, stack, f"paced-{i}", f"paced/{i}.jsonl", f"paced-out/{i}/"
                    ),
                    range(jobs),
                )
            )
        ended = _completed(bedrock, arns, time.perf_counter() + 10 * PACE_SECONDS + 60, 0.1)
        return [(job["endTime"] - job["submitTime"]).total_seconds() for job in ended]


def main() -> None:
    data = make_input(RECORDS, MODEL)
    runner_s = bench_runner(data)
    e2e_s = bench_end_to_end(data)
    paced = bench_paced_together(PACED_JOBS)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("runner", RECORDS, runner_s),
        ("end_to_end", RECORDS, e2e_s),
        (f"paced_{PACED_JOBS}_together", PACED_RECORDS, sum(paced) / len(paced)),
    ]
    for scenario, records, seconds in rows[:2]:
        print(
            f"{scenario:>10}: {records} records of {MODEL} in {seconds:.2f} s "
            f"= {records / seconds:,.0f} records/s"
        )
    print(
        f"     paced: {PACED_JOBS} jobs of {PACED_RECORDS} records created together at a "
        f"{PACE_SECONDS} s pace lasted min {min(paced):.3f} / mean {rows[2][2]:.3f} / "
        f"max {max(paced):.3f} s (endTime - submitTime)"
    )
    print(f"peak RSS {peak_mb:.0f} MB")
    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV_PATH.exists()
    with CSV_PATH.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(
                [
                    "timestamp",
                    "scenario",
                    "model",
                    "records",
                    "seconds",
                    "records_per_s",
                    "peak_rss_mb",
                    "python",
                    "machine",
                ]
            )
        for scenario, records, seconds in rows:
            writer.writerow(
                [
                    datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    scenario,
                    MODEL,
                    records,
                    f"{seconds:.3f}",
                    f"{records / seconds:.0f}",
                    f"{peak_mb:.0f}",
                    platform.python_version(),
                    platform.machine(),
                ]
            )


if __name__ == "__main__":
    main()
