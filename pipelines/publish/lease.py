"""One writer per output: ``OUTPUT/_lease.json``, held by the running job, with owner and expiry.

A run creates the lease with an exclusive write (O_EXCL on local disks, a conditional PUT on S3), renews
it from a heartbeat thread while it runs, checks it is still its own just before it commits, and deletes
it at the end. A second run on the same output finds a live lease and refuses with the owner's name.

A lease is stale, and taken over, when it has expired (its owner stopped renewing it: crashed, killed,
lost its node), or at once when its owner ran on this same host and that process no longer exists.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from operators.errors import FeatxError, PipelineError, StorageError
from operators.faults import active as failpoints_active
from operators.io.storage import create_exclusive, delete, join, read_bytes, write_bytes

LEASE = "_lease.json"


class OutputBusyError(FeatxError):
    """Another live run holds the output."""


class LeaseLostError(OutputBusyError, PipelineError):
    """This run's lease expired and another run took it: the run publishes nothing (a rerun may succeed)."""


@dataclass
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    user: str
    acquired: float
    expires: float

    def describe(self) -> str:
        left = self.expires - time.time()
        return (f"run {self.run_id} (pid {self.pid} on {self.host}, user {self.user}), started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired))}, lease expires in {left:.0f} s")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(info: LeaseInfo, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if info.expires <= now:
        return True
    return info.host == socket.gethostname() and info.pid != os.getpid() and not _pid_alive(info.pid)


def read_lease(output: str, storage_options: dict[str, Any] | None = None) -> LeaseInfo | None:
    raw = read_bytes(join(output, LEASE), storage_options)
    if raw is None:
        return None
    try:
        return LeaseInfo(**json.loads(raw))
    except (ValueError, TypeError):  # a torn or foreign file: treat as expired
        return LeaseInfo(run_id="unknown", host="?", pid=0, user="?", acquired=0.0, expires=0.0)


class Lease:
    """Hold ``OUTPUT/_lease.json`` for one run; use as a context manager."""

    def __init__(self, output: str, run_id: str, ttl_s: float, storage_options: dict[str, Any] | None = None):
        self.output, self.run_id, self.ttl_s = output, run_id, float(ttl_s)
        self.storage_options = storage_options or {}
        self.uri = join(output, LEASE)
        self.lost: str | None = None  # why the lease is no longer ours, if it is not
        self.taken_over: LeaseInfo | None = None  # the stale lease this run replaced
        self.renewals = 0  # heartbeats that extended the lease (a run longer than its TTL needs them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: LeaseInfo | None = None

    def _new_info(self) -> LeaseInfo:
        now = time.time()
        return LeaseInfo(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(), user=getpass.getuser(),
                         acquired=self._info.acquired if self._info else now, expires=now + self.ttl_s)

    def acquire(self) -> "Lease":
        for _ in range(3):
            info = self._new_info()
            if create_exclusive(self.uri, json.dumps(asdict(info)).encode(), self.storage_options):
                current = read_lease(self.output, self.storage_options)  # stores without conditional writes
                if current is not None and current.run_id == self.run_id:
                    self._info = info
                    self._start_heartbeat()
                    return self
            holder = read_lease(self.output, self.storage_options)
            if holder is None:
                continue  # released between our try and our read: try again
            if holder.run_id == self.run_id:  # our create went through but its answer was lost; the retry saw it
                self._info = info
                self._start_heartbeat()
                return self
            if not is_stale(holder):
                raise OutputBusyError(
                    f"output {self.output!r} is being written by {holder.describe()}. Only one run may write an "
                    "output at a time: wait for it to finish (featx status shows its progress). If that run is "
                    f"dead, its lease expires by itself; to take over now, delete {self.uri}."
                )
            self.taken_over = holder
            delete([self.uri], self.storage_options)
        raise OutputBusyError(f"could not take the lease {self.uri}: other runs keep taking it; try again later")

    def check(self) -> None:
        """Raise unless this run still holds the lease (called just before commit)."""
        if self.lost:
            raise self._lost_error()
        holder = read_lease(self.output, self.storage_options)
        if holder is None or holder.run_id != self.run_id:
            self.lost = f"now held by {holder.describe()}" if holder else "the lease file was removed"
            raise self._lost_error()

    def _lost_error(self) -> "LeaseLostError":
        return LeaseLostError(f"this run lost its lease on {self.output!r} ({self.lost}); nothing was published. Its "
                              "lease expired unrenewed (a stalled driver, or storage refusing the renewals); the "
                              "finished pieces are journalled: rerun, and they are adopted")

    def renew(self) -> None:
        if failpoints_active("lease-stop"):  # kill tests: a heartbeat that never gets through
            return
        holder = read_lease(self.output, self.storage_options)
        if holder is None or holder.run_id != self.run_id:
            self.lost = f"now held by {holder.describe()}" if holder else "the lease file was removed"
            return
        self._info = self._new_info()
        write_bytes(self.uri, json.dumps(asdict(self._info)).encode(), self.storage_options)
        self.renewals += 1

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(max(1.0, self.ttl_s / 4)):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again (expiry is ttl away)
                    continue

        self._thread = threading.Thread(target=beat, name="featx-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the lease back. A storage failure here is not the run's: the lease then expires by its TTL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = read_lease(self.output, self.storage_options)
            if holder is not None and holder.run_id == self.run_id:
                delete([self.uri], self.storage_options)
        except StorageError:
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
