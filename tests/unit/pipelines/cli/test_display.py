"""The progress display's figures from a run's live counts: the rows expected, the rates, the ETA, and the
line a non-terminal gets (expected values worked out by hand from the counts)."""
from __future__ import annotations

import io

from rich.console import Console

from pipelines.cli.display import Rates, RunDisplay, expected_rows, plain_line, stage_view


def counts(seconds: float, read: tuple[int, int, int], embed: int, written: int, *, errors: int = 0,
           reused: int = 0, blocks_total: int = 8, bytes_total: int = 1000, estimate_s: float | None = None,
           final: bool = False) -> dict:
    rows, nbytes, blocks = read
    return {"run_id": "r1", "command": "refresh", "model": "minilm-l6", "seconds": seconds,
            "bytes_total": bytes_total, "blocks_total": blocks_total, "estimate_s": estimate_s,
            "read": {"rows": rows, "bytes": nbytes, "blocks": blocks, "errors": errors},
            "embed": {"rows": embed, "errors": errors, "reused": reused, "deduped": 0},
            "write": {"rows": written - errors, "errors": errors, "held": 0, "carried": 0}, "final": final}


def test_expected_rows_scale_the_rows_read_by_the_bytes_left_and_are_exact_once_every_block_is_read() -> None:
    assert expected_rows(counts(1, (0, 0, 0), 0, 0)) == (None, False)  # nothing read yet: unknown
    assert expected_rows(counts(1, (100, 250, 2), 0, 0)) == (400, False)  # a quarter of the bytes gave 100 rows
    assert expected_rows(counts(1, (390, 1000, 8), 0, 0)) == (390, True)  # all 8 blocks read: the count itself


def test_rates_are_over_the_recent_window_and_a_finished_stage_shows_its_average() -> None:
    rates = Rates()
    rates.add(1.0, counts(1, (100, 250, 2), 0, 0))
    r = rates.add(5.0, counts(5, (300, 750, 6), 200, 100))
    assert r["read"] == 200 / 4 and r["embed"] == 200 / 4 and r["write"] == 100 / 4  # (d1 - d0) / (t1 - t0)
    r = rates.add(9.0, counts(9, (400, 1000, 8), 400, 400))
    view = stage_view(counts(9, (400, 1000, 8), 400, 400), r)
    # every stage finished: each shows rows / seconds at its last step forward (400 / 9), not the window's rate
    assert [s["rate"] for s in view["stages"]] == [round(400 / 9, 2)] * 3
    r = rates.add(12.0, counts(12, (400, 1000, 8), 400, 400))
    assert r["read"] == 300 / 11  # idle since 9 s: the window (1 s .. 12 s, under 20 s) holds 300 rows
    r = rates.add(30.0, counts(30, (400, 1000, 8), 400, 400))
    assert r["read"] == 0.0  # samples older than 20 s dropped: the window (9 s .. 30 s) saw nothing move
    assert stage_view(counts(12, (400, 1000, 8), 400, 400), r)["stages"][0]["rate"] == round(400 / 9, 2)


def test_eta_from_the_write_rate_else_from_the_plan_else_unknown() -> None:
    rates = {"read": 50.0, "embed": 40.0, "write": 20.0}
    view = stage_view(counts(10, (200, 500, 4), 150, 100), rates)  # 400 rows expected, 100 written, 20 rows/s
    assert view["eta"] == (400 - 100) / 20 and view["eta_basis"] == "rate"
    view = stage_view(counts(10, (200, 500, 4), 150, 0, estimate_s=70.0), rates | {"write": 0.0})
    assert view["eta"] == 60.0 and view["eta_basis"] == "plan"  # nothing written yet: the plan's time left
    started_earlier = {**counts(10, (200, 500, 4), 150, 0, estimate_s=70.0), "run_seconds": 25.0}
    assert stage_view(started_earlier, {})["eta"] == 45.0  # the plan's time counts from the run's start
    assert stage_view(counts(10, (200, 500, 4), 150, 0), {})["eta"] is None


def test_the_plain_line_names_every_stage_with_its_rows_rate_errors_reused_and_eta() -> None:
    view = stage_view(counts(65, (1024, 250, 2), 512, 300, errors=3, reused=40), {"read": 15.75, "embed": 8.0,
                                                                                   "write": 4.0})
    assert plain_line(view) == ("progress 1:05 · read 1,024/~4,096 rows 15.8/s · embed 512/~4,096 rows 8.0/s · "
                                "write 300/~4,096 rows 4.0/s · errors 3 · reused 40 · ETA 15:49")


def test_a_non_terminal_gets_a_line_every_interval_and_the_last_counts() -> None:
    out = io.StringIO()
    display = RunDisplay(Console(file=out, width=200), live=False, interval_s=3600)
    display("featx refresh: 8 shards")
    display.stages(counts(1, (100, 250, 2), 50, 0))  # within the interval: no line
    display.stages(counts(2, (400, 1000, 8), 400, 400, final=True))  # the stream's end: its last counts
    lines = out.getvalue().splitlines()
    assert lines[0] == "featx refresh: 8 shards"
    assert len(lines) == 2 and lines[1].startswith("progress 0:02 · read 400/400 rows")


def test_a_terminal_gets_one_live_display_that_stops_at_the_stream_end() -> None:
    out = io.StringIO()
    display = RunDisplay(Console(file=out, width=120, force_terminal=True), live=True)
    display.stages(counts(1, (100, 250, 2), 50, 0))
    display.stages(counts(2, (400, 1000, 8), 400, 400, final=True))
    display("committed snapshot 2")  # after the display stopped: a plain line below it
    text = out.getvalue()
    assert "featx refresh" in text and "400/400 rows" in text and "\x1b[" in text  # drawn in place
    assert "progress " not in text  # no plain lines on a terminal
    assert text.rstrip().endswith("committed snapshot 2")


def test_a_block_heard_twice_never_shows_more_rows_than_the_run_holds() -> None:
    c = counts(5, (400, 1000, 8), 430, 400)  # 30 rows of a retried block counted again by the embed stage
    assert [st["done"] for st in stage_view(c, {})["stages"]] == [400, 400, 400]


def test_the_last_frame_stays_when_the_final_counts_are_lost_and_nothing_draws_after_close() -> None:
    out = io.StringIO()
    display = RunDisplay(Console(file=out, width=120, force_terminal=True), live=True)
    display.stages(counts(1, (100, 250, 2), 50, 0))
    display.stages({"run_id": "r1", "final": True})  # the board was gone at the end
    assert "0/?" not in out.getvalue() and "100/~400 rows" in out.getvalue()
    display.close()
    before = out.getvalue()
    display.stages(counts(2, (400, 1000, 8), 400, 400))
    assert out.getvalue() == before
