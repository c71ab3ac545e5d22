"""Benchmark the run orchestration as a black box: `bedrock-batch run` on the local stack.

Two scenarios (settings from BENCH_ORCH_* or the same names as flags, flags win):
  refill  45 jobs of 2,000 records through a gate of 20 at a fixed pace of 6.5 s a job:
          ideal vs measured makespan, slot-refill latency, Bedrock calls per minute.
  scale   N shards of 100 records (BENCH_ORCH_SHARDS, default 200) through a gate
          (BENCH_ORCH_GATE, default 20) at full speed: wall and CPU time, peak RSS of the flow
          process, bytes written to the run state, calls per minute, every row once.

As a user would with `bedrock-batch local` in one shell and `bedrock-batch run` in another:
this process starts the local stack (its emulator paced by the scenario) and a Prefect server
(`prefect_test_harness`: a real server on a temporary SQLite database, as the tests use), then
runs `python -m flows.cli run` as a child pointed at both. The child's figures are its own
(os.wait4), so neither server is in them. The run writes to S3 (moto, in this process) so that
every PUT of a run-state key can be counted on its way in (`PutCounter`).

    python -m benchmarks.bench_orchestration --scenario refill
    python -m benchmarks.bench_orchestration --scenario refill --events
    python -m benchmarks.bench_orchestration --scenario scale --shards 2000 --gate 100
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import statistics
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from benchmarks.common import append_row, run_child

# The harness's server would otherwise try to send telemetry (no network here).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# botocore operation keys (data/bedrock/2023-04-20, data/bedrock-runtime/2023-09-30).
OPERATIONS = {
    "CreateModelInvocationJob": "create",
    "GetModelInvocationJob": "get",
    "ListModelInvocationJobs": "list",
    "StopModelInvocationJob": "stop",
    "InvokeModel": "invoke",
    "Converse": "converse",
    "CountTokens": "count_tokens",
}
ID_COLUMN = "row_id"
# Log lines that show the Prefect API failing under the run (retried or fatal).
PREFECT_API_ERROR = re.compile(
    r"PrefectHTTPStatusError|httpx\.\w*(Error|Timeout)|Server error '5\d\d|"
    r"Client error '4\d\d|sqlite3\.OperationalError|database is locked"
)
# Pace and size of each scenario unless set: the refill case of the brief, a fast scale case.
DEFAULTS = {
    "refill": {"shards": 45, "records_per_job": 2_000, "gate": 20, "pace_seconds": 6.5},
    "scale": {"shards": 200, "records_per_job": 100, "gate": 20, "pace_seconds": 0.0},
}


class OrchestrationSettings(BaseSettings):
    """One orchestration scenario, from BENCH_ORCH_* variables (None: the scenario's default)."""

    model_config = SettingsConfigDict(env_prefix="BENCH_ORCH_")

    scenario: Literal["refill", "scale"] = Field("refill", description="refill or scale.")
    shards: int | None = Field(None, description="Jobs of the run (one per shard).")
    records_per_job: int | None = Field(None, description="Records of each shard.")
    gate: int | None = Field(
        None,
        description="max_concurrent_jobs, the quota setting and the emulator's job quota.",
    )
    pace_seconds: float | None = Field(
        None, description="Seconds of service a job takes in the emulator; 0 is full speed."
    )
    poll_interval_seconds: float = Field(0.5, description="BEDROCK_BATCH_POLL_INTERVAL_SECONDS.")
    poll_max_interval_seconds: float = Field(
        0.5,
        description=(
            "BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS; equal to the interval, the poll cadence "
            "is fixed, so the figures show the orchestration rather than the back-off."
        ),
    )
    events: bool = Field(
        False,
        description=(
            "Run `bedrock-batch events setup` first (moto's EventBridge rule to an SQS queue), "
            "so jobs end by the emulator's state change events; polling stays the fallback."
        ),
    )
    dir: Path = Field(Path("/tmp/bench-orch"), description="Scratch folder: data and logs.")
    model_id: str = Field("anthropic.claude-3-haiku-20240307-v1:0", description="Model id.")
    prompt_id: str = Field(
        "question_answering",
        description="Prompt template id; empty for an embedding run of the `source` column.",
    )
    timeout_seconds: float = Field(7200.0, description="The run is killed after this long.")

    def resolved(self) -> OrchestrationSettings:
        """The settings with every unset size and pace taken from the scenario's defaults."""
        unset = {k: v for k, v in DEFAULTS[self.scenario].items() if getattr(self, k) is None}
        return self.model_copy(update=unset)

    @property
    def rows(self) -> int:
        return self.shards * self.records_per_job


class PutCounter:
    """WSGI middleware on moto's S3: PUT requests and body bytes under the run folder.

    A key whose part below the run folder contains "state" is run state (state.json today,
    per-shard state objects after the rewrite); every other PUT there is counted apart.
    """

    def __init__(self, app, prefix: str):
        self.app = app
        self.prefix = prefix
        self.lock = threading.Lock()
        self.counts = {"state_puts": 0, "state_put_bytes": 0, "other_puts": 0, "other_bytes": 0}
        self.requests = 0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        with self.lock:
            self.requests += 1
            if environ["REQUEST_METHOD"] == "PUT" and path.startswith(self.prefix):
                # boto3 may stream the body aws-chunked; the decoded length is the object's.
                size = int(
                    environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")
                    or environ.get("CONTENT_LENGTH")
                    or 0
                )
                kind = "state" if "state" in path[len(self.prefix) :] else "other"
                self.counts[f"{kind}_puts"] += 1
                self.counts[f"{kind}_put_bytes" if kind == "state" else "other_bytes"] += size
        return self.app(environ, start_response)


def make_source(settings: OrchestrationSettings) -> Path:
    """Short SimpleCoT-like questions with a unique `row_id` (made once per row count)."""
    path = settings.dir / f"questions-{settings.rows}.parquet"
    if not path.exists():
        settings.dir.mkdir(parents=True, exist_ok=True)
        i = pl.int_range(settings.rows, dtype=pl.Int64)
        pl.select(
            i.alias(ID_COLUMN),
            pl.format("Question {}: what is {} plus {}? Options: (A) yes (B) no.", i, i, i).alias(
                "source"
            ),
        ).write_parquet(path)
    return path


def emulator_config(settings: OrchestrationSettings):
    """The emulator paced so one job takes `pace_seconds` of service, quota = the gate."""
    from emulator import EmulatorConfig

    rate = settings.records_per_job / settings.pace_seconds if settings.pace_seconds else None
    return EmulatorConfig(
        status_step_seconds=0.0,
        queue_delay_seconds=0.0,
        records_per_second=rate,
        max_jobs_per_model=settings.gate,
    )


def list_jobs(stack) -> list[dict]:
    """Every job Bedrock knows (the stack is this benchmark's own), via ListModelInvocationJobs."""
    bedrock, jobs, token = stack.client("bedrock"), [], None
    while True:
        page = bedrock.list_model_invocation_jobs(
            maxResults=1000, **({"nextToken": token} if token else {})
        )
        jobs += page["invocationJobSummaries"]
        token = page.get("nextToken")
        if not token:
            return jobs


# The shard's log line when it learns its job ended: `<time> | INFO | ... - <job>: X → <final>`.
SEEN_FINAL = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO .* - (\S+): \S+ → (Completed|Failed)")


def seen_figures(jobs: list[dict], log: Path) -> dict:
    """How soon after Bedrock's endTime the flow knew a job ended (its merge starts then).

    Log times are the child's wall clock, the emulator's endTime the same machine's (UTC).
    """
    seen: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if match := SEEN_FINAL.match(line):
            seen[match[2]] = match[1]
    delays = []
    for job in jobs:
        end, at = job.get("endTime"), seen.get(job["jobName"])
        if end and at:
            moment = datetime.combine(end.date(), datetime.strptime(at, "%H:%M:%S.%f").time())
            delays.append(moment.replace(tzinfo=timezone.utc).timestamp() - end.timestamp())
    if not delays:
        return {"end_seen_median_s": None, "end_seen_max_s": None}
    return {
        "end_seen_median_s": round(statistics.median(delays), 3),
        "end_seen_max_s": round(max(delays), 3),
    }


def refill_figures(jobs: list[dict], gate: int) -> dict:
    """Makespan from Bedrock's own submitTime/endTime, and how soon a freed slot was used.

    The refill latency of a job past the first wave is its submitTime minus the latest
    endTime of a job that had ended by then.
    """
    if not jobs:
        return {"bedrock_makespan_s": None, "refill_median_s": None, "refill_max_s": None}
    submits = sorted(j["submitTime"].timestamp() for j in jobs)
    ends = sorted(j["endTime"].timestamp() for j in jobs if j.get("endTime"))
    latencies = []
    for submit in submits[gate:]:
        ended = [e for e in ends if e <= submit]
        if ended:
            latencies.append(submit - ended[-1])
    service = [
        j["endTime"].timestamp() - j["submitTime"].timestamp() for j in jobs if j.get("endTime")
    ]
    # Jobs in flight at Bedrock over the makespan: +1 at each submit, -1 at each end.
    steps = sorted([(t, 1) for t in submits] + [(t, -1) for t in ends])
    in_flight, peak, area = 0, 0, 0.0
    for (t, step), (t_next, _) in zip(steps, [*steps[1:], steps[-1]], strict=True):
        in_flight += step
        peak = max(peak, in_flight)
        area += in_flight * (t_next - t)
    makespan = max(ends) - submits[0] if ends else None
    return {
        "bedrock_makespan_s": round(makespan, 2) if makespan else None,
        # How long the flow took to put its first wave in flight (submission pace).
        "first_wave_fill_s": round(submits[min(gate, len(submits)) - 1] - submits[0], 2),
        "peak_in_flight": peak,
        "mean_in_flight": round(area / makespan, 1) if makespan else None,
        "job_service_mean_s": round(statistics.mean(service), 2) if service else None,
        "refill_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "refill_max_s": round(max(latencies), 3) if latencies else None,
        "refills_measured": len(latencies),
    }


def critical_chain(jobs: list[dict], gate: int) -> dict:
    """Where the makespan went: the chain of jobs that ran one after another in the slot of the
    job that ended last, split into its start after the first submission (first-wave fill),
    its jobs' own submitTime→endTime, and the gaps between one's end and the next's submit.

    A job past the first wave took the slot of the latest-ended job not yet followed (as in
    refill_figures); the three parts add up to the makespan.
    """
    ended = sorted((j for j in jobs if j.get("endTime")), key=lambda j: j["submitTime"])
    if not ended:
        return dict.fromkeys(("chain_jobs", "chain_start_s", "chain_service_s", "chain_gaps_s"))
    first = ended[0]["submitTime"].timestamp()
    chain: dict[str, tuple[float, float, float, int]] = {}  # name: (start, service, gaps, jobs)
    followed: set[str] = set()
    for i, job in enumerate(ended):
        submit, end = job["submitTime"].timestamp(), job["endTime"].timestamp()
        before = [
            j
            for j in ended[:i]
            if j["jobName"] not in followed and j["endTime"].timestamp() <= submit
        ]
        if i < gate or not before:
            chain[job["jobName"]] = (submit - first, end - submit, 0.0, 1)
            continue
        previous = max(before, key=lambda j: j["endTime"])
        followed.add(previous["jobName"])
        start, service, gaps, count = chain[previous["jobName"]]
        gap = submit - previous["endTime"].timestamp()
        chain[job["jobName"]] = (start, service + end - submit, gaps + gap, count + 1)
    start, service, gaps, count = chain[max(ended, key=lambda j: j["endTime"])["jobName"]]
    return {
        "chain_jobs": count,
        "chain_start_s": round(start, 2),
        "chain_service_s": round(service, 2),
        "chain_gaps_s": round(gaps, 2),
    }


def rss_phases(samples: list[tuple[float, float]], jobs: list[dict]) -> dict:
    """The flow process's peak resident MB before its first job (reading, planning, writing
    the shards), while jobs run, and after the last job ended (the last merges, the summary):
    whether a peak that grows with the shard count is the plan's or the orchestration's."""
    if not samples or not jobs:
        return dict.fromkeys(("rss_plan_peak_mb", "rss_jobs_peak_mb", "rss_tail_peak_mb"))
    first = min(j["submitTime"].timestamp() for j in jobs)
    last = max((j["endTime"].timestamp() for j in jobs if j.get("endTime")), default=first)

    def peak(chosen: list[float]) -> float | None:
        return round(max(chosen), 1) if chosen else None

    return {
        "rss_plan_peak_mb": peak([mb for t, mb in samples if t < first]),
        "rss_jobs_peak_mb": peak([mb for t, mb in samples if first <= t <= last]),
        "rss_tail_peak_mb": peak([mb for t, mb in samples if t > last]),
    }


def calls_per_minute(calls: dict, seconds: float) -> dict:
    """Mean calls a minute over the run, the busiest 60 s, and throttled totals, by operation."""
    figures = {}
    for name, short in OPERATIONS.items():
        op = calls["operations"].get(name, {"calls": 0, "throttled": 0, "per_second": {}})
        per_second = {int(s): n for s, n in op["per_second"].items()}
        peak = max(
            (sum(per_second.get(t, 0) for t in range(s, s + 60)) for s in per_second), default=0
        )
        figures[f"{short}_per_min"] = round(op["calls"] / (seconds / 60), 1)
        figures[f"{short}_peak_per_min"] = peak
        figures[f"{short}_calls"] = op["calls"]
        figures[f"{short}_throttled"] = op["throttled"]
    return figures


def run_folder_objects(stack, prefix: str) -> list[dict]:
    """Every object under the run folder on moto's S3."""
    s3, found = stack.client("s3"), []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix):
        found += page.get("Contents", [])
    return found


