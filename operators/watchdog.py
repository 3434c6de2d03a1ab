"""Deadlines for stuck work, and the board that shows the slow tail of a run.

A record can hang its worker: a decoder stuck on a pathological file, a tokenizer on a pathological string.
Ray Data has no per-task deadline, so without one the run waits forever at 99%. Each block of work (a read +
preprocess task, an embedding actor call) runs under a :class:`Watchdog`: a thread that kills the worker
process (SIGKILL, as a crash would) once the block has run past its deadline. Ray then retries the block
(``max_task_retries``) and, when it keeps failing, it comes back to isolation, which finds the record and
quarantines it (``stage=worker``, ``WorkerHung``) while the rest of its shard is published.

The deadline of a block of ``rows`` rows: ``max(floor, FACTOR x rows x seconds per row)``, the rate measured
in this worker process over the blocks it finished (the first block gets the floor, ``task_timeout_s``).
So a big block on a slow model is not killed for being big, and a stuck one is killed in minutes, not hours.

The :class:`BlockBoard` (a Ray actor, one per run, no CPU) hears when each block starts and ends, so the
driver can name the blocks running far longer than their peers (the slow tail) in its progress line, and what
each finished block put out (rows, error rows, rows reused, input bytes): the live counts of the read and embed
stages that the run's progress display shows (:func:`outcome` counts a block's output table).
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

FACTOR = 20.0  # a block may take this many times its rows at the measured rate before it counts as stuck
_rates: dict[str, float] = {}  # stage -> seconds per row in this process (moving average of finished blocks)
_boards: dict[str, Any] = {}  # board actor name -> handle (workers are reused: looked up once)


def deadline_for(rows: int, seconds_per_row: float | None, floor: float, factor: float = FACTOR) -> float:
    """Seconds a block of ``rows`` rows may run: the floor, or ``factor`` times its expected time if longer."""
    if not seconds_per_row or rows <= 0:
        return floor
    return max(floor, factor * rows * seconds_per_row)


def measured_rate(stage: str) -> float | None:
    return _rates.get(stage)


def block_label(pieces: list[str], piece_slice: list[int] | None = None) -> str:
    """How the progress line names a block: its first piece, how many more, and the slice of a sliced piece."""
    label = f"block of piece {pieces[0] if pieces else '?'}" + (f" (+{len(pieces) - 1} more)" if len(pieces) > 1 else "")
    return label + (f", slice {piece_slice[0] + 1}/{piece_slice[1]}" if piece_slice and piece_slice[1] > 1 else "")


def _board(name: str | None) -> Any:
    if not name:
        return None
    if name not in _boards:
        _boards.clear()  # a worker outlives runs: keep the current run's board only
        try:
            import ray

            _boards[name] = ray.get_actor(name)
        except Exception:  # noqa: BLE001 - the board only informs; no board, no slow-tail lines
            _boards[name] = None
    return _boards[name]


class Watchdog:
    """``with Watchdog(stage, floor, label) as wd: ...; wd.size(rows)``: kill this process if the block is still
    running at its deadline (``floor`` until :meth:`size` says how many rows it has). ``floor`` 0 or None: off."""

    def __init__(self, stage: str, floor: float | None, label: str, board: str | None = None,
                 key: str | None = None) -> None:
        self.stage, self.floor, self.label, self.board_name = stage, float(floor or 0), label, board
        self.key = key or label  # the block's identity on the board: a block heard twice (retried) counts once
        self.rows = 0
        self.deadline = self.floor
        self.counts: dict[str, int] = {}  # what the block put out (:func:`outcome`): reported when it ends
        self._stop = threading.Event()
        self._t0 = 0.0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Watchdog":
        self._t0 = time.monotonic()
        board = _board(self.board_name)
        if board is not None:
            board.start.remote(self.label, self.stage, time.time())
        if self.floor > 0:
            self._thread = threading.Thread(target=self._watch, name=f"featx-watchdog-{self.stage}", daemon=True)
            self._thread.start()
        return self

    def size(self, rows: int) -> None:
        """The block has ``rows`` more rows: its deadline grows with them at this process's measured rate."""
        self.rows += rows
        self.deadline = deadline_for(self.rows, _rates.get(self.stage), self.floor)

    def put_out(self, counts: dict[str, int]) -> None:
        """What the block put out (:func:`outcome`, plus ``bytes`` of input read), told to the board at its end."""
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)

    def _watch(self) -> None:
        tick = min(1.0, max(0.05, self.floor / 20))
        while not self._stop.wait(tick):
            elapsed = time.monotonic() - self._t0
            if elapsed > self.deadline:
                board = _board(self.board_name)
                if board is not None:  # the run's progress line names it (delivered before the kill)
                    try:
                        import ray

                        ray.get(board.stuck.remote(self.label, self.stage, round(elapsed, 1), self.deadline), timeout=5)
                    except Exception:  # noqa: BLE001 - informative only: the kill matters
                        pass
                sys.stderr.write(
                    f"featx: {self.label}: the {self.stage} step has run {elapsed:.1f} s, past its deadline of "
                    f"{self.deadline:.1f} s for {self.rows} rows (task_timeout_s={self.floor:g}); killing this "
                    "worker so that the block is retried, then isolated record by record\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        elapsed = time.monotonic() - self._t0
        if exc_type is None and self.rows > 0:
            rate = elapsed / self.rows
            old = _rates.get(self.stage)
            _rates[self.stage] = rate if old is None else 0.7 * old + 0.3 * rate
        board = _board(self.board_name)
        if board is not None:
            # a failed block is retried (or isolated): only a finished one's output counts
            board.done.remote(self.label, self.stage, elapsed, self.counts if exc_type is None else {}, self.key)


def outcome(table: Any, error_column: str, how_column: str | None = None) -> dict[str, int]:
    """A stage's output block in counts: ``rows``, ``errors`` (rows with ``error_column`` set) and, with
    ``how_column`` (0 embedded, 1 reused from the snapshot, 2/3 copied from the same content in the run),
    ``reused`` and ``deduped``."""
    import pyarrow.compute as pc

    counts = {"rows": int(table.num_rows), "errors": 0}
    if error_column in table.column_names:
        counts["errors"] = int(table.num_rows - table[error_column].null_count)
    if how_column and how_column in table.column_names and table.num_rows:
        how = table[how_column]
        counts["reused"] = int(pc.sum(pc.equal(how, 1)).as_py() or 0)
        counts["deduped"] = int(pc.sum(pc.greater_equal(how, 2)).as_py() or 0)
    return counts


class BlockBoard:
    """Ray actor (one per run): which blocks are running since when, how long the finished ones took."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str], float] = {}
        self.durations: dict[str, list[float]] = {}
        self.killed: list[dict[str, Any]] = []  # blocks killed at their deadline, not yet reported
        self.finished: dict[tuple[str, str], dict[str, int]] = {}  # (stage, block key) -> what it put out

    def start(self, label: str, stage: str, at: float) -> None:
        self.running[(label, stage)] = at

    def done(self, label: str, stage: str, seconds: float, counts: dict[str, int] | None = None,
             key: str | None = None) -> None:
        self.running.pop((label, stage), None)
        self.durations.setdefault(stage, []).append(seconds)
        if counts:  # the last word on a block (a retry that finished again replaces it)
            self.finished[(stage, key or label)] = counts

    def counts(self) -> dict[str, dict[str, int]]:
        """Per stage: the finished blocks and what they put out (summed), and how many blocks are running."""
        out: dict[str, dict[str, int]] = {}
        for (stage, _), counts in self.finished.items():
            totals = out.setdefault(stage, {"blocks": 0, "running": 0})
            totals["blocks"] += 1
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
        for _, stage in self.running:
            out.setdefault(stage, {"blocks": 0, "running": 0})["running"] += 1
        return out

    def stuck(self, label: str, stage: str, seconds: float, deadline: float) -> None:
        """A block's watchdog is about to kill its worker: it ran past its deadline."""
        self.running.pop((label, stage), None)
        self.killed.append({"block": label, "stage": stage, "seconds": seconds, "deadline": round(deadline, 1)})

    def slow(self, factor: float = 3.0, min_seconds: float = 1.0) -> list[dict[str, Any]]:
        """Blocks killed at their deadline since the last call, then blocks running more than ``factor`` times
        their stage's median (and ``min_seconds``), longest first."""
        killed, self.killed = self.killed, []
        return killed + slow_blocks(self.running, self.durations, time.time(), factor, min_seconds)


def slow_blocks(running: dict[tuple[str, str], float], durations: dict[str, list[float]], now: float,
                factor: float = 3.0, min_seconds: float = 1.0) -> list[dict[str, Any]]:
    out = []
    for (label, stage), at in running.items():
        done = durations.get(stage) or []
        if not done:
            continue
        median = statistics.median(done)
        ran = now - at
        if ran > max(min_seconds, factor * median):
            out.append({"block": label, "stage": stage, "seconds": round(ran, 1), "median": round(median, 2)})
    return sorted(out, key=lambda r: -r["seconds"])
