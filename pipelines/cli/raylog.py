"""Ray's own output during a featx command: in a log file, not on the user's console.

A job command's process prints Ray's INFO/WARNING logs (its Python loggers), Ray Data's progress, the logs
of the workers that Ray forwards to the driver, Python warnings, and the core worker's C++ log lines. Under
:class:`RayLog` the process's file descriptors 1 and 2 write to a log file (an embedding run keeps its share
beside its report, ``_runs/<run id>.log``; a learning job in its output folder, ``_ray.log``). A thread
follows the file and turns the lines that matter to the user into featx's one-line messages
(:func:`translate`: what it means, what to do); featx's own lines that workers print (an epoch's figures)
are shown as they are (:func:`worker_line`). featx's own console keeps the terminal (a duplicate of the
original stderr). ``--verbose`` shows Ray's output as it comes as well, but for the lines known to be
harmless under featx (:data:`HARMLESS`).

Errors are not hidden: a featx error and an unexpected traceback print after the capture has ended, in full.
A hard crash of the process (a segfault, an abort in Ray's C++ core) leaves its last words in the log file.
"""
from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

KEEP_LOGS = 20  # local copies of earlier commands' logs kept in the log folder
NOTICE_EVERY_S = 60.0  # a notice of one kind at most this often

# Ray's lines that say nothing a featx user needs, by design of featx's pipeline (kept in the log file):
HARMLESS = (
    # Ray Data passes each actor its map function as an object-store reference; the driver owns it for the
    # dataset's lifetime, and an actor restart within the run reads it from there (Ray 2.60's core worker
    # still warns at every actor start: ray-project/ray#53727)
    re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
    # a local Ray started by featx has token auth on, as Ray's default is
    re.compile(r"Token authentication is enabled for this Ray cluster"),
)

# (kind, pattern, what featx says): Ray's lines that matter, in featx's words
NOTICES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("memory", re.compile(r"memory pressure|running low on memory|OutOfMemoryError|killed due to .*memory", re.I),
     "Ray killed a worker for lack of memory on its node; featx retries its block. If this repeats, lower "
     "batch_size (or preprocess_memory_mb), or run on nodes with more memory."),
    ("unschedulable", re.compile(r"cannot be scheduled right now|No available node types can fulfill|"
                                 r"infeasible", re.I),
     "Ray cannot place some of the run's work on this cluster yet (no node has the CPUs, GPUs or custom "
     "resources it asks for); it waits for one. Lower num_cpus / num_gpus / the *_resources keys, or add nodes."),
    ("spill", re.compile(r"Spilled \d+ MiB|spilling objects", re.I),
     "Ray's object store is full and spills to disk: the run goes on, slower. Fewer rows in flight (a smaller "
     "batch_size or max_actors) or more object store memory avoids it."),
    ("worker-died", re.compile(r"A worker died or was killed|The actor died|Worker exit type: SYSTEM_ERROR|"
                               r"worker .*exited unexpectedly", re.I),
     "a Ray worker process died; featx retries its block, and quarantines a record that keeps killing workers "
     "(stage=worker in _errors)."),
)
# a warning or error line of Ray's (Python logging or the C++ log), not otherwise named
RAY_PROBLEM = re.compile(r"^\S*\s?\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\s+(WARNING|ERROR|[EW]\s+\d+)\b|"
                         r"\bUserWarning\b|\bWARNING\b.*\.py:\d+ --|^\[.*\] [EW] \d+ \d+\]")


# a featx line that a worker printed and Ray forwarded: "(RayTrainWorker pid=8349) featx: epoch 3/50: ..."
WORKER_FEATX = re.compile(r"^\(.*?\bpid=\d+[^)]*\)\s*featx: (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def worker_line(line: str) -> Optional[str]:
    """featx's own line in a worker's forwarded output (an epoch's figures, a block killed at its deadline)."""
    m = WORKER_FEATX.match(ANSI.sub("", line).strip())
    return m.group(1) if m else None


def translate(line: str) -> Optional[tuple[str, str]]:
    """A line of Ray's output -> (kind, featx's message) when it matters to the user; ``("other", "")`` for
    another warning or error line (counted, not shown); None for the rest (and for :data:`HARMLESS` lines)."""
    if any(p.search(line) for p in HARMLESS):
        return None
    for kind, pattern, message in NOTICES:
        if pattern.search(line):
            return kind, message
    if RAY_PROBLEM.search(line):
        return "other", ""
    return None


def log_folder() -> Path:
    """Where a command's Ray log is written as it runs: FEATX_LOG_DIR, else a folder of this user's in the temp
    dir (mode 0700; refused when someone else owns it or it is a link: the log may hold paths and messages)."""
    root = os.environ.get("FEATX_LOG_DIR") or os.path.join(tempfile.gettempdir(), f"featx-{os.getuid()}", "logs")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"the log folder {path} is a link or belongs to another user; set FEATX_LOG_DIR to a folder "
                      "of your own")
    return path


