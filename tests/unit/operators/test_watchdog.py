"""Deadlines for stuck work: a real process that hangs is killed at its deadline; work that finishes in time
is left alone and sets the rate later deadlines grow with; the board names the slow tail."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from operators import watchdog
from operators.watchdog import FACTOR, BlockBoard, Watchdog, deadline_for, slow_blocks

ROOT = Path(__file__).resolve().parents[3]


def test_deadline_is_the_floor_until_a_rate_is_known_then_grows_with_the_rows() -> None:
    assert deadline_for(1000, None, 5.0) == 5.0
    assert deadline_for(0, 0.1, 5.0) == 5.0
    assert deadline_for(10, 0.01, 5.0) == 5.0  # 20 x 10 rows x 0.01 s = 2 s < the floor
    assert deadline_for(1000, 0.01, 5.0) == FACTOR * 1000 * 0.01 == 200.0


def test_work_that_finishes_in_time_is_left_alone_and_sets_the_rate() -> None:
    watchdog._rates.pop("unit-test", None)
    with Watchdog("unit-test", 5.0, "block") as wd:
        wd.size(10)
        time.sleep(0.2)
    rate = watchdog.measured_rate("unit-test")
    assert rate is not None and 0.015 <= rate <= 0.2  # 0.2 s over 10 rows, with scheduling slack
    with Watchdog("unit-test", 0.5, "block") as wd:
        wd.size(1000)
        assert wd.deadline == max(0.5, FACTOR * 1000 * rate)  # a big block is not killed for being big
        wd.size(500)  # a block of several pieces: its deadline grows with all their rows
        assert wd.deadline == max(0.5, FACTOR * 1500 * rate)


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_a_hung_process_is_killed_at_its_deadline() -> None:
    t0 = time.monotonic()
    r = _child("""
        from operators.watchdog import Watchdog
        from operators.faults import crash_on_keys
        with Watchdog("read", 1.0, "block of piece p1") as wd:
            wd.size(3)
            crash_on_keys(["a", "stuck", "c"])  # hang-key:stuck: sleeps until killed
        print("not reached")
    """, {"FEATX_FAILPOINTS": "hang-key:stuck"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "not reached" not in r.stdout
    assert "block of piece p1: the read step has run" in r.stderr and "past its deadline of 1.0 s" in r.stderr
    assert time.monotonic() - t0 < 30  # killed at its deadline, not at the test's timeout


def test_no_deadline_when_the_floor_is_zero() -> None:
    r = _child("""
        import time
        from operators.watchdog import Watchdog
        with Watchdog("read", 0, "block") as wd:
            wd.size(1)
            time.sleep(1.5)
        print("finished")
    """)
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr


def test_slow_blocks_are_those_far_past_their_stages_median() -> None:
    now = 1000.0
    running = {("block of piece a", "embed"): now - 40, ("block of piece b", "embed"): now - 2,
               ("block of piece c", "read"): now - 50}
    durations = {"embed": [1.0, 2.0, 3.0]}  # no finished read block yet: no peers to compare with
    got = slow_blocks(running, durations, now)
    assert got == [{"block": "block of piece a", "stage": "embed", "seconds": 40.0, "median": 2.0}]


def test_the_board_reports_a_killed_block_once_then_the_slow_ones() -> None:
    board = BlockBoard()
    board.start("block of piece a", "read", time.time() - 30)
    board.done("block of piece b", "read", 1.0)
    board.start("block of piece c", "read", time.time())
    board.stuck("block of piece c", "read", 2.1, 2.0)
    first = board.slow()
    assert first[0] == {"block": "block of piece c", "stage": "read", "seconds": 2.1, "deadline": 2.0}
    assert [b["block"] for b in first[1:]] == ["block of piece a"]  # 30 s against a median of 1 s
    assert [b["block"] for b in board.slow()] == ["block of piece a"]  # the kill is reported once


def test_the_board_sums_what_finished_blocks_put_out_per_stage() -> None:
    import pyarrow as pa

    from operators.watchdog import outcome

    block = pa.table({"_err_stage": [None, "decode", None, "embed"], "_how": [0, 1, 2, 3]})
    assert outcome(block, "_err_stage") == {"rows": 4, "errors": 2}
    assert outcome(block, "_err_stage", "_how") == {"rows": 4, "errors": 2, "reused": 1, "deduped": 2}
    board = BlockBoard()
    board.start("block of piece a", "read", 0.0)
    board.start("block of piece b", "read", 0.0)
    board.done("block of piece a", "read", 1.0, {"rows": 4, "errors": 2, "bytes": 100})
    board.done("block of piece c", "embed", 1.0, {})  # a failed block (retried): timed, not counted
    board.done("block of piece a", "read", 1.0, {"rows": 4, "errors": 2, "bytes": 100})  # heard again: counted once
    board.done("block of piece d", "embed", 1.0, {"rows": 3, "errors": 0}, key="block of piece d#k1")
    board.done("block of piece d", "embed", 1.0, {"rows": 5, "errors": 1}, key="block of piece d#k4")  # 2nd window
    assert board.counts() == {"read": {"blocks": 1, "rows": 4, "errors": 2, "bytes": 100, "running": 1},
                              "embed": {"blocks": 2, "rows": 8, "errors": 1, "running": 0}}
