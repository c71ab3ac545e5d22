"""The per-model gate: a Prefect global concurrency limit whose slots are held by leases."""

from __future__ import annotations

import threading

from prefect.client.orchestration import get_client

from tasks.run import gate


def test_ensure_gate_creates_then_resizes_the_model_limit():
    name = gate.ensure_gate("us.anthropic.claude-test-v1:0", 3)
    gate.ensure_gate("us.anthropic.claude-test-v1:0", 5)

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert name == "bedrock-batch-us-anthropic-claude-test-v1-0"
    assert limit.limit == 5


def test_slot_lease_renews_until_released_then_is_gone():
    name = gate.ensure_gate("gate-test.renew-v1", 2)

    lease = gate.acquire_slot(name, lease_seconds=60)

    assert gate.active_slots(name) == 1
    assert gate.renew_slot(lease, 120) is True
    gate.release_slot(lease)
    assert gate.active_slots(name) == 0
    # A lease the server no longer knows (expired or released) cannot be renewed.
    assert gate.renew_slot(lease, 120) is False
    gate.release_slot(lease)  # releasing twice is harmless


def test_acquire_slot_waits_while_the_gate_is_full():
    name = gate.ensure_gate("gate-test.full-v1", 1)
    first = gate.acquire_slot(name, lease_seconds=60)
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(gate.acquire_slot(name, 60)))

    waiter.start()
    waiter.join(timeout=2)
    still_waiting = waiter.is_alive()
    gate.release_slot(first)
    waiter.join(timeout=30)

    assert still_waiting
    assert len(taken) == 1
    assert gate.active_slots(name) == 1
    gate.release_slot(taken[0])
