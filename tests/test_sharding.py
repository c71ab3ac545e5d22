"""Cutting records into job shards within the quotas."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import ShardingError, TooFewRecordsError
from tasks.pipeline.sharding import cut_shards, shard_count


def sizes(shards):
    return [b - a for a, b in shards]


def cut(n, *, line=10, min_records=100, max_records=50_000, max_bytes=10**9, target_jobs=10):
    return cut_shards(
        np.full(n, line, dtype=np.int64),
        min_records=min_records,
        max_records=max_records,
        max_bytes=max_bytes,
        target_jobs=target_jobs,
    )


def test_cut_shards_spreads_rows_over_gate_without_going_under_minimum():
    assert sizes(cut(250, target_jobs=3)) == [125, 125]


def test_cut_shards_spreads_evenly_over_target_jobs():
    assert sizes(cut(1000, target_jobs=4)) == [250, 250, 250, 250]


def test_cut_shards_covers_every_record_once_in_order():
    shards = cut(1234, target_jobs=5)
    assert shards[0][0] == 0 and shards[-1][1] == 1234
    assert all(prev[1] == nxt[0] for prev, nxt in zip(shards, shards[1:], strict=False))


def test_cut_shards_exactly_minimum_is_one_shard():
    assert sizes(cut(100)) == [100]


def test_cut_shards_exactly_maximum_is_one_shard():
    assert sizes(cut(500, max_records=500, target_jobs=1)) == [500]


def test_cut_shards_one_over_maximum_rebalances_into_two():
    assert sizes(cut(501, max_records=500, target_jobs=1)) == [250, 251]


def test_cut_shards_explicit_max_records_fills_shards_to_it():
    assert sizes(cut(2_200_000, max_records=50_000, target_jobs=1)) == [50_000] * 44


def test_cut_shards_under_minimum_explains_quota_and_setting():
    with pytest.raises(TooFewRecordsError) as exc:
        cut(99)
    assert "99 records" in str(exc.value)
    assert "at least 100" in str(exc.value)
    assert "BEDROCK_BATCH_QUOTA_MIN_RECORDS_PER_JOB" in str(exc.value)


def test_cut_shards_byte_limit_splits_shards():
    shards = cut(300, line=10, max_bytes=1000, target_jobs=1)
    assert max(sizes(shards)) <= 100
    assert sum(sizes(shards)) == 300


def test_cut_shards_byte_limit_rebalances_small_tail():
    # 1,000 bytes per file holds 100 records; 250 records would leave a tail of 50.
    shards = cut(250, line=10, min_records=60, max_bytes=1000, target_jobs=1)
    assert sizes(shards) == [100, 75, 75]


def test_cut_shards_byte_limit_merges_tail_when_it_fits():
    shards = cut(230, line=10, min_records=40, max_records=200, max_bytes=2000, target_jobs=1)
    assert all(40 <= s <= 200 for s in sizes(shards))
    assert sum(sizes(shards)) == 230


def test_cut_shards_records_too_big_for_minimum_per_file_fail():
    with pytest.raises(ShardingError) as exc:
        cut(500, line=100, min_records=100, max_bytes=5000, target_jobs=1)
    assert "BEDROCK_BATCH_QUOTA_MAX_FILE_BYTES" in str(exc.value)


def test_shard_count_impossible_quotas_fail_with_settings():
    with pytest.raises(ShardingError, match="BEDROCK_BATCH_QUOTA_MAX_RECORDS_PER_JOB"):
        shard_count(160, min_records=100, max_records=150, target_jobs=1)
