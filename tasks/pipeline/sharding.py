"""Cut records into job shards within the Bedrock batch quotas."""

from __future__ import annotations

import math

import numpy as np

from tasks.errors import ShardingError, TooFewRecordsError

_QUOTA_HINT = (
    "The quotas are settings: BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB, "
    "BEDROCK_BATCH_QUOTA_MAX_RECORDS_PER_JOB, BEDROCK_BATCH_QUOTA_MAX_FILE_BYTES."
)


def shard_count(n: int, *, min_records: int, max_records: int, target_jobs: int) -> int:
    """How many shards spread `n` records over about `target_jobs`, each in [min, max] records."""
    if n < min_records:
        msg = (
            f"Only {n} records to send, but a Bedrock batch job needs at least {min_records} "
            "(a per-model quota; 1,000 on older accounts). Add rows, or if your account's quota "
            "is lower set BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB."
        )
        raise TooFewRecordsError(msg)
    fewest = math.ceil(n / max_records)
    most = n // min_records
    if fewest > most:
        msg = (
            f"{n} records cannot be cut into jobs of {min_records} to {max_records} records. "
            + _QUOTA_HINT
        )
        raise ShardingError(msg)
    return min(max(math.ceil(n / math.ceil(n / max(target_jobs, 1))), fewest), most)


def even_bounds(n: int, k: int) -> np.ndarray:
    """k+1 boundaries cutting n records into k runs whose sizes differ by at most one."""
    return (np.arange(k + 1, dtype=np.int64) * n) // k


def cut_shards(
    line_bytes: np.ndarray,
    *,
    min_records: int,
    max_records: int,
    max_bytes: int,
    target_jobs: int,
) -> list[tuple[int, int]]:
    """[start, end) record ranges: sizes within [min, max] records and at most `max_bytes` each.

    Records are spread evenly over about `target_jobs` shards; where a byte limit forces
    smaller shards they are cut greedily, and a tail under the minimum is rebalanced with the
    shard before it.
    """
    n = int(len(line_bytes))
    k = shard_count(n, min_records=min_records, max_records=max_records, target_jobs=target_jobs)
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(line_bytes, out=cum[1:])
    bounds = even_bounds(n, k)
    if int(np.max(cum[bounds[1:]] - cum[bounds[:-1]])) <= max_bytes:
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return _cut_by_bytes(cum, math.ceil(n / k), min_records, max_records, max_bytes)


def _cut_by_bytes(
    cum: np.ndarray, size: int, min_records: int, max_records: int, max_bytes: int
) -> list[tuple[int, int]]:
    n = len(cum) - 1
    shards: list[tuple[int, int]] = []
    start = 0
    while start < n:
        by_bytes = int(np.searchsorted(cum, cum[start] + max_bytes, side="right")) - 1
        end = min(start + size, n, by_bytes)
        if end <= start:
            msg = (
                f"Record {start} alone is {int(cum[start + 1] - cum[start])} bytes, over the "
                f"{max_bytes}-byte file limit. " + _QUOTA_HINT
            )
            raise ShardingError(msg)
        shards.append((start, end))
        start = end
    if len(shards) > 1 and shards[-1][1] - shards[-1][0] < min_records:
        (a, _), (_, b) = shards[-2], shards[-1]
        if b - a <= max_records and cum[b] - cum[a] <= max_bytes:
            shards[-2:] = [(a, b)]
        else:
            # Split the last two so both halves hold at least the minimum and fit the bytes.
            lo = max(a + min_records, int(np.searchsorted(cum, cum[b] - max_bytes, side="left")))
            hi = min(b - min_records, int(np.searchsorted(cum, cum[a] + max_bytes, "right")) - 1)
            if lo > hi:
                msg = _too_big(min_records, max_bytes)
                raise ShardingError(msg)
            mid = min(max((a + b) // 2, lo), hi)
            shards[-2:] = [(a, mid), (mid, b)]
    small = [s for s in shards if s[1] - s[0] < min_records]
    if small:
        raise ShardingError(_too_big(min_records, max_bytes))
    return shards


def _too_big(min_records: int, max_bytes: int) -> str:
    return (
        f"The records are too large to put {min_records} of them (the per-job minimum) in one "
        f"file of at most {max_bytes} bytes. Shorten the prompts or raise the quota. " + _QUOTA_HINT
    )
