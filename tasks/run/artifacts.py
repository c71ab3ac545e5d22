"""What the Prefect UI shows of a run while it runs: the live job table, the timeline, its name.

The builders (`job_rows`, `job_bars`, `occupancy`, `timeline_svg`, `timeline_markdown`) are
pure functions of the run's durable state, so they are tested without Prefect; `JobBoard`
publishes them as versioned artifacts (same key) while the jobs move, rate-limited.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

from tasks.bedrock.prices import format_usd
from tasks.bedrock.statuses import STATUS_OUTCOMES
from tasks.pipeline.columns import SERVED_BATCH
from tasks.run.state import JobAttempt, ShardState

# The console's page of one batch job. The list page (`#/batch-inference`) is the one AWS
# samples link to; the details route taking the job ARN is the console's own, not documented.
CONSOLE_URL = (
    "https://{region}.console.aws.amazon.com/bedrock/home?region={region}"
    "#/batch-inference/details?arn={arn}"
)
NONE = "—"
UNKNOWN = "unknown"  # counted by nobody: neither the rows nor a manifest
WAITING = "waiting for a slot"
# Final status → colour of its bar (in flight: blue).
STATUS_COLOURS = {
    "Completed": "#2e9e5b",
    "PartiallyCompleted": "#e0a21b",
    "Failed": "#d64545",
    "Expired": "#8e5bd6",
    "Stopped": "#7a7a7a",
}
IN_FLIGHT_COLOUR = "#3b7dd8"
BLOCKS = "▁▂▃▄▅▆▇█"
# Samples of records and tokens the timeline keeps: about one per pixel of its 720-pixel plot.
# A run publishes on each poll that moves a counter, for days; every publication is a new
# artifact row, so a timeline drawing every sample ever taken grew with the run's age and the
# Prefect database with its square.
MAX_TIMELINE_SAMPLES = 720

CostOf = Callable[[int, int], float | None]
# A merged shard's actual cost in its merge stats (`run_shard`): batch and on demand apart.
COST_USD = "cost_usd"


def artifact_key(run_name: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    safe = "".join(c if c.isalnum() else "-" for c in run_name.lower())
    return f"bedrock-batch-{safe}-{what}"[:100].strip("-")


def fmt_int(value: int | float | None) -> str:
    """A count with thousands separators, or a dash when unknown."""
    return NONE if value is None else f"{int(value):,}"


def absolute_location(uri: str) -> str:
    """An S3 URI as it is; a local folder as an absolute path (the UI has no working dir)."""
    return uri if "://" in uri else str(Path(uri).resolve())


def console_url(job_arn: str | None) -> str | None:
    """The AWS console page of a batch job; the region comes from the ARN."""
    if not job_arn or not job_arn.startswith("arn:"):
        return None
    parts = job_arn.split(":")
    if len(parts) < 6 or not parts[3]:
        return None
    return CONSOLE_URL.format(region=parts[3], arn=quote(job_arn, safe=""))


@dataclass(frozen=True)
class ShardView:
    """One shard as the table sees it: its plan size and a copy of its durable state."""

    name: str
    records: int
    attempts: tuple[JobAttempt, ...] = ()
    merge_stats: dict[str, Any] | None = None
    merged: bool = False

    @classmethod
    def of(cls, name: str, records: int, state: ShardState | None) -> ShardView:
        if state is None:
            return cls(name, records)
        return cls(
            name,
            records,
            tuple(state.attempts),
            dict(state.merge_stats) if state.merge_stats else None,
            state.part_uri is not None,
        )


def _served_by(attempts: Sequence[JobAttempt]) -> str:
    counts = Counter(a.served_by for a in attempts)
    return ", ".join(f"{how} ×{n}" for how, n in sorted(counts.items())) or NONE


def _job_attempt(view: ShardView) -> JobAttempt | None:
    """The latest attempt that is a Bedrock job (on-demand retries have no ARN)."""
    return next((a for a in reversed(view.attempts) if a.job_arn), None)


def _shard_cost(view: ShardView, cost_of: CostOf | None) -> float | None:
    """What a merged shard cost (None before its merge, or without a price).

    The cost worked out at its merge (each row at the price of how it was served); a shard
    merged by an older version has only its tokens, priced with ``cost_of`` (batch).
    """
    stats = view.merge_stats or {}
    if COST_USD in stats:
        return stats[COST_USD]
    if cost_of is None or stats.get("input_tokens") is None:
        return None
    return cost_of(stats["input_tokens"], stats.get("output_tokens"))


def _fmt_tokens(value: int | None, merge_stats: dict[str, Any] | None) -> str:
    """A dash before the merge; "unknown" after it when neither rows nor manifest count them."""
    return UNKNOWN if merge_stats and value is None else fmt_int(value)


def shard_row(view: ShardView, max_attempts: int, cost_of: CostOf | None = None) -> dict[str, Any]:
    """One table row: where the shard's jobs are, what they processed and spent so far."""
    current = view.attempts[-1] if view.attempts else None
    job = _job_attempt(view)
    status = (current.status if current else None) or WAITING
    if view.merged:
        status = f"{status}, merged"
    counters = current.counters if current else {}
    if view.merge_stats:
        processed = view.records
        ok = view.merge_stats.get("succeeded")
        failed = view.merge_stats.get("failed")
        tokens_in = view.merge_stats.get("input_tokens")
        tokens_out = view.merge_stats.get("output_tokens")
    else:
        processed = counters.get("processedRecordCount")
        ok = counters.get("successRecordCount")
        failed = counters.get("errorRecordCount")
        # GetModelInvocationJob carries no token counts: they come with the merged output.
        tokens_in = tokens_out = None
    cost = _shard_cost(view, cost_of)
    return {
        "shard": view.name,
        "status": status,
        "attempt": f"{len(view.attempts)} / {max_attempts}" if view.attempts else NONE,
        "records": fmt_int(view.records),
        "processed": fmt_int(processed),
        "ok": fmt_int(ok),
        "failed": fmt_int(failed),
        "input tokens": _fmt_tokens(tokens_in, view.merge_stats),
        "output tokens": _fmt_tokens(tokens_out, view.merge_stats),
        "cost so far (USD)": NONE if cost is None else format_usd(cost, sign=""),
        "served by": _served_by(view.attempts),
        "job ARN": job.job_arn if job else NONE,
        "AWS console": console_url(job.job_arn if job else None) or NONE,
    }


