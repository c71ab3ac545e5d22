"""Helpers shared by the tests: waiting on a condition with a deadline instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "the condition",
    fail: bool = True,
) -> T:
    """Call ``probe`` until it returns something truthy and return that value.

    Servers (Prefect's event persister, the emulator, moto) make results visible a little after
    the call that caused them; tests wait for the result itself, bounded by ``timeout``. After
    the deadline the last value is returned when ``fail`` is False (the caller asserts on it),
    else the test fails naming ``what`` it waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            if fail:
                msg = f"{what} did not happen within {timeout:.0f} s (last value: {value!r})"
                raise AssertionError(msg)
            return value
        time.sleep(interval)
