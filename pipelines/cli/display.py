"""A run's progress on the console: one live display per job on a terminal, one plain line every
``progress_interval_s`` elsewhere (cron, CI, Ray job logs).

The run calls the display with its messages (``display("committed snapshot 3: ...")``) and, every second
while it streams, with its live counts (``display.stages(counts)``: pipelines/embed/watch.py). From the counts
the pure :func:`stage_view` derives, per stage (read, embed, write), the rows done and the rows expected
(exact once every block is read; before, the rows read so far scaled by the input bytes still to read), the
rows per second over the last seconds, the error rows and the rows reused, and the run's ETA (from the write
rate; before the first write, from ``featx plan``'s estimate). :func:`plain_line` and :func:`panel` render it.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Deque, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STAGES = ("read", "embed", "write")
RATE_WINDOW_S = 20.0  # rows per second over this many seconds (the whole run's average until then)


def expected_rows(counts: dict[str, Any]) -> tuple[Optional[int], bool]:
    """The rows the run will stream and whether that is exact: every block read gives the count; until then
    the rows read so far, scaled by the share of the input bytes they came from (None before any block)."""
    read = counts.get("read") or {}
    rows, done_bytes, total_bytes = int(read.get("rows") or 0), int(read.get("bytes") or 0), int(counts.get("bytes_total") or 0)
    blocks_read, blocks = int(read.get("blocks") or 0), int(counts.get("blocks_total") or 0)
    if blocks and blocks_read >= blocks:
        return rows, True
    if not done_bytes or not total_bytes:
        return None, False
    return max(rows, round(rows * total_bytes / done_bytes)), False


def stage_done(counts: dict[str, Any], stage: str) -> int:
    """Rows a stage has finished: read and embed count their finished blocks' rows (error rows included); the
    write stage the rows written, error rows and rows held for the fill pass."""
    c = counts.get(stage) or {}
    if stage == "write":
        return int(c.get("rows") or 0) + int(c.get("errors") or 0) + int(c.get("held") or 0)
    return int(c.get("rows") or 0)


class Rates:
    """Rows per second of each stage: over the last RATE_WINDOW_S seconds of samples, and (``avg:<stage>``) from
    the start to the stage's last step forward (what a finished stage shows)."""

    def __init__(self) -> None:
        self.samples: dict[str, Deque[tuple[float, int]]] = {s: collections.deque() for s in STAGES}
        self.moved: dict[str, tuple[float, int]] = {}  # stage -> (seconds, rows) when it last moved

    def add(self, seconds: float, counts: dict[str, Any]) -> dict[str, float]:
        out = {}
        for stage in STAGES:
            q = self.samples[stage]
            done = stage_done(counts, stage)
            if done > self.moved.get(stage, (0.0, 0))[1]:
                self.moved[stage] = (seconds, done)
            q.append((seconds, done))
            while len(q) > 2 and q[-1][0] - q[1][0] >= RATE_WINDOW_S:
                q.popleft()
            (t0, d0), (t1, d1) = q[0], q[-1]
            if t1 - t0 >= 2.0:
                out[stage] = max(0.0, (d1 - d0) / (t1 - t0))
            else:
                out[stage] = d1 / t1 if t1 > 0 else 0.0
            at, rows = self.moved.get(stage, (0.0, 0))
            out[f"avg:{stage}"] = rows / at if at > 0 else 0.0
        return out


def stage_view(counts: dict[str, Any], rates: dict[str, float]) -> dict[str, Any]:
    """What the display shows (see the module docstring); pure."""
    total, exact = expected_rows(counts)
    stages = []
    for stage in STAGES:
        done = stage_done(counts, stage)
        if exact and total is not None:
            done = min(done, total)  # a block retried after it finished is heard twice
        finished = exact and total is not None and done >= total  # its average, not an idle window's zero
        rate = rates.get(f"avg:{stage}", 0.0) if finished else rates.get(stage, 0.0)
        stages.append({"stage": stage, "done": done, "total": total, "exact": exact, "rate": round(rate, 2),
                       "errors": int((counts.get(stage) or {}).get("errors") or 0)})
    written, rate = stages[-1]["done"], rates.get("write", 0.0)
    seconds = float(counts.get("seconds") or 0.0)
    if total is not None and written and rate > 0:
        eta, basis = max(0.0, (total - written) / rate), "rate"
    elif total is not None and written >= total:
        eta, basis = 0.0, "rate"
    elif counts.get("estimate_s"):  # the plan's time is the whole run's: less the time since the run began
        eta, basis = max(0.0, float(counts["estimate_s"]) - float(counts.get("run_seconds") or seconds)), "plan"
    else:
        eta, basis = None, None
    embed = counts.get("embed") or {}
    return {"command": counts.get("command") or "embed", "model": counts.get("model") or "", "seconds": seconds,
            "stages": stages, "eta": eta, "eta_basis": basis,
            "errors": max(int((counts.get("write") or {}).get("errors") or 0), int(embed.get("errors") or 0)),
            "reused": int(embed.get("reused") or 0), "deduped": int(embed.get("deduped") or 0),
            "carried": int((counts.get("write") or {}).get("carried") or 0)}


def clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _of(st: dict[str, Any]) -> str:
    total = "?" if st["total"] is None else f"{'' if st['exact'] else '~'}{st['total']:,}"
    return f"{st['done']:,}/{total}"


def _eta(view: dict[str, Any]) -> str:
    if view["eta"] is None:
        return "ETA ?"
    return f"ETA {clock(view['eta'])}" + (" (plan)" if view["eta_basis"] == "plan" else "")


def _extras(view: dict[str, Any]) -> list[str]:
    out = [f"errors {view['errors']:,}"]
    if view["reused"] or view["deduped"]:
        out.append(f"reused {view['reused']:,}" + (f" + {view['deduped']:,} copies" if view["deduped"] else ""))
    if view["carried"]:
        out.append(f"carried {view['carried']:,}")
    return out


def plain_line(view: dict[str, Any]) -> str:
    """The non-terminal progress line: ``progress 1:05 · read 1,024/~4,096 rows 15.8/s · embed ... · ETA 3:12``."""
    parts = [f"{st['stage']} {_of(st)} rows {st['rate']:,.1f}/s" for st in view["stages"]]
    return " · ".join([f"progress {clock(view['seconds'])}", *parts, *_extras(view), _eta(view)])


def panel(view: dict[str, Any]) -> Group:
    """The terminal display: a head line, then a bar per stage."""
    head = Text.assemble((f"featx {view['command']}", "bold"), f" · {view['model']} · {clock(view['seconds'])} · ",
                         (_eta(view), "cyan"), " · " + " · ".join(_extras(view)))
    grid = Table.grid(padding=(0, 1))
    for _ in range(5):
        grid.add_column()
    for st in view["stages"]:
        total = st["total"] if st["total"] else None
        bar = ProgressBar(total=max(total or 1, st["done"], 1) if total else None, completed=st["done"], width=28)
        grid.add_row(f"  {st['stage']:<5}", bar, Text(f"{_of(st)} rows", justify="right"),
                     Text(f"{st['rate']:,.1f} rows/s", justify="right"),
                     Text(f"errors {st['errors']:,}" if st["errors"] else "", style="red"))
    return Group(head, grid)


class RunDisplay:
    """``display(message)``: a line on the console (above the live display on a terminal);
    ``display.stages(counts)``: the live counts of the streaming run. ``live``: a live display (a terminal,
    not --verbose); otherwise a plain line every ``interval_s`` seconds. The run's log hooks (``log_mark``,
    ``keep_log``) use the :class:`pipelines.cli.raylog.RayLog` the command runs under, if any."""

    def __init__(self, console: Console, live: bool, interval_s: float = 10.0, ray_log: Any = None) -> None:
        self.console = console
        self.live_ok = live
        self.interval_s = interval_s
        self.ray_log = ray_log
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._rates = Rates()
        self._last_line = 0.0
        self._run: Any = None
        self._closed = False

    def __call__(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def stages(self, counts: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:  # a watcher that outlived its command
                return
            if counts.get("read") is None:  # no counts (the board is gone): the last frame stays as it was
                if counts.get("final"):
                    self._stop_live()
                return
            seconds = float(counts.get("seconds") or 0.0)
            if counts.get("run_id") != self._run:  # a new run (featx demo runs two)
                self._rates, self._last_line, self._run = Rates(), time.monotonic(), counts.get("run_id")
            view = stage_view(counts, self._rates.add(seconds, counts))
            if self.live_ok:
                if self._live is None:
                    # featx's lines (console.print) show above the display; sys.stdout/stderr are left alone:
                    # what Ray prints through them belongs in its log (pipelines/cli/raylog.py), not here
                    self._live = Live(panel(view), console=self.console, refresh_per_second=4, transient=False,
                                      redirect_stdout=False, redirect_stderr=False)
                    self._live.start()
                else:
                    self._live.update(panel(view))
                if counts.get("final"):
                    self._stop_live()
            elif counts.get("final") or time.monotonic() - self._last_line >= self.interval_s:
                # a line every interval_s, and the stream's last counts (every stage's rows and rate)
                self._last_line = time.monotonic()
                self(plain_line(view))

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop_live()

    # -- a run's share of Ray's log, kept where the run keeps its outputs (an embedding run: beside its report,
    # pipelines/embed/job.py; a learning job: in its output folder, pipelines/cli/common.py job_log)
    def log_mark(self) -> int | None:
        return self.ray_log.mark() if self.ray_log is not None else None

    def keep_log(self, mark: int | None, where: str, storage_options: dict[str, Any] | None = None) -> str | None:
        """Write what Ray's log took in since ``mark`` to ``where`` and say so; returns ``where``, or None when
        nothing was captured. Best effort: a write that fails is said and never fails the run (nor hides its
        error); the command's local log still holds it."""
        if self.ray_log is None or mark is None:
            return None
        try:
            from operators.io.storage import write_bytes

            body = self.ray_log.since(mark)
            if not body:
                return None
            write_bytes(where, body, storage_options)
        except Exception as e:  # noqa: BLE001
            self(f"note: Ray's output could not be written to {where} ({type(e).__name__}); it is in "
                 f"{self.ray_log.path}")
            return None
        self(f"Ray's output of this run: {where}")
        return where