def job_rows(
    views: Sequence[ShardView], max_attempts: int, cost_of: CostOf | None = None
) -> list[dict[str, Any]]:
    """The live job table: one row per shard, then a total row."""
    rows = [shard_row(v, max_attempts, cost_of) for v in views]
    if not rows:
        return rows

    def total(column: str) -> str:
        values = [r[column] for r in rows if r[column] != NONE]
        if UNKNOWN in values:  # a shard whose tokens nobody counted: the sum is not known
            return UNKNOWN
        return fmt_int(sum(int(v.replace(",", "")) for v in values)) if values else NONE

    # Summed unrounded: the rows' 4-decimal figures added up to $0.0070 for a $0.00692 run.
    costs = [c for c in (_shard_cost(v, cost_of) for v in views) if c is not None]
    merged = sum(1 for v in views if v.merged)
    rows.append(
        {
            "shard": "all",
            "status": f"{merged} of {len(views)} merged",
            "attempt": NONE,
            **{c: total(c) for c in ("records", "processed", "ok", "failed")},
            "input tokens": total("input tokens"),
            "output tokens": total("output tokens"),
            "cost so far (USD)": format_usd(sum(costs), sign="") if costs else NONE,
            "served by": _served_by([a for v in views for a in v.attempts]),
            "job ARN": NONE,
            "AWS console": NONE,
        }
    )
    return rows


# --- timeline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One Bedrock job from submit to its end (None: still running)."""

    label: str
    start: datetime
    end: datetime | None
    status: str | None

    @property
    def colour(self) -> str:
        return STATUS_COLOURS.get(self.status or "", IN_FLIGHT_COLOUR)


@dataclass(frozen=True)
class Sample:
    """Records processed and tokens merged over the run, at one moment."""

    at: datetime
    records: int
    tokens: int


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def thin(samples: Sequence[Sample]) -> list[Sample]:
    """Every other sample, the first and the last always kept: half the points, same span.

    The counts only grow, so the line through the kept points is the same picture at the
    plot's resolution; halving when the list doubles keeps it bounded at O(1) a sample.
    """
    kept = list(samples[:-1:2])
    return [*kept, samples[-1]] if samples else kept


def job_bars(views: Sequence[ShardView]) -> list[Bar]:
    """A bar per Bedrock job that was submitted, in submit order (on-demand retries skip it)."""
    bars = []
    for view in views:
        for a in view.attempts:
            start = _time(a.submitted_at)
            if a.served_by != SERVED_BATCH or start is None:
                continue
            final = STATUS_OUTCOMES.get(a.status or "")
            end = _time(a.ended_at) if final is not None and final.final else None
            label = view.name if a.attempt == 1 else f"{view.name} #{a.attempt}"
            bars.append(Bar(label, start, end, a.status))
    return sorted(bars, key=lambda b: (b.start, b.label))