def check_rows(stack, objects: list[dict], prefix: str, rows: int) -> dict:
    """Every input row_id in the output Parquet files exactly once."""
    s3 = stack.client("s3")
    keys = [
        o["Key"]
        for o in objects
        if o["Key"].startswith(f"{prefix}output/") and o["Key"].endswith(".parquet")
    ]
    frames = [
        pl.read_parquet(io.BytesIO(s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read()))
        for k in keys
    ]
    out = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    if ID_COLUMN not in out.columns:
        return {"output_rows": out.height, "rows_once": False, "failed_rows": None}
    ids = out[ID_COLUMN].cast(pl.Int64)
    once = (
        out.height == rows and ids.n_unique() == rows and ids.min() == 0 and ids.max() == rows - 1
    )
    failed = out["error_code"].is_not_null().sum() if "error_code" in out.columns else None
    return {"output_rows": out.height, "rows_once": bool(once), "failed_rows": failed}


def prefect_errors(log: Path) -> tuple[int, str]:
    """How many log lines show a Prefect API error, and the last one (or the last error)."""
    lines = log.read_text(errors="replace").splitlines()
    hits = [line for line in lines if PREFECT_API_ERROR.search(line)]
    return len(hits), (hits[-1].strip()[:300] if hits else "")


def log_levels(log: Path) -> dict:
    """Counts of WARNING and ERROR lines the run logged, and the last warning (e.g. a lost
    gate lease: the Prefect server forgot a slot under load)."""
    lines = log.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if "| WARNING |" in line]
    return {
        "log_warnings": len(warnings),
        "log_errors": sum("| ERROR   |" in line for line in lines),
        "last_warning": warnings[-1].strip()[:300] if warnings else "",
    }


