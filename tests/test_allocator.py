"""The allocator settings reach the allocators, as the allocators themselves report them.

Each case starts a real interpreter that sets the options as `bedrock-batch` and the flow do,
then reads what the allocator settled on: jemalloc's `stats_print` for Polars' allocator,
glibc's `malloc_stats` for the C library's malloc arenas.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tasks.allocator import JEMALLOC_CONF, MALLOC_ARENAS, POLARS_DEFAULT

_JEMALLOC_PROGRAM = f"""
import os
from tasks.allocator import tune_jemalloc
tune_jemalloc()
os.environ["{JEMALLOC_CONF}"] += ",stats_print:true"  # jemalloc's report at exit
import polars as pl
pl.DataFrame({{"a": [1]}}).sum()
"""

# Eight threads each malloc while all are alive, then glibc reports one block per arena.
_ARENAS_PROGRAM = """
import ctypes, sys, threading
from tasks.allocator import cap_malloc_arenas
print(cap_malloc_arenas() if sys.argv[1] == "cap" else None)
all_in, done = threading.Barrier(9), threading.Event()
def work():
    kept = bytearray(100_000)  # above pymalloc's sizes: malloc, in this thread's arena
    all_in.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
all_in.wait()
ctypes.CDLL(None).malloc_stats()  # to stderr
done.set()
"""


def _interpreter(program: str, variable: str, value: str | None, *args: str):
    """Run ``program`` in a new interpreter with ``variable`` set to ``value`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        env[variable] = value
    return subprocess.run(
        [sys.executable, "-c", program, *args], env=env, capture_output=True, text=True, check=True
    )


def _jemalloc_options(conf: str | None) -> dict[str, int]:
    done = _interpreter(_JEMALLOC_PROGRAM, JEMALLOC_CONF, conf)
    found = dict(re.findall(r"opt\.(dirty_decay_ms|narenas): (-?\d+)", done.stderr))
    assert set(found) == {"dirty_decay_ms", "narenas"}, done.stderr[-2000:]
    return {k: int(v) for k, v in found.items()}


@pytest.mark.parametrize(
    "conf",
    [None, POLARS_DEFAULT],  # nothing set; or handed down by a parent that had loaded Polars
)
def test_the_cli_keeps_freed_pages_with_one_arena_a_core(conf):
    assert _jemalloc_options(conf) == {"dirty_decay_ms": 5000, "narenas": os.cpu_count()}


def test_the_users_own_allocator_options_win():
    options = _jemalloc_options("dirty_decay_ms:2000")
    assert options["dirty_decay_ms"] == 2000


def _malloc_arenas(how: str, user_arenas: str | None = None) -> tuple[str, int]:
    done = _interpreter(_ARENAS_PROGRAM, "MALLOC_ARENA_MAX", user_arenas, how)
    return done.stdout.strip(), len(re.findall(r"^Arena \d+:", done.stderr, re.MULTILINE))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_run_caps_the_c_librarys_malloc_arenas_for_its_threads():
    assert _malloc_arenas("cap") == ("True", MALLOC_ARENAS)
    # Without the cap glibc gives each thread an arena of its own (up to 8 a core).
    _, arenas = _malloc_arenas("none")
    assert arenas >= 5 > MALLOC_ARENAS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_users_own_malloc_arena_max_wins():
    assert _malloc_arenas("cap", user_arenas="4") == ("False", 4)
