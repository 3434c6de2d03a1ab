"""Failpoints: deterministic crash injection for the kill tests, inert unless ``FEATX_FAILPOINTS`` is set.

The publishing protocol promises exactly-once output whatever point a process dies at. To test that for
real (a real SIGKILL of a real process, not a mock), the protocol names its steps, and a test process
sets ``FEATX_FAILPOINTS`` in the environment of the ``featx`` command it starts:

- ``driver:<point>`` or ``driver:<point>@<n>``: the driver kills itself (SIGKILL) the n-th time (default 1st)
  it passes ``<point>`` (points: ``journal``, ``fill`` (the stream is done, pieces with rows held for another
  block's representative are not journalled), ``commit-before-move``, ``commit-mid-move``,
  ``commit-before-manifest``, ``commit-before-delta``).
- ``driver-pause:<point>:<seconds>``: the driver sleeps that long the first time it passes ``<point>`` (a test
  then acts while the run is certainly still running).
- ``driver-wait:<point>:<file>``: the driver waits at ``<point>`` until ``<file>`` exists (at most 300 s): the
  test decides when it goes on. Points include ``commit-start`` (before the commit checks the lease).
- ``lease-stop``: the lease's heartbeat stops renewing it (as a driver whose renewals all fail would).
- ``crash-key:<key>``: any worker process that is about to preprocess the record ``<key>`` kills itself,
  as a native decoder crash would, every time.
- ``hang-key:<key>``: any worker process that is about to preprocess the record ``<key>`` hangs there (sleeps
  until killed), as a decoder stuck on a pathological file would, every time.
- ``crash-embed-once:<key>``: the embedding actor that is about to embed ``<key>`` kills itself, the first
  time only (a marker file in the temp folder remembers it), as a lost worker or node would.
- ``actors-meet:<n>:<folder>``: each embedding actor holds its first block until ``n`` actors have each
  taken one (each leaves a file in ``<folder>``; at most 120 s), so a test sees every actor of a pool get work
  whatever the machine's speed: the pool hands the next block to an idle actor while the first one waits.
- ``drop-rows:<n>``: the sink silently drops the last ``n`` rows of every part it writes, as a bug between
  read and write would (the commit's row accounting must refuse to publish).

Several entries are separated by commas.

Nothing here runs when the variable is unset (one environment lookup per call).
"""
from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pyarrow as pa

ENV = "FEATX_FAILPOINTS"
_passed: dict[str, int] = {}


def _entries() -> list[str]:
    return [e.strip() for e in os.environ.get(ENV, "").split(",") if e.strip()]


def failpoint(point: str) -> None:
    """Kill this process here if a test asked for it."""
    if not os.environ.get(ENV):
        return
    _passed[point] = _passed.get(point, 0) + 1
    for e in _entries():
        if e.startswith("driver-pause:"):  # driver-pause:<point>:<seconds>: hold the driver there, the first time
            name, _, seconds = e[len("driver-pause:"):].partition(":")
            if name == point and _passed[point] == 1:
                time.sleep(float(seconds))
            continue
        if e.startswith("driver-wait:"):  # driver-wait:<point>:<file>: hold the driver until the file exists
            name, _, path = e[len("driver-wait:"):].partition(":")
            if name == point:
                deadline = time.monotonic() + 300
                while not os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.1)
            continue
        if not e.startswith("driver:"):
            continue
        name, _, nth = e[len("driver:"):].partition("@")
        if name == point and _passed[point] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def active(name: str) -> bool:
    """Whether a test switched on the flag-like failpoint ``name`` (e.g. ``lease-stop``)."""
    return bool(os.environ.get(ENV)) and name in _entries()


def crash_on_keys(keys: Iterable[str]) -> None:
    """Kill this worker process if it is about to process a record a test marked as a crasher; hang it forever
    if the record is marked as a hanger (only a deadline gets it out: operators/watchdog.py)."""
    if not os.environ.get(ENV):
        return
    keys = set(keys)
    bad = {e[len("crash-key:"):] for e in _entries() if e.startswith("crash-key:")}
    if bad and not bad.isdisjoint(keys):
        os.kill(os.getpid(), signal.SIGKILL)
    hang = {e[len("hang-key:"):] for e in _entries() if e.startswith("hang-key:")}
    if hang and not hang.isdisjoint(keys):
        while True:
            time.sleep(3600)


def crash_embed_once(keys: Iterable[str]) -> None:
    """Kill this embedding actor the first time it meets a marked record (see the module doc)."""
    if not os.environ.get(ENV):
        return
    marked = {e[len("crash-embed-once:"):] for e in _entries() if e.startswith("crash-embed-once:")}
    for key in marked.intersection(keys):
        marker = once_marker(key)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def actors_meet(actor_id: str) -> None:
    """Hold this actor's first block until the asked-for number of actors have each taken one (module doc)."""
    if not os.environ.get(ENV):
        return
    for e in _entries():
        if not e.startswith("actors-meet:"):
            continue
        n, _, folder = e[len("actors-meet:"):].partition(":")
        if _passed.get("actors-meet"):
            return
        _passed["actors-meet"] = 1
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, hashlib.sha1(actor_id.encode()).hexdigest()[:16]), "w") as f:
            f.write(actor_id)
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
            time.sleep(0.05)


def once_marker(key: str) -> str:
    """The file that remembers a ``crash-embed-once`` failpoint fired (tests delete it first)."""
    return os.path.join(tempfile.gettempdir(), "featx-failpoint-" + hashlib.sha1(key.encode()).hexdigest()[:16])


def drop_rows(table: "pa.Table") -> "pa.Table":
    """Drop the last rows of a part if a test asked for it (``drop-rows:<n>``): a deliberate row-losing bug."""
    if not os.environ.get(ENV):
        return table
    for e in _entries():
        if e.startswith("drop-rows:"):
            n = min(int(e[len("drop-rows:"):]), table.num_rows)
            return table.slice(0, table.num_rows - n)
    return table
