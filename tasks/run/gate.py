"""The maxConcurrentJobs gate: one Prefect global concurrency limit per model, held by leases.

A Bedrock job lives up to a week, far longer than one lease, so a slot is held by a lease that
the poller renews; the lease id is stored with the job so that a resumed run can renew it, or
take a new one when it expired while nothing was running.
"""

from __future__ import annotations

import logging
import re
import time
from uuid import UUID

from httpx import HTTPStatusError
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder

# Prefect's server bounds a lease to 60 s .. 1 day.
MIN_LEASE_SECONDS = 60
MAX_LEASE_SECONDS = 86_400


def gate_name(model_id: str) -> str:
    """The limit's name for a model: Bedrock's job quota is per model and region."""
    return "bedrock-batch-" + re.sub(r"[^a-zA-Z0-9-]+", "-", model_id).strip("-").lower()


def ensure_gate(model_id: str, max_concurrent_jobs: int) -> str:
    """Create the model's limit, or resize it to ``max_concurrent_jobs``; returns its name."""
    if max_concurrent_jobs < 1:
        msg = f"max_concurrent_jobs must be at least 1, got {max_concurrent_jobs}."
        raise ValueError(msg)
    name = gate_name(model_id)
    with get_client(sync_client=True) as prefect:
        prefect.upsert_global_concurrency_limit_by_name(name, max_concurrent_jobs)
    return name


def _lease_seconds(seconds: float) -> float:
    return float(min(max(seconds, MIN_LEASE_SECONDS), MAX_LEASE_SECONDS))


def acquire_slot(
    name: str,
    lease_seconds: float,
    holder_flow_run_id: UUID | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> UUID:
    """Wait until the gate has a free slot and take it with a lease; returns the lease id."""
    holder = (
        ConcurrencyLeaseHolder(type="flow_run", id=holder_flow_run_id)
        if holder_flow_run_id
        else None
    )
    waited_since: float | None = None
    with get_client(sync_client=True) as prefect:
        while True:
            try:
                response = prefect.increment_concurrency_slots_with_lease(
                    names=[name],
                    slots=1,
                    mode="concurrency",
                    lease_duration=_lease_seconds(lease_seconds),
                    holder=holder,
                )
            except HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                if waited_since is None:
                    waited_since = time.monotonic()
                    if logger:
                        logger.info("Gate %s is full; waiting for a job to finish", name)
                # The server says when a slot may be free; honour it (bounded for responsiveness).
                retry_after = float(exc.response.headers.get("Retry-After", 1.0))
                time.sleep(min(max(retry_after, 0.1), 30.0))
                continue
            if waited_since is not None and logger:
                logger.info("Took a slot of %s after %.1f s", name, time.monotonic() - waited_since)
            return UUID(response.json()["lease_id"])


def renew_slot(lease_id: UUID | str, lease_seconds: float) -> bool:
    """Extend a lease; False when the server no longer knows it (it expired)."""
    with get_client(sync_client=True) as prefect:
        try:
            prefect.renew_concurrency_lease(UUID(str(lease_id)), _lease_seconds(lease_seconds))
        except HTTPStatusError as exc:
            if exc.response.status_code in (404, 410):
                return False
            raise
    return True


def release_slot(lease_id: UUID | str) -> None:
    """Give the slot back; a lease that already expired is fine."""
    with get_client(sync_client=True) as prefect:
        try:
            prefect.release_concurrency_slots_with_lease(UUID(str(lease_id)))
        except HTTPStatusError as exc:
            if exc.response.status_code not in (404, 410):
                raise


def active_slots(name: str) -> int:
    """How many slots of the gate are taken now."""
    with get_client(sync_client=True) as prefect:
        return prefect.read_global_concurrency_limit_by_name(name).active_slots
