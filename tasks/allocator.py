"""Memory allocator settings of a run's process: Polars' jemalloc and the C library's malloc.

Neither imports Polars: jemalloc reads its options once, when Polars loads.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Polars' allocator (jemalloc) hands freed pages back to the kernel within a second (Polars sets
# dirty_decay_ms:500 in polars/__init__.py), so every shard's frames fault theirs in again: the
# 550k-row merge spent 3.2 of its 10 CPU s in the kernel. Keeping freed pages 5 s halves that;
# memory still follows the shard, not the run. jemalloc's default of 4 arenas a core spreads
# the frames of Polars' threads over many arenas, each keeping its own freed pages: one arena a
# core took the 2.2M-row merge from 9.3-9.9 s to 8.5-8.75 s and its peak RSS from ~1,000 MB to
# ~700 MB (2 cores). Polars writes its default into the environment, so a parent that
# imported Polars hands it down: that one is replaced, a user's own is kept.
JEMALLOC_CONF = "_RJEM_MALLOC_CONF"
POLARS_DEFAULT = "dirty_decay_ms:500,muzzy_decay_ms:1000"

# Everything Python allocates outside Polars (job outputs read from S3, HTTP bodies, Prefect's
# own objects) comes from the C library's malloc. glibc gives each new thread an arena of its
# own up to 8 a core (mallopt(3), M_ARENA_MAX), and a run has a thread a shard in flight: the
# memory a merge freed stays in its thread's arena. Python allocates under the GIL, so more
# arenas buy no parallelism. Measured on 20 jobs of 25,000 records ending together (2 cores,
# `benchmarks.bench_orchestration --scenario refill --shards 20 --records-per-job 25000 --gate
# 20 --pace-seconds 20`), peak RSS: glibc's default 1,129-1,343 MB, 2 arenas 576-691 MB (a
# fixed 1 MB MALLOC_MMAP_THRESHOLD_ instead: 595-674 MB). 800 shards of 100 records at gate
# 100: 445-826 MB with 2 arenas, 483-624 MB without, the same within this run-to-run spread.
# Only the flow sets it: `bedrock-batch merge` has three Python threads, and its 2.2M-row peak
# was 727-850 MB with 2 arenas or without.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h
_USER_ARENAS = "MALLOC_ARENA_MAX"  # read by glibc itself at start-up


def jemalloc_conf() -> str:
    return f"dirty_decay_ms:5000,muzzy_decay_ms:5000,narenas:{os.cpu_count() or 1}"


def tune_jemalloc() -> None:
    """Set Polars' allocator options, unless the user set their own; before Polars loads."""
    if os.environ.get(JEMALLOC_CONF, POLARS_DEFAULT) == POLARS_DEFAULT:
        os.environ[JEMALLOC_CONF] = jemalloc_conf()


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let glibc's malloc make at most ``arenas`` arenas, for the threads started from now on.

    Kept as it is when the user set MALLOC_ARENA_MAX, or where malloc is not glibc's (macOS,
    musl). Returns whether the cap was set.
    """
    if _USER_ARENAS in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(_M_ARENA_MAX, arenas) == 1