def occupancy(bars: Sequence[Bar], now: datetime) -> list[tuple[datetime, int]]:
    """Jobs of this run holding a gate slot over time, as (moment, count) steps."""
    edges: list[tuple[datetime, int]] = []
    for bar in bars:
        edges.append((bar.start, 1))
        edges.append((bar.end or now, -1))
    steps: list[tuple[datetime, int]] = []
    count = 0
    for at, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        count += delta
        if steps and steps[-1][0] == at:
            steps[-1] = (at, count)
        else:
            steps.append((at, count))
    return steps


def _span(bars: Sequence[Bar], samples: Sequence[Sample], now: datetime) -> tuple[datetime, float]:
    times = [b.start for b in bars] + [s.at for s in samples]
    start = min(times) if times else now
    ends = [b.end or now for b in bars] + [s.at for s in samples] + [now]
    return start, max((max(ends) - start).total_seconds(), 1.0)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    )


def timeline_svg(
    bars: Sequence[Bar], samples: Sequence[Sample], now: datetime, gate_size: int
) -> str:
    """The run as an SVG picture: job bars, gate occupancy, records and tokens over time."""
    left, width, row = 150, 720, 18
    start, span = _span(bars, samples, now)

    def x(at: datetime) -> float:
        return left + width * (at - start).total_seconds() / span

    parts: list[str] = []
    y = 24
    parts.append(
        f'<text x="{left}" y="14" class="h">Jobs (submit → end), coloured by status</text>'
    )
    for bar in bars:
        x0, x1 = x(bar.start), x(bar.end or now)
        parts.append(f'<text x="{left - 6}" y="{y + 13}" class="l">{escape(bar.label)}</text>')
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 2):.1f}" height="{row - 4}" '
            f'rx="3" fill="{bar.colour}"><title>{escape(bar.label)}: '
            f"{escape(bar.status or 'in flight')}</title></rect>"
        )
        y += row
    y += 12
    # Gate occupancy: a step line against the gate's size.
    height = 60
    steps = occupancy(bars, now)
    top = max([gate_size, *(c for _, c in steps)], default=1) or 1
    parts.append(
        f'<text x="{left}" y="{y}" class="h">This run\'s jobs in the gate (size {gate_size})</text>'
    )
    y += 6
    base = y + height
    points = [(left, base)]
    for at, count in steps:
        points.append((x(at), points[-1][1]))
        points.append((x(at), base - height * count / top))
    points.append((left + width, points[-1][1]))
    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    gate_y = base - height * gate_size / top
    parts.append(
        f'<line x1="{left}" x2="{left + width}" y1="{gate_y:.1f}" y2="{gate_y:.1f}" class="g"/>'
    )
    parts.append(
        f'<polyline points="{path}" fill="none" stroke="{IN_FLIGHT_COLOUR}" stroke-width="2"/>'
    )
    parts.append(f'<text x="{left - 6}" y="{gate_y + 4:.1f}" class="l">{gate_size}</text>')
    parts.append(f'<text x="{left - 6}" y="{base + 4}" class="l">0</text>')
    y = base + 24
    # Records processed and tokens merged, each against its own maximum.
    parts.append(
        f'<text x="{left}" y="{y}" class="h">'
        "Records processed (green) and tokens merged (orange)</text>"
    )
    y += 6
    base = y + height
    for field, colour in (("records", "#2e9e5b"), ("tokens", "#e07b1b")):
        values = [getattr(s, field) for s in samples]
        peak = max(values, default=0)
        if not samples or peak == 0:
            continue
        line = " ".join(
            f"{x(s.at):.1f},{base - height * getattr(s, field) / peak:.1f}" for s in samples
        )
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        label_y = y + 10 if field == "records" else y + 24
        parts.append(
            f'<text x="{left - 6}" y="{label_y}" class="l" fill="{colour}">{peak:,}</text>'
        )
    y = base + 16
    for i in range(5):
        tick = left + width * i / 4
        parts.append(f'<text x="{tick:.1f}" y="{y}" class="t">{_clock(span * i / 4)}</text>')
    total_height = y + 8
    style = (
        "<style>text{font:12px sans-serif;fill:#444}.h{font-weight:bold}"
        ".l{text-anchor:end}.t{text-anchor:middle}.g{stroke:#d64545;stroke-dasharray:4 3}</style>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" '
        f'height="{total_height}" viewBox="0 0 {left + width + 20} {total_height}">'
        f'<rect width="100%" height="100%" fill="white"/>{style}{"".join(parts)}</svg>'
    )


