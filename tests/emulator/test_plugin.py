"""The emulator's pytest plugin: the project's fixtures build on it, and it stands alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_local_stack_is_the_plugin_stack(local_stack, bedrock_local_stack):
    assert local_stack is bedrock_local_stack
    assert os.environ["AWS_ENDPOINT_URL_BEDROCK"] == bedrock_local_stack.bedrock_url
    assert os.environ["BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS"] == "1"


def test_plugin_import_does_not_import_the_project_runtime():
    # The emulator reads the Bedrock facts (tasks.bedrock: the model catalog), nothing else:
    # not the project's settings, AWS clients, runs or flows.
    code = (
        "import sys, emulator.pytest_plugin; "
        "leaked = [m for m in sys.modules if m.startswith(('tasks.run', 'tasks.aws', "
        "'tasks.settings', 'tasks.pipeline', 'tasks.monitoring', 'flows'))]; "
        "sys.exit(f'plugin imported {leaked}' if leaked else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
