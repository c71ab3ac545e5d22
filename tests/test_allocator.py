"""The CLI's allocator options reach jemalloc, as jemalloc itself reports them.

Each case starts a real interpreter that sets the options as `bedrock-batch` does, then loads
Polars with jemalloc's `stats_print` on, and reads the options jemalloc settled on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from flows.cli import _ALLOCATOR, _POLARS_DEFAULT

_PROGRAM = f"""
import os
from flows.cli import tune_allocator
tune_allocator()
os.environ["{_ALLOCATOR}"] += ",stats_print:true"  # jemalloc's report at exit
import polars as pl
pl.DataFrame({{"a": [1]}}).sum()
"""


def _jemalloc_options(conf: str | None) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != _ALLOCATOR}
    if conf is not None:
        env[_ALLOCATOR] = conf
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True
    )
    found = dict(re.findall(r"opt\.(dirty_decay_ms|narenas): (-?\d+)", done.stderr))
    assert set(found) == {"dirty_decay_ms", "narenas"}, done.stderr[-2000:]
    return {k: int(v) for k, v in found.items()}


@pytest.mark.parametrize(
    "conf",
    [None, _POLARS_DEFAULT],  # nothing set; or handed down by a parent that had loaded Polars
)
def test_the_cli_keeps_freed_pages_with_one_arena_a_core(conf):
    assert _jemalloc_options(conf) == {"dirty_decay_ms": 5000, "narenas": os.cpu_count()}


def test_the_users_own_allocator_options_win():
    options = _jemalloc_options("dirty_decay_ms:2000")
    assert options["dirty_decay_ms"] == 2000
