"""Watching a streaming run from the driver: the run's block board (:class:`operators.watchdog.BlockBoard`)
and a thread that reads it.

Every few seconds it names, in the progress line, the blocks running far longer than their peers (3x their
stage's median: the slow tail) and those killed at their deadline. When the run's progress display takes live
counts (a ``stages`` method beside its ``__call__``: pipelines/cli/display.py), it gets them every second:
rows, error rows and rows reused so far in the read and embed stages (what their finished blocks put out, as
the board heard it) and in the write stage (the parts the driver has collected: exact), with the input bytes
read against the run's total, from which the display estimates the rows to come.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import pyarrow as pa

from operators.read.loading import slice_bytes
from pipelines.config import EmbedConfig
from pipelines.embed.report import RunReport
from pipelines.embed.tracker import Tracker

LIVE_TICK_S = 1.0  # how often a live display gets the counts


def block_bytes(blocks: list[pa.Table]) -> int:
    """The input bytes of the run's blocks, counted as the read stage counts them (:func:`slice_bytes`)."""
    return sum(slice_bytes(json.loads(shards), sl)
               for b in blocks for shards, sl in zip(b["shards"].to_pylist(), b["slice"].to_pylist()))


class RunWatch:
    """``with RunWatch(cfg, report, progress, tracker) as watch:`` the board lives (named ``watch.name``; the
    read tasks and actors report to it) and the watching thread runs; :meth:`planned` gives it the run's
    blocks once they are known."""

    def __init__(self, cfg: EmbedConfig, report: RunReport, progress: Callable[[str], None], tracker: Tracker,
                 t_start: float | None = None) -> None:
        self.name = f"featx-board-{report.run_id}"
        self.progress = progress
        self.live = getattr(progress, "stages", None)  # a display that shows live counts
        self.interval = min(10.0, max(0.5, cfg.task_timeout_s / 4)) if cfg.task_timeout_s else 10.0
        self.report = report
        self.tracker = tracker
        self.bytes_total = 0
        self.blocks_total = 0
        self.t0 = time.perf_counter()
        self.t_start = t_start if t_start is not None else self.t0  # the run's start (featx plan's time counts from it)
        self._stop = threading.Event()
        self._board: Any = None
        self._thread: threading.Thread | None = None

    def planned(self, blocks: list[pa.Table]) -> None:
        self.bytes_total, self.blocks_total = block_bytes(blocks), len(blocks)
        self.t0 = time.perf_counter()

    def __enter__(self) -> "RunWatch":
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from operators.watchdog import BlockBoard

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # beside the driver
        self._board = ray.remote(BlockBoard).options(name=self.name, num_cpus=0, scheduling_strategy=here).remote()
        self._thread = threading.Thread(target=self._watch, name="featx-run-watch", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        tick = min(LIVE_TICK_S, self.interval) if self.live else self.interval
        last_tail = time.monotonic()
        while not self._stop.wait(tick):
            if self.live:
                self.show()
            if time.monotonic() - last_tail >= self.interval - 1e-3:
                last_tail = time.monotonic()
                self.poll()

    def counts(self) -> dict[str, Any]:
        """The live counts (see the module's docstring): one call to the board."""
        import ray

        board = ray.get(self._board.counts.remote(), timeout=5)
        now = time.perf_counter()
        return {"run_id": self.report.run_id, "command": self.report.command, "model": self.report.model,
                "seconds": now - self.t0, "run_seconds": now - self.t_start,
                "bytes_total": self.bytes_total, "blocks_total": self.blocks_total,
                "estimate_s": (self.report.estimate or {}).get("seconds"),
                "read": board.get("read", {}), "embed": board.get("embed", {}), "write": dict(self.tracker.written)}

    def show(self, final: bool = False) -> None:
        """Give the display the live counts (``final``: the stream is over; a live display stops there)."""
        if not self.blocks_total:  # nothing to embed (a refresh that only carries rows over): no display
            return
        try:
            counts = self.counts()
        except Exception:  # noqa: BLE001 - the display only informs: never fail a run for it
            if not final:
                return
            counts = {"run_id": self.report.run_id}
        try:
            self.live({**counts, "final": final})
        except Exception:  # noqa: BLE001
            pass

    def poll(self) -> None:
        """Ask the board for the slow tail and name it in the progress line."""
        import ray

        try:
            slow = ray.get(self._board.slow.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - informative only
            return
        if slow:
            self.report.slow_blocks = (self.report.slow_blocks + slow)[-50:]
            self.progress("slow tail: " + "; ".join(_slow_words(b) for b in slow[:3])
                          + (f"; {len(slow) - 3} more" if len(slow) > 3 else ""))

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.poll()  # what happened since the last look (a block killed just before the end)
        if self.live:
            self.show(final=True)  # failed run or not
        try:
            ray.kill(self._board)
        except Exception:  # noqa: BLE001
            pass


def _slow_words(b: dict[str, Any]) -> str:
    if "deadline" in b:
        return (f"{b['block']} ({b['stage']}) was stuck: killed after {b['seconds']:.0f} s, past its deadline of "
                f"{b['deadline']:.0f} s, then retried or isolated")
    return (f"{b['block']} ({b['stage']}) running {b['seconds']:.0f} s, {b['seconds'] / max(b['median'], 1e-3):.0f}x "
            f"its peers' median {b['median']:.1f} s")
