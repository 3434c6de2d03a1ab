"""Incremental refresh against a full run, in one script: a table of many small shards, 1% of them changed.

Steps, all with :func:`pipelines.embed.job.run_embed` on one local Ray started once (``ray.init``, not counted):

``full``
    A first embed of ``--shards`` JSONL shards (``--rows-per-shard`` sentences each) into an empty output.
``refresh, nothing changed``
    The same job again: listing, planning against the manifest, no Ray job, no new snapshot.
``refresh, 1% changed``
    ``--changed`` fraction of the shards rewritten with new sentences (spread over the input), then a refresh:
    only those shards are embedded; the unchanged shards that share a piece (output file) with a changed one
    are carried over from the published files without running the model.
``full rerun, same data`` (``--full-rerun``)
    The changed input embedded from scratch into a fresh output: the cost a tool without incremental refresh
    pays every night. Off by default: it costs as much as ``full``, which is the baseline otherwise.

Printed and written to ``benchmarks/results/refresh.json``: seconds and shards embedded per step, rows
carried, listing time, and the ratios full / refresh. Run from the repository root::

    .venv/bin/python benchmarks/refresh.py                     # 10,000 shards, 1% changed, minilm-l6
    .venv/bin/python benchmarks/refresh.py --shards 1000       # quicker
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.read.formats import FORMATS  # noqa: E402
from operators.io.storage import list_shards  # noqa: E402
from pipelines.config import build_config  # noqa: E402
from pipelines.embed.job import run_embed  # noqa: E402
from pipelines.demo.sample_data import topic_sentences  # noqa: E402


def write_shards(folder: Path, n: int, rows: int, sentences: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [json.dumps({"id": f"s{i}-{r}", "text": rng.choice(sentences)}) for r in range(rows)]
        (folder / f"shard-{i:06d}.jsonl").write_text("\n".join(lines) + "\n")


def step(name: str, cfg: Any, command: str = "embed") -> dict[str, Any]:
    t0 = time.perf_counter()
    r = run_embed(cfg, progress=lambda m: None, command=command)
    wall = time.perf_counter() - t0
    out = {"step": name, "seconds": round(wall, 2), "shards_embedded": r["shards_processed"],
           "shards_total": r["shards_total"], "rows_embedded": r["rows_in"], "rows_carried": r["rows_carried"],
           "snapshot": r["snapshot"], "published_rows": r["published_rows"], "pieces_total": r["pieces_total"],
           "pieces_rebuilt": r["pieces_processed"], "files_written": r["data_files_written"]}
    print(f"{name:28s} {out['seconds']:9.1f} s  shards embedded {out['shards_embedded']:6d} / {out['shards_total']}"
          f"  rows embedded {out['rows_embedded']:6d}  rows carried {out['rows_carried']:6d}  snapshot {out['snapshot']}",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--rows-per-shard", type=int, default=1)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of shards rewritten before the refresh")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--max-length", type=int, default=None, help="tokenizer truncation (shorter: a quicker full run)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--full-rerun", action="store_true", help="also embed the changed input from scratch")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "refresh.json"))
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="featx-bench-refresh-"))
    try:
        sentences = [s for _, s in topic_sentences(max_per_topic=None)]
        inp = work / "in"
        t0 = time.perf_counter()
        write_shards(inp, args.shards, args.rows_per_shard, sentences)
        print(f"wrote {args.shards} shards in {time.perf_counter() - t0:.1f} s under {inp}", flush=True)
        t0 = time.perf_counter()
        listed = list_shards(str(inp), FORMATS["jsonl"].extensions)
        listing_s = time.perf_counter() - t0
        print(f"listing {len(listed)} shards: {listing_s:.2f} s", flush=True)

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        base = {"input": str(inp), "format": "jsonl", "model": args.model, "key_column": "id",
                "output": str(work / "out"), "max_length": args.max_length}
        steps = [step("full", build_config(None, base))]
        steps.append(step("refresh, nothing changed", build_config(None, base), "refresh"))
        rng = random.Random(1)
        n_changed = max(1, round(args.shards * args.changed))
        for i in rng.sample(range(args.shards), n_changed):
            lines = [json.dumps({"id": f"s{i}-{r}-v2", "text": rng.choice(sentences)}) for r in range(args.rows_per_shard)]
            (inp / f"shard-{i:06d}.jsonl").write_text("\n".join(lines) + "\n")
        steps.append(step(f"refresh, {args.changed:.0%} changed", build_config(None, base), "refresh"))
        if args.full_rerun:
            steps.append(step("full rerun, same data", build_config(None, {**base, "output": str(work / "out-full")})))
        ray.shutdown()

        full, refresh = steps[-1] if args.full_rerun else steps[0], steps[2]
        assert refresh["shards_embedded"] == n_changed, refresh
        assert refresh["published_rows"] == full["published_rows"] == args.shards * args.rows_per_shard
        result = {
            "benchmark": "refresh", "shards": args.shards, "rows_per_shard": args.rows_per_shard,
            "changed_shards": n_changed, "model": args.model, "max_length": args.max_length, "listing_seconds": round(listing_s, 3),
            "steps": steps,
            "ratios": {"full_over_refresh_seconds": round(full["seconds"] / refresh["seconds"], 2),
                       "full_over_noop_refresh_seconds": round(full["seconds"] / steps[1]["seconds"], 2),
                       "refresh_shards_embedded_fraction": round(refresh["shards_embedded"] / args.shards, 4)},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        }
        print(f"\nfull run {full['seconds']:.1f} s vs refresh {refresh['seconds']:.1f} s: "
              f"{result['ratios']['full_over_refresh_seconds']:.1f}x faster; embedded {refresh['shards_embedded']} of "
              f"{args.shards} shards; no-op refresh {steps[1]['seconds']:.1f} s")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
