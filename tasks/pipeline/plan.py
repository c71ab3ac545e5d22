"""The run plan preprocess writes: what each shard (one future Bedrock job) holds, as plan.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from tasks.errors import PlanError
from tasks.files import write_bytes_atomic
from tasks.pipeline.lines import record_id_expr
from tasks.run.layout import PLAN_FILE


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its JSONL for Bedrock and the input rows kept for the merge (relative paths)."""

    index: int
    name: str
    records: int
    bytes: int
    est_input_tokens: int
    input_file: str
    rows_file: str
    sha256: str = ""  # of input_file: a resume checks the copy on S3 against it
    chars: int = 0  # characters of the rendered prompts (the cost estimate's measure)
    # A run with fewer records than a job's minimum is one shard served through
    # bedrock-runtime at the on-demand price (`on_demand`); its plan says so.
    on_demand: bool = False


@dataclass
class RunPlan:
    """Everything later steps need to submit, merge and resume a run."""

    model_id: str
    family: str
    invocation_type: str
    prompt_id: str | None
    text_column: str | None
    id_column: str | None
    source: str
    total_records: int
    skipped_records: int
    columns: list[str]
    shards: list[ShardPlan] = field(default_factory=list)
    skipped_file: str | None = None
    quotas: dict[str, int] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)
    identity: str | None = None  # digest of the run's fingerprint (tasks.run.identity)
    version: int = 1

    @property
    def batch_records(self) -> int:
        """Records sent to Bedrock (total minus skipped)."""
        return sum(s.records for s in self.shards)

    @property
    def total_bytes(self) -> int:
        """Bytes of every JSONL shard."""
        return sum(s.bytes for s in self.shards)

    @property
    def est_input_tokens(self) -> int:
        """Rough input tokens of every shard (characters / 4)."""
        return sum(s.est_input_tokens for s in self.shards)

    def jobs_phrase(self) -> str:
        """How the shards are served, for logs: "3 batch jobs", "1 shard on demand", or both."""
        on_demand = sum(s.on_demand for s in self.shards)
        batch = len(self.shards) - on_demand
        parts = [f"{batch:,} batch job{'s' * (batch != 1)}"] if batch or not on_demand else []
        if on_demand:
            parts.append(
                f"{on_demand:,} shard{'s' * (on_demand != 1)} on demand (bedrock-runtime, "
                "the full price)"
            )
        return " and ".join(parts)

    def shard_ids(self, skipped_ids: pl.Series | None = None) -> Iterator[pl.Series]:
        """Each shard's record ids, in order: what its rows file and input JSONL must hold.

        Preprocess cuts the source's rows without a missing value (all but ``skipped_ids``,
        the ids of rows/skipped.parquet) into consecutive shards, and a record id is its row's
        index in the source (`record_id_expr`), so the plan's counts give each shard's ids.
        One shard's ids are made at a time: memory follows the shard, not the run.
        """
        skipped = np.zeros(0, dtype=np.int64)
        if skipped_ids is not None and skipped_ids.len():
            skipped = np.sort(skipped_ids.str.slice(1).cast(pl.Int64).to_numpy())
        # The valid rows before each skipped row: valid position p is row p + #(those <= p).
        before = skipped - np.arange(len(skipped))
        first = 0
        for shard in self.shards:
            positions = np.arange(first, first + shard.records, dtype=np.int64)
            rows = positions + np.searchsorted(before, positions, side="right")
            first += shard.records
            yield pl.select(record_id_expr(pl.Series(rows)).alias("ids")).to_series()

    def to_json(self) -> str:
        """The plan as JSON (with totals, for people and other tools)."""
        data = asdict(self)
        data["totals"] = {
            "jobs": len(self.shards),
            "batch_records": self.batch_records,
            "bytes": self.total_bytes,
            "est_input_tokens": self.est_input_tokens,
        }
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        """A plan from `to_json` output."""
        data = json.loads(text)
        data.pop("totals", None)
        data["shards"] = [ShardPlan(**s) for s in data.get("shards", [])]
        return cls(**data)

    def save(self, out_dir: Path) -> Path:
        """Write plan.json atomically under `out_dir`."""
        path = Path(out_dir) / PLAN_FILE
        write_bytes_atomic(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, out_dir: Path) -> RunPlan:
        """The plan preprocess wrote under `out_dir`."""
        path = Path(out_dir) / PLAN_FILE
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            msg = f"No {PLAN_FILE} in {out_dir}; run preprocess with this folder as out_dir first."
            raise PlanError(msg) from None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            msg = f"{path} is not a readable plan ({exc}); run preprocess again into a new folder."
            raise PlanError(msg) from None


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_plan(plan: RunPlan) -> str:
    """A table of the plan for the CLI dry run: one line per job, then the totals.

    No token column: the cost estimate printed after it has each shard's input tokens (with
    the system prompt, or counted by CountTokens), and a second, lower guess here (prompt
    characters / 4) contradicted it on the same screen.
    """
    from tasks.pipeline.validation import DEFAULT_TEXT_COLUMN

    header = f"{'job':>5}  {'shard':<12} {'records':>10} {'bytes':>12}"
    if plan.prompt_id:
        what = f"prompt {plan.prompt_id}"
    else:
        what = f"embedding column {plan.text_column or DEFAULT_TEXT_COLUMN}"
    lines = [
        f"model {plan.model_id} ({plan.family}, {plan.invocation_type}), {what}",
        f"source {plan.source}: {plan.total_records:,} records, {plan.skipped_records:,} skipped",
        "",
        header,
        "-" * len(header),
    ]
    for s in plan.shards:
        lines.append(f"{s.index:>5}  {s.name:<12} {s.records:>10,} {_human_bytes(s.bytes):>12}")
    lines.append("-" * len(header))
    lines.append(
        f"{len(plan.shards):>5}  {'total':<12} {plan.batch_records:>10,} "
        f"{_human_bytes(plan.total_bytes):>12}"
    )
    for s in plan.shards:
        if s.on_demand:
            lines.append(
                f"{s.name}: {s.records:,} records, under a job's minimum of "
                f"{plan.quotas.get('min_records_per_job', '?')}: served on demand through "
                "bedrock-runtime at the full price, not as a batch job."
            )
    return "\n".join(lines)
