"""The reuse lookup (pipelines/embed/reuse.py) against published snapshots of growing size, and the driver's
memory while it runs.

For each ``--sizes`` N: a published snapshot of N rows (generated vectors, ``--dim``; each row's
``content_hash`` is the BLAKE2b-128 of a generated sentence, as featx computes it), and a refresh input of
``--new`` JSONL records of which half are contents the snapshot holds. Timed: :func:`plan_reuse` alone (the
partitioned hash join, from the snapshot's ``content_hash`` columns and the new records to the per-block
plan files), on a local Ray started once. Checked: the hits are exactly the planted ones (else exit 1).
Printed and written to ``benchmarks/results/reuse_lookup.json``: seconds, partitions, hits, and the driver's
resident memory before and after (it holds object refs and counts, never hashes). Run from the repository
root::

    .venv/bin/python benchmarks/reuse_lookup.py                        # 100,000 and 1,000,000 rows
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import hashlib
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.io.storage import list_shards  # noqa: E402
from operators.read.formats import FORMATS  # noqa: E402
from pipelines.config import build_config  # noqa: E402
from pipelines.embed.plan import plan_pieces  # noqa: E402
from pipelines.embed.reuse import plan_reuse  # noqa: E402
from pipelines.embed.stream import piece_blocks  # noqa: E402
from pipelines.embed.plan import PieceWork  # noqa: E402

ROWS_PER_FILE = 100_000


def _text(i: int) -> str:
    return f"generated sentence number {i} for the reuse lookup"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def snapshot(out: Path, rows: int, dim: int) -> dict[str, Any]:
    """A featx-shaped published snapshot: data files with key, source_uri, embedding, content_hash."""
    rng = np.random.default_rng(0)
    (out / "data").mkdir(parents=True)
    files = []
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        hashes = [hashlib.blake2b(_text(i).encode(), digest_size=16).digest() for i in range(start, start + n)]
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        t = pa.table({"key": [f"old#{i}" for i in range(start, start + n)], "source_uri": ["old"] * n,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                      "content_hash": pa.array(hashes, pa.binary(16))})
        path = f"data/part-{start:09d}.parquet"
        pq.write_table(t, out / path, compression="zstd")
        files.append({"path": path, "rows": n})
    return {"snapshot": 1, "rows": rows, "dim": dim, "files": files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--new", type=int, default=20_000, help="records in the refresh input (half of them stored)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reuse_lookup.json"))
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    results, ok = [], True
    for size in [int(s) for s in args.sizes.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="featx-bench-lookup-"))
        try:
            t0 = time.perf_counter()
            base = snapshot(work / "out", size, args.dim)
            made = time.perf_counter() - t0
            inp = work / "in"
            inp.mkdir()
            step = max(1, size // (args.new // 2))
            planted = [i * step for i in range(args.new // 2)]  # stored contents spread over the whole table
            lines = [json.dumps({"id": f"n{j}", "text": _text(i)}) for j, i in enumerate(planted)]
            lines += [json.dumps({"id": f"m{j}", "text": f"a new sentence {j}"}) for j in range(args.new - len(planted))]
            for s in range(20):
                (inp / f"shard-{s:02d}.jsonl").write_text("\n".join(lines[s::20]) + "\n")
            cfg = build_config(None, {"input": str(inp), "format": "jsonl", "output": str(work / "out"),
                                      "model": "minilm-l6", "key_column": "id"})
            shards = list_shards(str(inp), FORMATS["jsonl"].extensions)
            todo = [PieceWork(piece=p, embed=tuple(p.shards), carry=()) for p in plan_pieces(shards, 4, 64 << 20)]
            blocks = piece_blocks(todo, 1, images=False)
            rss0 = _rss_mb()
            t0 = time.perf_counter()
            _, stats = plan_reuse(cfg, blocks, base, str(work / "plans"))
            seconds = time.perf_counter() - t0
            rss1 = _rss_mb()
            good = stats["hits"] == len(planted)
            ok &= good
            row = {"snapshot_rows": size, "new_records": args.new, "planted_hits": len(planted), **stats,
                   "lookup_seconds": round(seconds, 2), "snapshot_written_seconds": round(made, 1),
                   "driver_rss_mb_before": round(rss0, 1), "driver_rss_mb_after": round(rss1, 1),
                   "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "hits_exact": good}
            results.append(row)
            print(f"{size:>10,d} stored rows: lookup {seconds:6.1f} s over {stats['partitions']} partitions, "
                  f"{stats['hits']:,d} hits of {len(planted):,d} planted; driver RSS {rss0:.0f} -> {rss1:.0f} MiB",
                  flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"\n{b['snapshot_rows'] / a['snapshot_rows']:.0f}x the rows: lookup {b['lookup_seconds'] / a['lookup_seconds']:.2f}x "
              f"the time; driver RSS growth during the lookup {a['driver_rss_mb_after'] - a['driver_rss_mb_before']:+.0f} "
              f"vs {b['driver_rss_mb_after'] - b['driver_rss_mb_before']:+.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "reuse_lookup", "results": results,
                                          "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}},
                                         indent=1))
    print(f"wrote {args.out}")
    if not ok:
        sys.exit("the lookup's hits differ from the planted ones")


if __name__ == "__main__":
    main()