class RayLog:
    """``with RayLog(notice, verbose) as log:`` fds 1 and 2 of this process (and of the processes it starts) write
    to the log file ``log.path`` (see the module docstring); ``log.terminal`` is the original stderr, for featx's
    own console. A thread follows the file as it grows: ``notice(message)`` gets featx's one-liners (and with
    ``verbose``, Ray's lines as they are). :meth:`mark` / :meth:`since` cut one run's share out of the log.

    The descriptors point at the file itself, not at a pipe: a writer never blocks on the reader, nothing is lost
    when the process dies (a hard crash's last words are in the file), and a process that outlives the command
    writes on into the file."""

    POLL_S = 0.2

    def __init__(self, notice: Callable[[str], None], verbose: bool = False, path: Optional[Path] = None) -> None:
        self.notice = notice
        self.verbose = verbose
        self.path = path or log_folder() / f"featx-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
        self.terminal: TextIO = sys.stderr
        self.other = 0  # Ray's warning/error lines not turned into a notice
        self._seen: dict[str, float] = {}
        self._last_own: Optional[str] = None
        self._saved: tuple[int, int] = (-1, -1)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RayLog":
        _prune(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.terminal = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = (os.dup(1), os.dup(2))
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        self._thread = threading.Thread(target=self._follow, args=(self.mark(),), name="featx-ray-log", daemon=True)
        self._thread.start()
        return self

    def _follow(self, start: int) -> None:
        """Read what the log takes in, line by line, until the capture ends (then once more, to the end)."""
        with open(self.path, "rb") as f:
            f.seek(start)
            pending = b""
            while True:
                stopping = self._stop.is_set()
                chunk = f.read(1 << 16)
                if chunk:
                    *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                    pending = pending[-(1 << 16):]  # a line without an end (a progress bar) stays bounded
                    for raw in lines:
                        if raw:
                            self._line(raw.decode("utf-8", "replace"))
                    continue
                if stopping:
                    break
                self._stop.wait(self.POLL_S)
            if pending:
                self._line(pending.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        try:
            if self.verbose:
                if not any(p.search(line) for p in HARMLESS):
                    self.terminal.write(line + "\n")
                return
            own = worker_line(line)
            if own is not None:
                if own != self._last_own:  # Ray's progress bars redraw the last forwarded line: shown once
                    self._last_own = own
                    self.notice(own)
                return
            got = translate(line)
            if got is None:
                return
            kind, message = got
            if kind == "other":
                self.other += 1
                return
            now = time.monotonic()
            if now - self._seen.get(kind, -1e9) >= NOTICE_EVERY_S:
                self._seen[kind] = now
                self.notice(f"note: {message} (Ray's words are in its log)")
        except Exception:  # noqa: BLE001 - the follower only informs; it must never stop
            pass

    def mark(self) -> int:
        """The log's size now: where a run's share starts."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def since(self, mark: int) -> bytes:
        """What the log took in after ``mark`` (empty when it cannot be read)."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(self.path, "rb") as f:
                f.seek(mark)
                return f.read()
        except OSError:
            return b""

    def __exit__(self, *exc: object) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        out, err = self._saved
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.terminal.flush()
            self.terminal.close()
        except Exception:  # noqa: BLE001
            pass


def _prune(folder: Path, keep: int = KEEP_LOGS, min_age_s: float = 86400.0) -> None:
    """Delete the older local logs: all but the newest ``keep``, and none younger than a day (a long run's)."""
    now = time.time()
    logs = []
    for p in folder.glob("featx-*.log"):
        try:
            logs.append((p.stat().st_mtime, p))
        except OSError:  # another featx pruned it meanwhile
            continue
    for mtime, old in sorted(logs)[:-keep] if len(logs) > keep else []:
        if now - mtime >= min_age_s:
            try:
                old.unlink()
            except OSError:
                pass
