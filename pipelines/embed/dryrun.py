"""`featx plan` (and `featx refresh --dry-run`): what the next run would do, and how long it would take.

The plan reads what a run reads before its first Ray task, and nothing more: the input's listing and the
published manifest. It gives the shards that are new, changed, removed and unchanged, the pieces to build,
the bytes and (estimated) records to embed, the rows carried over; and a time from this output's earlier
runs (their reports under ``_runs/``): the startup and the per-row rate of the runs that embedded
something with the same model (and, when there are such runs, the same resource shape), median of each.
With no such run it says "no history". A run makes the same estimate at its start and its report compares
it with the time it took (``estimate``).
"""
from __future__ import annotations

import statistics
from typing import Any

from operators.io.storage import list_shards
from operators.read.formats import FORMATS
from pipelines.config import EmbedConfig, model_spec
from pipelines.embed.plan import WorkPlan, plan_pieces, plan_work
from pipelines.publish.manifest import load_manifest
from pipelines.publish.status import run_reports

NO_CHANGE_SECONDS = "no_change_seconds"


def survey(cfg: EmbedConfig, content_fp: str) -> tuple[list[Any], list[Any], dict[str, Any] | None, dict[str, Any] | None,
                                                       WorkPlan, list[str]]:
    """The listing, the pieces, the published manifest, the base (its vectors reusable: same content
    fingerprint, else None), the work plan and the removed shards: what a run decides before any Ray work."""
    so = dict(cfg.storage_options)
    previous = load_manifest(cfg.output, so)
    shards = list_shards(cfg.input, FORMATS[cfg.format].extensions, so, cfg.shard_fingerprint)
    pieces = plan_pieces(shards, cfg.piece_max_shards, int(cfg.piece_target_mb * (1 << 20)))
    base = previous if previous and previous.get("content_fingerprint") == content_fp else None
    plan = plan_work(pieces, base)
    removed = sorted({s["rel"] for p in (previous or {}).get("pieces", []) for s in p["shards"]}
                     - {s.rel for s in shards})
    return shards, pieces, previous, base, plan, removed


def work_of(plan: WorkPlan, previous: dict[str, Any] | None, base: dict[str, Any] | None,
            removed: list[str]) -> dict[str, Any]:
    """The work a plan means: shards by change, pieces to build, bytes and estimated records to embed."""
    embed = [s for w in plan.todo for s in w.embed]
    nbytes = sum(s.size for s in embed)
    # records per byte as the published snapshot read them (its shards' recorded counts and sizes)
    old = [s for p in (previous or {}).get("pieces", []) for s in p["shards"] if s.get("records") is not None]
    old_bytes = sum(s["size"] for s in old)
    per_byte = sum(s["records"] for s in old) / old_bytes if old_bytes else None
    return {
        "shards": {"new": len(plan.added), "changed": len(plan.changed), "removed": len(removed),
                   "unchanged": plan.unchanged},
        "pieces": {"to_build": len(plan.todo), "kept": len(plan.keep)},
        "embed": {"shards": len(embed), "bytes": nbytes,
                  "records_estimate": round(nbytes * per_byte) if per_byte is not None else None},
        "carry_rows": sum(r for w in plan.todo for src in w.carry for r in src["records"].values() if r),
        "reembed_everything": previous is not None and base is None,
        "pending": bool(plan.todo) or bool(removed) or previous is None or base is None,
    }


def estimate(work: dict[str, Any], runs: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Seconds the work should take, from earlier runs of this output: ``startup`` (Ray ready and the first
    result) plus records at the per-record rate after it; medians over the runs that embedded something with
    the same model, preferring those of the latest run's resource shape (actors, GPUs, threads: the cluster
    is not asked). ``None`` seconds when there is no history."""
    done = [r for r in runs if r.get("status") == "succeeded" and r.get("model") == model]
    if not work["pending"]:
        quiet = [float(r["seconds"]) for r in done if not r.get("rows_in") and r.get("seconds")]
        return {"seconds": round(statistics.median(quiet), 2) if quiet else None, "basis": f"{len(quiet)} runs "
                "that had nothing to do", "runs": len(quiet)}
    busy = [r for r in done if (r.get("rows_in") or 0) > 0 and r.get("seconds")]
    same = [r for r in busy if _shape(r) == _shape(busy[-1])] if busy else []
    pick = same or busy
    if not pick:
        return {"seconds": None, "basis": "no history: no earlier run of this output embedded with this model",
                "runs": 0}
    records = work["embed"]["records_estimate"]
    if records is None:  # no counts yet: the bytes at the earlier runs' bytes per record
        per = [r["bytes_embedded"] / r["rows_in"] for r in pick if r.get("bytes_embedded")]
        records = round(work["embed"]["bytes"] / statistics.median(per)) if per else 0
    x = [_units(r.get("rows_in") or 0, r.get("rows_carried") or 0) for r in pick]
    y = [float(r["seconds"]) for r in pick]
    quiet = [float(r["seconds"]) for r in done if not r.get("rows_in") and r.get("seconds")]
    fixed, per_unit = _fit(x, y, pick, statistics.median(quiet) if quiet else 0.0)
    units = _units(records, work["carry_rows"])
    return {"seconds": round(fixed + per_unit * units, 2), "fixed_seconds": round(fixed, 2),
            "records_per_second": round(1 / per_unit, 2) if per_unit else None, "records": records,
            "runs": len(pick), "basis": f"{len(pick)} earlier runs" + (" of the latest run's resource shape" if same
                                                                       else " (other resource shapes)")}


def _units(records: int, carried: int) -> float:
    """A run's work in records to embed; a carried row (copied, no model) counts as 1/20 of one."""
    return records + carried / 20


def _fit(x: list[float], y: list[float], runs: list[dict[str, Any]], quiet: float) -> tuple[float, float]:
    """seconds = fixed + per_unit x units: least squares over runs of different sizes; with one size, the
    fixed part is the runs' own startup (Ray ready) plus what a run with nothing to do takes (``quiet``:
    listing, planning, reading the manifest)."""
    if len(set(x)) >= 2:
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx = sum((a - mx) ** 2 for a in x)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
        if slope > 0 and my - slope * mx >= 0:
            return my - slope * mx, slope
    fixed = quiet + statistics.median(float((r.get("startup") or {}).get("ray_ready") or 0) for r in runs)
    per = statistics.median((b - fixed) / a for a, b in zip(x, y) if a > 0)
    return fixed, max(per, 1e-6)


def _shape(report: dict[str, Any]) -> tuple[Any, ...]:
    res = report.get("resources") or {}
    return (res.get("max_actors"), res.get("num_gpus") or res.get("cluster_gpus"), res.get("torch_threads"))


def plan_run(cfg: EmbedConfig, command: str = "refresh") -> dict[str, Any]:
    """`featx plan`: the next run's work and its estimated time; nothing is written, no Ray starts."""
    from pipelines.embed.job import content_fingerprint

    spec = model_spec(cfg)
    cfp = content_fingerprint(cfg, spec)
    shards, pieces, previous, base, plan, removed = survey(cfg, cfp)
    work = work_of(plan, previous, base, removed)
    runs = run_reports(cfg.output, cfg.storage_options)
    return {"output": cfg.output, "command": command, "model": spec.name, "snapshot": (previous or {}).get("snapshot"),
            "shards_total": len(shards), "pieces_total": len(pieces), **work,
            "estimate": estimate(work, runs, spec.name)}