def _step(seconds: float) -> str:
    """One column's width: m:ss, or seconds under a minute (a 44 s run's 0.9 s read 0:00)."""
    return f"{seconds:.1f} s" if seconds < 60 else _clock(seconds)


def _cells(bar: Bar, start: datetime, span: float, now: datetime, width: int) -> str:
    first = int(width * (bar.start - start).total_seconds() / span)
    last = int(width * ((bar.end or now) - start).total_seconds() / span)
    first, last = min(first, width - 1), min(max(last, first + 1), width)
    return "·" * first + "█" * (last - first) + "·" * (width - last)


def _spark(values: Sequence[float], top: float) -> str:
    if not values or top <= 0:
        return ""
    return "".join(BLOCKS[min(round(v / top * (len(BLOCKS) - 1)), len(BLOCKS) - 1)] for v in values)


def _resample(
    points: Sequence[tuple[datetime, float]], start: datetime, span: float, width: int
) -> list[float]:
    """The value at each of `width` moments: the last point at or before it."""
    out, i, value = [], 0, 0.0
    for cell in range(width):
        at = start.timestamp() + span * (cell + 1) / width
        while i < len(points) and points[i][0].timestamp() <= at:
            value = points[i][1]
            i += 1
        out.append(value)
    return out


def timeline_markdown(
    bars: Sequence[Bar],
    samples: Sequence[Sample],
    now: datetime,
    gate_size: int,
    width: int = 48,
) -> str:
    """The same picture as text (no emoji: not every browser has the font), block bars per job."""
    start, span = _span(bars, samples, now)
    lines = [
        f"Run time 0:00 → {_clock(span)}, one column ≈ {_step(span / width)}.",
        "",
        "| job | submit → end | status |",
        "| --- | --- | --- |",
    ]
    for bar in bars:
        cells = _cells(bar, start, span, now, width)
        lines.append(f"| {bar.label} | `{cells}` | {bar.status or 'in flight'} |")
    occupied = _resample(occupancy(bars, now), start, span, width)
    peak = max(occupied, default=0)
    lines.append(
        f"| gate | `{_spark(occupied, max(gate_size, peak))}` | up to {int(peak)} of {gate_size} |"
    )
    for field in ("records", "tokens"):
        values = _resample([(s.at, getattr(s, field)) for s in samples], start, span, width)
        top = max(values, default=0)
        if top:
            lines.append(f"| {field} | `{_spark(values, top)}` | {fmt_int(top)} |")
    return "\n".join(lines)


# --- publishing -------------------------------------------------------------------------------


def _publish_table(
    rows: list[dict[str, Any]], key: str, flow_run_id: UUID | None, description: str
) -> None:
    from prefect.artifacts import TableArtifact

    TableArtifact(key=key, table=rows, description=description, flow_run_id=flow_run_id).create()


def _publish_markdown(markdown: str, key: str, flow_run_id: UUID | None) -> None:
    from prefect.artifacts import MarkdownArtifact

    MarkdownArtifact(
        key=key, markdown=markdown, description="Run timeline", flow_run_id=flow_run_id
    ).create()


def svg_image(svg: str, alt: str = "timeline") -> str:
    """Markdown for an inline SVG picture (a data URI, so nothing needs hosting)."""
    data = base64.b64encode(svg.encode()).decode()
    return f"![{alt}](data:image/svg+xml;base64,{data})"


