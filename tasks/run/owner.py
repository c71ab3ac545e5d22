"""One owner per run: a claim object written by compare-and-swap and refreshed by a heartbeat.

Why this mechanism: the claim has to hold for s3:// and local outputs alike, across hosts, and
whatever Prefect server (or none, with a fresh database) each process talks to. S3 conditional
writes give an atomic compare-and-swap on an object beside the run itself, with no other
service: ``If-None-Match: *`` creates the claim only if there is none, ``If-Match: <ETag>``
refreshes it, takes over a stale one and deletes it at the end; a local run folder gets the same
three operations under an ``flock`` (tasks.aws.storage). A Prefect concurrency limit of 1 would
bind the claim to one Prefect server and its lease storage (the server forgets in-memory leases
on restart), and a DynamoDB lock would add a table to create and grant.

A live owner rewrites the claim every quarter of the expiry. A process that finds a claim
watches it: if it changes, its owner is alive and the process is refused, naming the owner; if
it stays unchanged for the expiry (the owner crashed), the claim is taken over. An owner that
ran on this same machine is asked about directly: when its process is gone (a SIGKILL, the OOM
killer), the claim is taken over at once instead of after the expiry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.aws import storage
from tasks.errors import RunOwnedError
from tasks.run.layout import OWNER_FILE, RunLayout
from tasks.run.state import now_iso
from tasks.settings import OwnerSettings, read_now

EXPIRY_ENV = "BEDROCK_BATCH_OWNER_EXPIRY_SECONDS"

log = logging.getLogger(__name__)


def expiry_seconds() -> float:
    """How long an unrefreshed claim stands (``BEDROCK_BATCH_OWNER_EXPIRY_SECONDS``, 60 s).

    A value that is no positive number is one line naming it (RunSettingsError), as for every
    other setting: ``float()`` of it ended the run with a ValueError traceback.
    """
    return read_now(OwnerSettings).expiry_seconds


def _process(pid: int) -> dict[str, Any] | None:
    """Who ``pid`` is on this machine: boot id, PID namespace and start time (Linux /proc).

    The three together name one process for good: a PID is reused after its process ends (a
    different start time), and the same number in another container or after a reboot is
    another process (a different namespace or boot id). None where /proc is not there (macOS,
    Windows) or the process is gone.
    """
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
        # proc(5): fields 3 on follow the command name, which is in parentheses and may
        # itself hold spaces or parentheses; field 3 is the state, 22 the start time in clock
        # ticks after boot.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: it runs no more
        return None
    return {"boot_id": boot_id, "pid_ns": pid_ns, "start_ticks": start_ticks}


def _gone_from_this_machine(holder: dict[str, Any]) -> bool:
    """Whether the claim's owner ran on this machine and its process no longer runs.

    False whenever that is not certain (another machine, container or boot, no /proc, an
    older claim without the process): the claim is then watched for the whole expiry.
    """
    theirs, pid = holder.get("process"), holder.get("pid")
    ours = _process(os.getpid())
    if not isinstance(theirs, dict) or not isinstance(pid, int) or ours is None:
        return False
    if (theirs.get("boot_id"), theirs.get("pid_ns")) != (ours["boot_id"], ours["pid_ns"]):
        return False
    now = _process(pid)
    return now is None or now["start_ticks"] != theirs.get("start_ticks")


def holder_of(run_dir: str) -> dict[str, Any] | None:
    """Who holds the run's claim now (its ``owner.json``); None when nobody does."""
    current = storage.read_tagged(storage.join(run_dir, OWNER_FILE))
    holder = None if current is None else _parsed_claim(current.data)
    return None if holder is None else {**holder, "refreshed_at": current.modified}


def live_holder_elsewhere(run_dir: str) -> dict[str, Any] | None:
    """The claim's holder when it is another process that looks alive, else None.

    Alive: refreshed within its expiry by the store's clock, and, when it ran on this
    machine, its process still there. A wrong "alive" only leaves its gate slots to expire
    with their leases; a wrong "dead" would free slots a live run still hands to its shards.
    """
    holder = holder_of(run_dir)
    if holder is None or (
        holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    ):
        return None
    expiry = holder.get("expiry_seconds")
    if not isinstance(expiry, (int, float)) or expiry <= 0:
        expiry = expiry_seconds()
    if time.time() - holder["refreshed_at"] > expiry or _gone_from_this_machine(holder):
        return None
    return holder


def _parsed_claim(data: bytes) -> dict[str, Any] | None:
    """The claim's JSON object; None when it is unreadable (cut, emptied, overwritten)."""
    try:
        holder = json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None
    return holder if isinstance(holder, dict) else None


def _holder(data: bytes) -> dict[str, Any]:
    """The claim's owner; an unreadable claim names nobody.

    Such a claim is watched like any other: a live owner rewrites it and is seen, one that
    stays unchanged for the expiry is taken over. Parsing it raised a JSON traceback instead.
    """
    holder = _parsed_claim(data)
    return {"host": "(an unreadable claim)"} if holder is None else holder


