"""One run per output prefix: a lease object `OUTPUT/_lease.json` held by the running driver and refreshed by a
heartbeat. A second driver refuses while the lease is fresh and names its holder; a lease whose heartbeat is older
than its TTL (a crashed or killed driver elsewhere), or whose holder ran on this host and is gone, is taken over. Two
drivers starting in the same instant both write, wait, and read back: only the one that reads its own token goes on
(last writer wins), so at most one run writes. The wait can overlap other start-up work: `claim()` writes,
`confirm()` reads back once SETTLE_S has passed since the write (`acquire()` is both)."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from . import storage
from .layout import LEASE, Layout

logger = logging.getLogger(__name__)
SETTLE_S = 1.0  # wait between writing the lease and reading it back (S3 PUTs are strongly consistent)


class LeaseHeld(ValueError):
    """Another run holds the output prefix."""


def _read(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # unreadable: treat as stale
        return {}


def _dead_here(lease: dict) -> bool:
    """The holder ran on this host and its process is gone (a killed driver): no need to wait for the TTL."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def describe(lease: dict, now: float) -> str:
    return (f"run {lease.get('run', '?')} on {lease.get('host', '?')} (pid {lease.get('pid', '?')}), "
            f"last heartbeat {now - float(lease.get('heartbeat', 0)):.0f} s ago")


class Lease:
    """Acquire with `Lease(fs, root, run, ttl_s).acquire()`; `release()` at the end (also on errors)."""

    def __init__(self, fs, root: str, run: str, ttl_s: float):
        self.fs, self.root, self.run, self.ttl = fs, root, run, float(ttl_s)
        self.path = Layout(root).lease
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written = 0.0  # time.monotonic() of claim()'s write

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "run": self.run, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time(), "ttl_s": self.ttl}).encode()

    def _write(self) -> None:
        storage.put_bytes(self.fs, self._body(), self.path, self.root)

    def acquire(self) -> "Lease":
        return self.claim().confirm()

    def claim(self) -> "Lease":
        """Write the lease, unless a live run holds it (LeaseHeld); `confirm()` finishes taking it."""
        current = _read(self.fs, self.path)
        now = time.time()
        fresh = current and now - float(current.get("heartbeat", 0)) < float(current.get("ttl_s", self.ttl))
        if fresh and _dead_here(current):
            logger.warning("the run holding %s is gone (%s); taking its lease", self.path, describe(current, now))
        elif fresh:
            raise LeaseHeld(f"--output: another run is writing {storage.full_uri(self.fs, self.root)}: "
                            f"{describe(current, now)}; wait for it to end (its lease goes stale {self.ttl:.0f} s "
                            f"after its last heartbeat), or delete {LEASE} there if that run is dead")
        elif current is not None:
            logger.warning("taking over a stale lease of %s",
                           describe(current, now) if current else "an unreadable lease")
        self.fs.makedirs(self.root, exist_ok=True)
        self._write()
        self._written = time.monotonic()
        return self

    def confirm(self) -> "Lease":
        """Read the lease back SETTLE_S after `claim()` wrote it (waiting for what is left of that): another driver's
        token there means it wrote last and goes on (LeaseHeld here). Then the heartbeat starts."""
        time.sleep(max(0.0, self._written + SETTLE_S - time.monotonic()))
        back = _read(self.fs, self.path) or {}
        if back.get("token") != self.token:
            raise LeaseHeld(f"--output: another run started on {storage.full_uri(self.fs, self.root)} at the same "
                            f"moment: {describe(back, time.time())}")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write()
            except Exception:  # a missed beat is retried; the TTL leaves three more chances
                logger.warning("lease heartbeat failed", exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (_read(self.fs, self.path) or {}).get("token") == self.token:
                self.fs.rm(self.path)
        except Exception:  # a lease left behind goes stale by itself
            logger.warning("could not remove the lease %s", self.path, exc_info=True)
