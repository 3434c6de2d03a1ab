"""Batch-size autotuning for an embedding actor: grow the batch while it pays, back off on out-of-memory.

:class:`BatchTuner` is pure bookkeeping (no torch, no Ray): the actor asks it for the batch size before each
block and tells it what each forward pass cost. It lives as long as the actor, so the search runs once per
actor, over its first batches, and every later block runs at the size it settled on.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

GROWTH = 8  # autotuning's default ceiling: this many times the configured batch size


def tune_limit(batch_size: int, max_batch_size: int | None) -> int:
    """The largest batch autotuning tries: ``max_batch_size``, else GROWTH x ``batch_size``."""
    return max_batch_size or GROWTH * batch_size


@dataclass
class Trial:
    """What the batches run at one batch size cost: work units (rows; padded tokens for text) and seconds."""

    units: float = 0.0
    seconds: float = 0.0
    batches: int = 0
    rows: int = 0
    peak_memory: float | None = None  # fraction of the device's memory in use at the peak (GPU only)

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BatchTuner:
    """Doubles the batch size from ``start`` while a doubling raises the measured units/s by ``gain`` or more.

    Each size is measured on ``samples`` batches after ``warmup`` batches that are not counted (a new shape
    pays for kernel selection, allocator growth, cuDNN/oneDNN set-up). The search stops, and the size stays at
    the smallest one within ``gain`` of the fastest measured, when a doubling gains less than ``gain``, when
    it would pass ``limit`` or a size that ran out of memory, when the batches stop growing with the size
    (the blocks are smaller than the batch), or when the peak device memory (``memory``: the fraction in
    use, GPU only) says a doubled batch would pass ``memory_cap``. An out-of-memory error at any time caps the size at half the batch that failed.
    """

    start: int
    limit: int
    gain: float = 1.05
    samples: int = 3
    warmup: int = 1
    memory_cap: float = 0.85
    base_memory: float = 0.0  # fraction of device memory in use before any batch (weights): does not scale
    memory: Callable[[], float | None] | None = None  # peak fraction of device memory in use since last reset
    reset_memory: Callable[[], None] | None = None
    size: int = field(init=False)
    settled: bool = field(init=False)
    trials: dict[int, Trial] = field(init=False, default_factory=dict)
    history: list[str] = field(init=False, default_factory=list)  # what it decided and why, for the run report

    def __post_init__(self) -> None:
        if self.gain < 1.0:
            raise ValueError(f"gain must be >= 1.0 (1.0: any faster rate is worth a doubling), got {self.gain}")
        self.start = max(1, int(self.start))
        self.limit = max(self.start, int(self.limit))
        self.size = self.start
        self.settled = self.start * 2 > self.limit
        self._lock = threading.Lock()
        self._skipped: dict[int, int] = {}
        if not self.settled and self.reset_memory is not None:
            self.reset_memory()

    def observe(self, size: int, rows: int, units: float, seconds: float) -> None:
        """One forward pass run while ``size`` was the tuner's size: ``rows`` rows, ``units`` of work."""
        with self._lock:
            if self.settled or size != self.size:
                return
            if self._skipped.get(size, 0) < self.warmup:
                self._skipped[size] = self._skipped.get(size, 0) + 1
                return
            t = self.trials.setdefault(size, Trial())
            t.units += units
            t.seconds += seconds
            t.batches += 1
            t.rows += rows
            if t.batches >= self.samples:
                if self.memory is not None:
                    t.peak_memory = self.memory()
                self._decide(size, t)

    def out_of_memory(self, rows: int) -> None:
        """A batch of ``rows`` rows ran out of device memory: never ask for more than half of it again."""
        with self._lock:
            cap = max(1, rows // 2)
            if cap < self.limit:
                self.limit = cap
            if self.size > self.limit:
                self.history.append(f"out of memory at {rows} rows: batch size {self.size} -> {self.limit}")
                self.size = self.limit
            self.settled = True

    def _decide(self, size: int, t: Trial) -> None:
        # the smallest size within ``gain`` of the fastest: a few % more speed is not worth twice the memory
        top = max(tr.rate for tr in self.trials.values())
        best = min(s for s, tr in self.trials.items() if tr.rate * self.gain >= top)
        prev = self.trials.get(size // 2) if size > self.start else None
        if prev is not None:
            grew = t.rows / t.batches >= 1.5 * prev.rows / prev.batches
            if not grew:  # the blocks are smaller than the batch: a bigger size changes nothing
                return self._settle(size // 2, f"batch size {size}: the blocks are smaller than the batch")
            if t.rate < self.gain * prev.rate:
                return self._settle(best, f"batch size {size}: {t.rate / prev.rate:.2f}x the rate of {size // 2}")
        if size * 2 > self.limit:
            return self._settle(best, f"batch size {size}: the next doubling passes the limit {self.limit}")
        if t.peak_memory is not None:
            # the batch's own share of memory doubles with it; the weights' share does not
            if 2 * t.peak_memory - self.base_memory > self.memory_cap:
                return self._settle(best, f"batch size {size}: peak memory {t.peak_memory:.0%}, a doubled "
                                          f"batch would pass {self.memory_cap:.0%}")
        self.history.append(f"batch size {size}: {t.rate:.1f} units/s, trying {size * 2}")
        self.size = size * 2
        if self.reset_memory is not None:
            self.reset_memory()

    def _settle(self, size: int, why: str) -> None:
        self.size = size
        self.settled = True
        self.history.append(f"{why}; settled on {size}")