def owner_text(owner: dict[str, Any]) -> str:
    return (
        f"flow run {owner.get('flow_run_id') or '(none)'} on host {owner.get('host')} "
        f"(pid {owner.get('pid')}) since {owner.get('since')}"
    )


def _own_write(uri: str, body: bytes) -> str | None:
    """The claim's tag when it holds exactly ``body``, a write of ours whose answer was lost.

    botocore retries a PUT whose response timed out or came back 5xx; when S3 had applied it,
    the retry's If-Match names the old ETag and is refused (412), though the claim is ours.
    The body carries this claim's id and a fresh ``heartbeat_at``: no other process writes it.
    """
    current = storage.read_tagged(uri)
    return current.tag if current is not None and current.data == body else None


class RunClaim:
    """The claim this process holds on a run; a thread refreshes it until release."""

    def __init__(self, uri: str, owner: dict[str, Any], tag: str, expiry: float) -> None:
        self.uri = uri
        self.owner = owner
        self._tag = tag
        self._interval = expiry / 4
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="run-claim", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            body = json.dumps({**self.owner, "heartbeat_at": now_iso()}).encode()
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    tag = storage.put_if_match(self.uri, body, self._tag)
                    if tag is None:
                        tag = _own_write(self.uri, body)
                except Exception as exc:  # a transient store error must not end the heartbeat
                    log.warning("Could not refresh the claim %s (will retry): %s", self.uri, exc)
                    continue
                if tag is None:
                    self.lost.set()
                    log.error("The claim %s was taken by another process", self.uri)
                    return
                self._tag = tag

    def check(self) -> None:
        """Raise RunOwnedError if another process took the run over (this one stalled)."""
        if self.lost.is_set():
            msg = (
                f"This process lost its claim on the run ({self.uri}) to another process after "
                "not refreshing it in time; it stops before spending anything more."
            )
            raise RunOwnedError(msg)

    def release(self) -> None:
        """Stop refreshing and delete the claim if it is still ours."""
        with self._lock:
            self._stop.set()
            if not self.lost.is_set():
                storage.delete_if_match(self.uri, self._tag)
        self._thread.join(timeout=5)


def claim_run(
    layout: RunLayout,
    flow_run_id: Any = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> RunClaim:
    """Take the run's claim, or raise RunOwnedError naming the live owner.

    Args:
        layout: the run; the claim is ``layout.owner_uri``.
        flow_run_id: the Prefect flow run taking it, named in a refusal.
        logger: where to say that a claim is being watched.

    Returns:
        The held claim; call ``release()`` at the end of the run.
    """
    logger = logger or log
    expiry = expiry_seconds()
    owner = {
        "claim_id": uuid.uuid4().hex,
        "flow_run_id": str(flow_run_id) if flow_run_id else None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process": _process(os.getpid()),
        "since": now_iso(),
        "expiry_seconds": expiry,
    }
    body = json.dumps(owner).encode()
    seen: storage.Tagged | None = None
    stale_at = 0.0
    while True:
        tag = storage.put_if_absent(layout.owner_uri, body)
        if tag is not None:
            return RunClaim(layout.owner_uri, owner, tag, expiry)
        current = storage.read_tagged(layout.owner_uri)
        if current is None:
            continue  # released between the two calls
        if current.data == body:  # our own create, its answer lost and the retry refused
            return RunClaim(layout.owner_uri, owner, current.tag, expiry)
        holder = _holder(current.data)
        if seen is not None and current.tag != seen.tag:
            msg = (
                f"Run {layout.run_name!r} is already running: {owner_text(holder)} owns it "
                f"({layout.owner_uri}) and keeps its claim fresh. Wait for it to finish or stop "
                f"it; a claim left unrefreshed for {expiry:.0f} s (a crashed owner) is taken over."
            )
            raise RunOwnedError(msg)
        gone = _gone_from_this_machine(holder)
        if seen is None and not gone:
            seen = current
            # The whole expiry is watched from here, by this process's own clock: the store's
            # timestamp has one-second granularity and another host's clock may be skewed, so
            # the claim's age alone could take over from an owner that is alive but slow.
            stale_at = time.monotonic() + expiry
            logger.info(
                "Run %s is claimed by %s (refreshed %.0f s ago); watching it for %.0f s to see "
                "whether that owner is alive",
                layout.run_name,
                owner_text(holder),
                max(0.0, time.time() - current.modified),
                expiry,
            )
        if gone or time.monotonic() >= stale_at:
            tag = storage.put_if_match(layout.owner_uri, body, current.tag)
            if tag is not None:
                why = (
                    "that process no longer runs on this machine"
                    if gone
                    else f"its claim was not refreshed for {expiry:.0f} s"
                )
                logger.warning(
                    "Took over run %s from %s: %s", layout.run_name, owner_text(holder), why
                )
                return RunClaim(layout.owner_uri, owner, tag, expiry)
            continue  # someone else moved first: the next read tells who
        time.sleep(min(1.0, expiry / 8, max(0.05, stale_at - time.monotonic())))
