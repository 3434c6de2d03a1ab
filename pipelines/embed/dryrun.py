"""`featx plan` (and `featx refresh --dry-run`): what the next run would do, and how long it would take.

The plan reads what a run reads before its first Ray task, and nothing more: the input's listing and the
published manifest. It gives the shards that are new, changed, removed and unchanged, the pieces to build,
the bytes and (estimated) records to embed, the rows carried over; and a time from this output's earlier
runs (their reports under ``_runs/``) that embedded something with the same model (those of the latest
run's resource shape when there are such): fixed seconds (the start-up until the first actor has loaded its
model, at least a run with nothing to do), and the rest split by their stage times into seconds per record (embedding) and per piece built
(reading, carrying, writing), medians of each (:func:`rates`).
With no such run it says "no history". A run makes the same estimate at its start and its report compares
it with the time it took (``estimate``).
"""
from __future__ import annotations

import statistics
from typing import Any

from operators.io.storage import list_shards
from operators.read.formats import FORMATS
from pipelines.config import EmbedConfig, model_spec
from pipelines.embed.plan import WorkPlan, content_fingerprint, plan_pieces, plan_work
from pipelines.publish.manifest import load_manifest
from pipelines.publish.status import run_reports

HISTORY_RUNS = 50  # the newest run reports an estimate reads (one GET each, at every run's start)


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
    quiet = [float(r["seconds"]) for r in done if not r.get("rows_in") and r.get("seconds")]
    fixed, per_record, per_piece = rates(pick, statistics.median(quiet) if quiet else 0.0)
    pieces = work["pieces"]["to_build"]
    return {"seconds": round(fixed + per_record * records + per_piece * pieces, 2), "fixed_seconds": round(fixed, 2),
            "seconds_per_record": round(per_record, 6), "seconds_per_piece": round(per_piece, 4), "records": records,
            "pieces": pieces, "runs": len(pick),
            "basis": f"{len(pick)} earlier runs" + (" of the latest run's resource shape" if same
                                                    else " (other resource shapes)")}


def rates(runs: list[dict[str, Any]], quiet: float) -> tuple[float, float, float]:
    """From earlier runs: the fixed seconds (the start-up of a run that embeds: listing and planning, Ray ready,
    the first actor's model loaded; any run with work pays it, however little it embeds; at least what a run
    with nothing to do takes), and the rest of each run split by its stage times: the embedding stage's share
    over its records (seconds per record), the read, preprocess and write stages' share over its pieces built
    (seconds per piece: reading, carrying and writing grow with the pieces a refresh rebuilds); medians over
    ``runs``."""
    fixed = max(quiet, statistics.median(_startup(r) for r in runs))
    per_record, per_piece = [], []
    for r in runs:
        stages = {k: float(v or 0) for k, v in (r.get("stage_seconds") or {}).items()}
        share = stages.get("embed", 0.0) / sum(stages.values()) if sum(stages.values()) > 0 else 1.0
        rest = max(0.0, float(r["seconds"]) - fixed)
        per_record.append(share * rest / r["rows_in"])
        per_piece.append((1 - share) * rest / max(1, int(r.get("pieces_processed") or 1)))
    return fixed, statistics.median(per_record), statistics.median(per_piece)


def _startup(report: dict[str, Any]) -> float:
    """Seconds from a run's start until its first actor had loaded its model (older reports: Ray ready); both
    count from the command's start, so they hold the listing and planning too."""
    startup = report.get("startup") or {}
    return float(startup.get("first_actor_ready") or startup.get("ray_ready") or 0)


def _shape(report: dict[str, Any]) -> tuple[Any, ...]:
    res = report.get("resources") or {}
    return (res.get("max_actors"), res.get("num_gpus") or res.get("cluster_gpus"), res.get("torch_threads"))


def plan_run(cfg: EmbedConfig, command: str = "refresh") -> dict[str, Any]:
    """`featx plan`: the next run's work and its estimated time; nothing is written, no Ray starts."""
    spec = model_spec(cfg)
    cfp = content_fingerprint(cfg, spec)
    shards, pieces, previous, base, plan, removed = survey(cfg, cfp)
    work = work_of(plan, previous, base, removed)
    runs = run_reports(cfg.output, cfg.storage_options, last=HISTORY_RUNS)
    return {"output": cfg.output, "command": command, "model": spec.name, "snapshot": (previous or {}).get("snapshot"),
            "shards_total": len(shards), "pieces_total": len(pieces), **work,
            "estimate": estimate(work, runs, spec.name)}