def last_error(log: Path) -> str:
    """The last line of the log that names an error, for a failed run."""
    lines = log.read_text(errors="replace").splitlines()
    named = [line for line in lines if re.search(r"Error|Exception|Traceback", line)]
    return (named[-1] if named else (lines[-1] if lines else "")).strip()[:300]


def run(settings: OrchestrationSettings) -> dict:
    """Start the stack and a Prefect server, run the flow as a child, and collect the figures."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from emulator import LocalStack

    source = make_source(settings)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    events = "-events" if settings.events else ""
    run_name = f"orch-{settings.scenario}{events}-{settings.shards}-g{settings.gate}-{stamp}"
    log = settings.dir / "logs" / f"{run_name}.log"
    with (
        prefect_test_harness(server_startup_timeout=120),
        LocalStack(emulator_config(settings)) as stack,
    ):
        prefix = f"runs/{run_name}/"
        # moto's werkzeug server reads `.app` on each request, so the counter sees every PUT.
        counter = PutCounter(stack._moto._server.app, f"/{stack.bucket}/{prefix}")
        stack._moto._server.app = counter
        stack.reset_api_calls()
        env = {
            **stack.env,
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "BEDROCK_BATCH_POLL_INTERVAL_SECONDS": str(settings.poll_interval_seconds),
            "BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS": str(settings.poll_max_interval_seconds),
            "BEDROCK_BATCH_QUOTA_MAX_JOBS_PER_MODEL": str(settings.gate),
        }
        if settings.events:  # as a user would: the queue URL goes to a Prefect Variable
            setup = [sys.executable, "-m", "flows.cli", "events", "setup"]
            run_child(setup, log.with_suffix(".events-setup.log"), env=env)
        argv = [sys.executable, "-m", "flows.cli", "run", "--source", str(source)]
        if settings.prompt_id:
            argv += ["--prompt-id", settings.prompt_id]
        else:
            argv += ["--text-column", "source"]
        argv += ["--model-id", settings.model_id]
        argv += ["--output-uri", f"s3://{stack.bucket}/runs", "--run-name", run_name]
        argv += ["--max-concurrent-jobs", str(settings.gate), "--id-column", ID_COLUMN]
        argv += ["--max-records-per-job", str(settings.records_per_job)]
        rss: list[tuple[float, float]] = []
        child = run_child(
            argv, log, env=env, check=False, timeout=settings.timeout_seconds, rss_samples=rss
        )
        calls = stack.api_calls()
        jobs = list_jobs(stack)
        objects = run_folder_objects(stack, prefix)
        state = [o for o in objects if "state" in o["Key"][len(prefix) :]]
        rows = check_rows(stack, objects, prefix, settings.rows)
        s3_requests = counter.requests
        puts = dict(counter.counts)
    api_errors, api_error = prefect_errors(log)
    killed = child["exit_code"] and child["seconds"] >= settings.timeout_seconds
    error = last_error(log) if child["exit_code"] else ""
    if killed:
        error = f"killed after {settings.timeout_seconds:.0f} s (BENCH_ORCH_TIMEOUT_SECONDS)"
    # Per shard over the shards the run got to when it did not finish.
    done = settings.shards if child["exit_code"] == 0 else max(len(jobs), 1)
    waves = math.ceil(settings.shards / settings.gate)
    ideal = waves * settings.pace_seconds
    refill = refill_figures(jobs, settings.gate)
    seen = seen_figures(jobs, log)
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenario": settings.scenario,
        "shards": settings.shards,
        "records_per_job": settings.records_per_job,
        "rows": settings.rows,
        "gate": settings.gate,
        "pace_s": settings.pace_seconds,
        "poll_s": settings.poll_interval_seconds,
        "events": settings.events,
        "exit_code": child["exit_code"],
        "error": error,
        "prefect_api_error_lines": api_errors,
        "prefect_api_error": api_error,
        **log_levels(log),
        "jobs": len(jobs),
        "jobs_completed": sum(j["status"] == "Completed" for j in jobs),
        "waves": waves,
        "ideal_makespan_s": ideal,
        **refill,
        **critical_chain(jobs, settings.gate),
        **seen,
        "flow_wall_s": child["seconds"],
        "ratio_bedrock": round(refill["bedrock_makespan_s"] / ideal, 2)
        if ideal and refill["bedrock_makespan_s"]
        else None,
        "ratio_wall": round(child["seconds"] / ideal, 2) if ideal else None,
        "cpu_s": child["cpu_seconds"],
        "peak_rss_mb": child["peak_rss_mb"],
        **rss_phases(rss, jobs),
        "shards_reached": done,
        "wall_per_shard_ms": round(1000 * child["seconds"] / done, 1),
        "cpu_per_shard_ms": round(1000 * child["cpu_seconds"] / done, 1),
        "state_objects": len(state),
        "state_bytes_at_end": sum(o["Size"] for o in state),
        **puts,
        "s3_requests": s3_requests,
        **rows,
        **calls_per_minute(calls, child["seconds"]),
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "log": str(log),
    }


def show(figures: dict) -> None:
    """The figures as a two-column table."""
    width = max(len(k) for k in figures)
    print(f"\norchestration benchmark: {figures['scenario']}")
    for key, value in figures.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"  {key:<{width}}  {shown}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(DEFAULTS))
    parser.add_argument("--shards", type=int)
    parser.add_argument("--records-per-job", type=int)
    parser.add_argument("--gate", type=int)
    parser.add_argument("--pace-seconds", type=float)
    parser.add_argument("--events", action="store_true", default=None)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    settings = OrchestrationSettings(**flags).resolved()
    figures = run(settings)
    show(figures)
    path = append_row(f"orchestration_{settings.scenario}", figures)
    print(f"\nappended to {path}")
    if figures["exit_code"]:
        print(f"the run failed (exit {figures['exit_code']}): {figures['error']}")


if __name__ == "__main__":
    main()
