"""pytest plugin: a session-wide local stack (`bedrock_local_stack`) for other projects' tests.

Enable it with `pytest_plugins = ["emulator.pytest_plugin"]` in a conftest.py.
"""

from __future__ import annotations

import os

import pytest

from .stack import LocalStack


@pytest.fixture(scope="session")
def bedrock_local_stack():
    """moto S3/CloudWatch and the Bedrock emulator; the process env points at them."""
    saved = dict(os.environ)
    with LocalStack() as stack:
        os.environ.update(stack.env)
        try:
            yield stack
        finally:
            os.environ.clear()
            os.environ.update(saved)
