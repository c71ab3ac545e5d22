"""Session-wide fixtures: one Prefect test server and one local AWS stack for the whole suite."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Events become readable after the persister's flush (5 s by default); tests wait on them.
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")


def pytest_collection_modifyitems(items):
    """Slow tests first (stable, so files keep their order): with `make test`'s workers taking
    one test at a time, the long end-to-end runs start early side by side and the short tests
    fill in around them, instead of one 90 s test starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One Prefect test server per session; flow heartbeats off so a small flow takes ~0.2 s."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        prefect_test_harness(server_startup_timeout=60),
    ):
        yield


# The emulator's own plugin starts moto and the Bedrock emulator (`bedrock_local_stack`);
# `local_stack` below only adds what this project needs on top.
pytest_plugins = ["emulator.pytest_plugin"]

# The project's poll back-off in tenths of a second: the emulator answers at once. The cost
# estimate's CountTokens sample is 20 records, not 200: the suite makes ~200 runs, and 200
# calls cost a run ~0.85 s of CPU (the CLI and the emulator); the tests of the sample itself
# set their own size.
TEST_ENV = {
    "BEDROCK_BATCH_POLL_CREATE_BACKOFF_SECONDS": "0.1",
    "BEDROCK_BATCH_POLL_MAX_INTERVAL_SECONDS": "1",
    "BEDROCK_BATCH_COST_SAMPLE_RECORDS": "20",
}


@pytest.fixture(scope="session")
def local_stack(bedrock_local_stack):
    """The emulator plugin's stack, with the project's settings and clients pointed at it."""
    from tasks.aws.clients import reset_clients
    from tasks.settings import get_settings

    saved = {name: os.environ.get(name) for name in TEST_ENV}
    os.environ.update(TEST_ENV)
    get_settings.cache_clear()
    reset_clients()
    try:
        yield bedrock_local_stack
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
        reset_clients()


@pytest.fixture
def stack(local_stack):
    """The shared local stack, with faults and emulator config put back after the test."""
    yield local_stack
    local_stack.reset_faults()


@pytest.fixture
def environment():
    """Set the process environment for a test; the original comes back afterwards."""
    from tasks.aws.clients import reset_clients
    from tasks.settings import get_settings

    saved = dict(os.environ)

    def apply(values: dict[str, str]) -> None:
        os.environ.update(values)
        get_settings.cache_clear()
        reset_clients()

    try:
        yield apply
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        reset_clients()


@pytest.fixture
def own_prefect_server(tmp_path):
    """A Prefect server of the test's own (``helpers.PrefectServer``), stopped afterwards."""
    from helpers import PrefectServer

    server = PrefectServer(tmp_path / "prefect-home")
    server.home.mkdir()
    server.start()
    yield server
    server.stop()
