"""featx plan's time estimate from earlier run reports, against numpy's least squares and plain medians."""
from __future__ import annotations

import numpy as np

from pipelines.embed.dryrun import estimate


def _work(records: int, carry: int = 0, pending: bool = True) -> dict:
    return {"pending": pending, "embed": {"records_estimate": records, "bytes": records * 50}, "carry_rows": carry}


def _run(rows: int, seconds: float, model: str = "m", carried: int = 0, ray_ready: float = 2.0,
         actors: int = 2) -> dict:
    return {"status": "succeeded", "model": model, "rows_in": rows, "rows_carried": carried, "seconds": seconds,
            "startup": {"ray_ready": ray_ready}, "resources": {"max_actors": actors, "torch_threads": 1}}


def test_no_history_says_so() -> None:
    got = estimate(_work(100), [_run(100, 10.0, model="other")], "m")
    assert got["seconds"] is None and got["basis"].startswith("no history")


def test_runs_of_different_sizes_fit_a_line() -> None:
    runs = [_run(1000, 40.0), _run(100, 9.5, carried=400), _run(0, 1.2), _run(300, 15.0)]
    busy = [r for r in runs if r["rows_in"]]
    units = [r["rows_in"] + r["rows_carried"] / 20 for r in busy]
    slope, intercept = np.polyfit(units, [r["seconds"] for r in busy], 1)
    got = estimate(_work(200, carry=1000), runs, "m")
    assert got["runs"] == 3
    assert abs(got["seconds"] - (intercept + slope * (200 + 1000 / 20))) < 0.01


def test_one_size_of_run_takes_the_quiet_runs_as_the_fixed_part() -> None:
    runs = [_run(1000, 52.0, ray_ready=2.0), _run(0, 3.0), _run(0, 5.0)]
    got = estimate(_work(100), runs, "m")
    fixed = 2.0 + np.median([3.0, 5.0])
    assert abs(got["seconds"] - (fixed + 100 * (52.0 - fixed) / 1000)) < 0.01


def test_nothing_pending_is_the_time_of_runs_that_had_nothing_to_do() -> None:
    got = estimate(_work(0, pending=False), [_run(1000, 50.0), _run(0, 2.0), _run(0, 4.0)], "m")
    assert got["seconds"] == 3.0


def test_runs_of_the_latest_resource_shape_are_preferred() -> None:
    runs = [_run(1000, 500.0, actors=1), _run(100, 60.0, actors=1), _run(1000, 50.0, actors=4), _run(100, 6.0, actors=4)]
    got = estimate(_work(500), runs, "m")
    slope, intercept = np.polyfit([1000, 100], [50.0, 6.0], 1)
    assert got["runs"] == 2 and "resource shape" in got["basis"]
    assert abs(got["seconds"] - (intercept + slope * 500)) < 0.01
