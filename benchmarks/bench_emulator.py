"""Benchmark: records per second of the emulator's job runner at full speed.

Settings come from the environment (BENCH_EMULATOR_ prefix):
  BENCH_EMULATOR_RECORDS   records per job (default 50000, the Bedrock per-job maximum)
  BENCH_EMULATOR_MODEL     model id (default anthropic.claude-3-haiku-20240307-v1:0)
  BENCH_EMULATOR_CSV       results file (default benchmarks/results/bench_emulator.csv)

Two figures: the runner alone (parse JSONL, answer every record, format output lines) and a
whole job end to end through the local stack (S3 read, Submitted → Completed, S3 write).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator import LocalStack, lookup  # noqa: E402
from emulator.faults import Faults  # noqa: E402
from emulator.runner import answer, parse_input  # noqa: E402

RECORDS = int(os.environ.get("BENCH_EMULATOR_RECORDS", "50000"))
MODEL = os.environ.get("BENCH_EMULATOR_MODEL", "anthropic.claude-3-haiku-20240307-v1:0")
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


def bench_end_to_end(data: bytes) -> float:
    """Seconds from CreateModelInvocationJob to Completed through the local stack."""
    with LocalStack() as stack:
        stack.configure(max_records_per_job=max(RECORDS, 50_000))
        s3, bedrock = stack.client("s3"), stack.client("bedrock")
        s3.put_object(Bucket=stack.bucket, Key="bench/input.jsonl", Body=data)
        start = time.perf_counter()
        arn = bedrock.create_model_invocation_job(
            jobName="bench",
            roleArn=stack.env["BEDROCK_BATCH_ROLE_ARN"],
            modelId=MODEL,
            inputDataConfig={
                "s3InputDataConfig": {"s3Uri": f"s3://{stack.bucket}/bench/input.jsonl"}
            },
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{stack.bucket}/bench/out/"}},
        )["jobArn"]
        deadline = start + 600
        while True:
            job = bedrock.get_model_invocation_job(jobIdentifier=arn)
            if job["status"] not in ("Submitted", "Validating", "Scheduled", "InProgress"):
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(arn)
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        assert job["status"] == "Completed", job
        return elapsed


def main() -> None:
    data = make_input(RECORDS, MODEL)
    runner_s = bench_runner(data)
    e2e_s = bench_end_to_end(data)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("runner", runner_s),
        ("end_to_end", e2e_s),
    ]
    for scenario, seconds in rows:
        print(
            f"{scenario:>10}: {RECORDS} records of {MODEL} in {seconds:.2f} s "
            f"= {RECORDS / seconds:,.0f} records/s"
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
        for scenario, seconds in rows:
            writer.writerow(
                [
                    datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    scenario,
                    MODEL,
                    RECORDS,
                    f"{seconds:.3f}",
                    f"{RECORDS / seconds:.0f}",
                    f"{peak_mb:.0f}",
                    platform.python_version(),
                    platform.machine(),
                ]
            )


if __name__ == "__main__":
    main()
