"""featx plan's time estimate from earlier run reports, against the same arithmetic done here with numpy."""
from __future__ import annotations

import numpy as np

from pipelines.embed.dryrun import estimate


def _work(records: int, pieces: int, pending: bool = True) -> dict:
    return {"pending": pending, "embed": {"records_estimate": records, "bytes": records * 50},
            "pieces": {"to_build": pieces}, "carry_rows": 0}


def _run(rows: int, seconds: float, pieces: int = 10, embed: float = 0.0, other: float = 0.0, model: str = "m",
         ray_ready: float = 2.0, actors: int = 2) -> dict:
    return {"status": "succeeded", "model": model, "rows_in": rows, "seconds": seconds, "pieces_processed": pieces,
            "stage_seconds": {"read": other / 2, "embed": embed, "write": other / 2}, "startup": {"ray_ready": ray_ready},
            "resources": {"max_actors": actors, "torch_threads": 1}}


def test_no_history_says_so() -> None:
    got = estimate(_work(100, 3), [_run(100, 10.0, model="other")], "m")
    assert got["seconds"] is None and got["basis"].startswith("no history")


def test_fixed_per_record_and_per_piece_seconds_from_earlier_runs() -> None:
    runs = [_run(1000, 40.0, pieces=20, embed=30.0, other=10.0), _run(0, 1.0), _run(0, 3.0),
            _run(300, 15.0, pieces=8, embed=9.6, other=6.4)]
    busy = [r for r in runs if r["rows_in"]]
    fixed = max(np.median([1.0, 3.0]), 2.0)  # Ray's startup (from the command's start), at least a no-op run
    shares = [0.75, 0.6]  # each run's embedding stage over all its stage seconds
    per_record = np.median([s * (r["seconds"] - fixed) / r["rows_in"] for s, r in zip(shares, busy)])
    per_piece = np.median([(1 - s) * (r["seconds"] - fixed) / r["pieces_processed"] for s, r in zip(shares, busy)])
    got = estimate(_work(100, 63), runs, "m")
    assert got["runs"] == 2
    assert abs(got["seconds"] - (fixed + per_record * 100 + per_piece * 63)) < 0.01


def test_the_fixed_part_holds_the_start_up_until_a_model_is_loaded_where_reports_have_it() -> None:
    runs = [_run(1000, 40.0, pieces=20, embed=30.0, other=10.0), _run(0, 1.0)]
    runs[0]["startup"]["first_actor_ready"] = 6.0  # Ray ready at 2 s, the first actor's model loaded at 6 s
    fixed = 6.0
    per_record, per_piece = 0.75 * (40.0 - fixed) / 1000, 0.25 * (40.0 - fixed) / 20
    got = estimate(_work(10, 5), runs, "m")
    assert got["fixed_seconds"] == fixed
    assert abs(got["seconds"] - (fixed + per_record * 10 + per_piece * 5)) < 0.01


def test_nothing_pending_is_the_time_of_runs_that_had_nothing_to_do() -> None:
    got = estimate(_work(0, 0, pending=False), [_run(1000, 50.0), _run(0, 2.0), _run(0, 4.0)], "m")
    assert got["seconds"] == 3.0


def test_runs_of_the_latest_resource_shape_are_preferred() -> None:
    runs = [_run(1000, 500.0, embed=400.0, other=100.0, actors=1), _run(1000, 50.0, embed=40.0, other=10.0, actors=4)]
    got = estimate(_work(500, 5), runs, "m")
    per_record = 0.8 * (50.0 - 2.0) / 1000
    per_piece = 0.2 * (50.0 - 2.0) / 10
    assert got["runs"] == 1 and "resource shape" in got["basis"]
    assert abs(got["seconds"] - (2.0 + per_record * 500 + per_piece * 5)) < 0.01
