"""Crash points for the fault-injection suite: the process SIGKILLs itself where it is told.

``BEDROCK_BATCH_KILL_AT=<point>`` makes the run die, with no cleanup, at that point, so tests
can prove a re-run with the same run name finishes without paying for any shard twice.
"""

from __future__ import annotations

import os
import signal

ENV = "BEDROCK_BATCH_KILL_AT"
POINTS = (
    "preprocess",  # shards written, not yet on S3
    "inputs-uploaded",  # shards on S3, rows and plan not yet (s3:// output)
    "after-create",  # CreateModelInvocationJob answered, its ARN not yet recorded
    "polling",  # a job seen running
    "merge",  # a part written, not yet recorded as merged
    "on-demand",  # the first batch of an on-demand remainder kept, the rest not yet served
    "finish",  # every part merged, the run not yet marked finished
)


def failpoint(point: str) -> None:
    """Die here if the environment asks for it."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