class JobBoard:
    """Publishes the live job table and the timeline as statuses change, rate-limited.

    At most one publication every `min_interval` seconds; a change inside the interval is
    published when it ends (a trailing timer), and `close()` publishes the final state once.
    """

    def __init__(
        self,
        run_name: str,
        store: Any,
        shards: Sequence[Any],
        max_attempts: int,
        gate_size: int,
        flow_run_id: UUID | None = None,
        cost_of: CostOf | None = None,
        min_interval: float = 5.0,
        table: Callable[[list[dict[str, Any]], str, UUID | None, str], None] = _publish_table,
        markdown: Callable[[str, str, UUID | None], None] = _publish_markdown,
    ) -> None:
        self.run_name = run_name
        self.store = store
        self.shards = [(s.name, s.records) for s in shards]
        self.max_attempts = max_attempts
        self.gate_size = gate_size
        self.flow_run_id = flow_run_id
        self.cost_of = cost_of
        # A bigger table is sent less often: 5 s up to 500 shards, then 1 s per 100 shards.
        self.min_interval = max(min_interval, len(self.shards) / 100)
        self._table, self._markdown = table, markdown
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._timer: threading.Timer | None = None
        self._closed = False  # the last publication says the table is final, not live
        self.samples: list[Sample] = []
        self.published = 0

    def views(self) -> list[ShardView]:
        """A copy of every shard's state (attempts are appended from other threads)."""
        return [ShardView.of(n, r, self.store.state.shards.get(n)) for n, r in self.shards]

    def _sample(self, views: Sequence[ShardView]) -> None:
        records = sum(
            v.records if v.merge_stats else v.attempts[0].counters.get("processedRecordCount", 0)
            for v in views
            if v.attempts
        )
        tokens = sum(
            ((v.merge_stats or {}).get("input_tokens") or 0)
            + ((v.merge_stats or {}).get("output_tokens") or 0)
            for v in views
        )
        now = datetime.now(timezone.utc)
        if not self.samples:
            self.samples.append(Sample(now, 0, 0))
        self.samples.append(Sample(now, records, tokens))
        if len(self.samples) > 2 * MAX_TIMELINE_SAMPLES:
            self.samples[:] = thin(self.samples)

    def changed(self) -> None:
        """A job moved: publish now or when the interval ends (sampled when published).

        Reading every shard's state costs O(shards), so it happens once per publication,
        never once per change: at 2,000 shards a change per change would be quadratic.
        """
        with self._lock:
            wait = self._last + self.min_interval - time.monotonic()
            if wait <= 0:
                self._last = time.monotonic()
            elif self._timer is None:
                # Keep the run context: the artifact belongs to this flow run.
                context = contextvars.copy_context()
                self._timer = threading.Timer(wait, context.run, (self._trailing,))
                self._timer.daemon = True
                self._timer.start()
                return
            else:
                return
        self.publish()

    def _trailing(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        self.publish()

    def close(self) -> None:
        """The run ended: publish the final table and timeline once."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._closed = True
        self.publish()

    def publish(self) -> None:
        """Publish the table and the timeline now; a failure is logged, never fails the run."""
        try:
            self._publish()
        except Exception as exc:  # the UI's view must not stop a run that spends money
            logging.getLogger(__name__).warning(
                "Could not publish the job table of %s: %s", self.run_name, exc
            )

    def _publish(self) -> None:
        views = self.views()
        with self._lock:
            self._sample(views)
        rows = job_rows(views, self.max_attempts, self.cost_of)
        description = "Bedrock jobs (final)" if self._closed else "Bedrock jobs (live)"
        self._table(rows, artifact_key(self.run_name, "jobs"), self.flow_run_id, description)
        now = datetime.now(timezone.utc)
        bars = job_bars(views)
        samples = list(self.samples)
        markdown = "\n\n".join(
            [
                f"# Timeline of `{self.run_name}`",
                svg_image(timeline_svg(bars, samples, now, self.gate_size)),
                timeline_markdown(bars, samples, now, self.gate_size),
            ]
        )
        self._markdown(markdown, artifact_key(self.run_name, "timeline"), self.flow_run_id)
        self.published += 1


def flow_run_name(raw: Any) -> str:
    """The flow run's name from its parameters: the given run_name, else a provisional one.

    The default run name needs the source's fingerprint (hashing files, S3 HEADs, the Hub), too
    slow for a name callable; the flow renames the run once `resolve_run` knows it.
    """
    params = raw.model_dump() if hasattr(raw, "model_dump") else dict(raw or {})
    label = params.get("prompt_id") or "embed"
    if params.get("run_name"):
        from tasks.errors import RunSettingsError
        from tasks.run.layout import expand_run_name

        try:
            return expand_run_name(params["run_name"])
        except RunSettingsError:
            # Raised here, in Prefect's run setup, it crashed the flow run with "Process
            # exited with status code: 1"; `resolve_run` raises it in the flow, a Failed run
            # with the one-line reason.
            return f"{label}-bad-run-name"
    return f"{label}-resolving-name"


def rename_flow_run(flow_run_id: UUID | None, current: str | None, run_name: str) -> None:
    """Give the flow run the batch run's name, so the UI can be searched by run."""
    if flow_run_id is None or current == run_name:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, name=run_name)
