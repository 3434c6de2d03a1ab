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
carried, listing time, and the ratios full / refresh. Before the 1% refresh, ``featx plan`` (its function)
predicts the work and the time; its shard and piece counts must equal the refresh's (else the script
fails), and its time is compared with the refresh's (``plan.error``: measured / estimated - 1). Run from the repository root::

    .venv/bin/python benchmarks/refresh.py                     # 10,000 shards, 1% changed, minilm-l6
    .venv/bin/python benchmarks/refresh.py --shards 1000       # quicker

``--scenarios`` runs the record-level refresh (``reuse: content``) instead, three real-world changes, each
timed three ways on the same change (written to ``benchmarks/results/refresh_reuse.json``):

``append``
    20 JSONL shards, each grows by 2% new lines.
``re-export``
    every shard rewritten under a new name, its rows in another order, 1% of them edited.
``duplicates``
    an image set (the bundled photos' crops) to which byte-identical copies under other names are added
    (30% of the set afterwards; ``efficientnet-lite0``); then the whole set embedded from scratch in one run,
    with ``reuse: content`` (each distinct content once: copies in other blocks wait for their
    representative) against ``reuse: none`` (every copy embedded).

Sides of each ratio: the record-level refresh (``reuse: content``); the shard-level refresh a user had before
(``reuse: none``: every record of a changed shard embedded); a full rerun into a fresh output with Ray and
the page cache warm (not the cold first run). The rows each embeds are asserted; the vectors of the
record-level and shard-level tables must agree (else exit 1)::

    .venv/bin/python benchmarks/refresh.py --scenarios
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
           "rows_model": r.get("rows_embedded", r["rows_in"]), "rows_reused": r.get("rows_reused", 0),
           "rows_deduped": r.get("rows_deduped", 0), "lookup": r.get("reuse") or {},
           "snapshot": r["snapshot"], "published_rows": r["published_rows"], "pieces_total": r["pieces_total"],
           "pieces_rebuilt": r["pieces_processed"], "files_written": r["data_files_written"]}
    print(f"{name:28s} {out['seconds']:9.1f} s  shards embedded {out['shards_embedded']:6d} / {out['shards_total']}"
          f"  rows embedded {out['rows_embedded']:6d}  rows carried {out['rows_carried']:6d}  snapshot {out['snapshot']}",
          flush=True)
    return out


def _lines(shard: int, start: int, n: int) -> list[str]:
    return [json.dumps({"id": f"{shard}-{r}", "text": f"shard {shard} line {r}: a log line about event {r * 31 + shard}"})
            for r in range(start, start + n)]


def _vectors(out: Path) -> dict[str, Any]:
    from pipelines.read.table import read_table

    import numpy as np

    t = read_table(str(out), columns=["content_hash", "embedding"])
    return dict(zip(t["content_hash"].to_pylist(), np.asarray(t["embedding"].to_pylist(), np.float32)))


def _agree(a: Path, b: Path) -> float:
    """Largest difference between two tables' vectors, content by content (the same contents must be there)."""
    import numpy as np

    va, vb = _vectors(a), _vectors(b)
    assert set(va) == set(vb), "the two tables hold different contents"
    return float(max(np.abs(va[h] - vb[h]).max() for h in va))


def _three_ways(name: str, work: Path, inp: Path, cfg: dict[str, Any], change: Any, expect_embedded: int) -> dict[str, Any]:
    """First embed (cold, not compared), the change, then: record-level refresh, shard-level refresh (a copy of
    the same output), full rerun into a fresh output."""
    first = step(f"{name}: first embed (cold)", build_config(None, cfg))
    shutil.copytree(cfg["output"], str(work / "shard-level"))
    change()
    record = step(f"{name}: record-level refresh", build_config(None, cfg), "refresh")
    shard = step(f"{name}: shard-level refresh", build_config(None, {**cfg, "output": str(work / "shard-level"),
                                                                      "reuse": "none"}), "refresh")
    full = step(f"{name}: full rerun (warm)", build_config(None, {**cfg, "output": str(work / "full"), "reuse": "none"}))
    assert record["rows_model"] == expect_embedded, (record, expect_embedded)
    diff = _agree(Path(cfg["output"]), work / "shard-level")
    out = {"scenario": name, "steps": [first, record, shard, full], "max_vector_difference": diff,
           "ratios": {"shard_level_over_record_level_seconds": round(shard["seconds"] / record["seconds"], 2),
                      "full_rerun_over_record_level_seconds": round(full["seconds"] / record["seconds"], 2),
                      "rows_embedded_record_level_over_shard_level": round(record["rows_model"] / shard["rows_model"], 4)}}
    print(f"  {name}: record-level embeds {record['rows_model']} rows vs shard-level {shard['rows_model']}; "
          f"{out['ratios']['shard_level_over_record_level_seconds']:.2f}x faster than shard-level, "
          f"{out['ratios']['full_rerun_over_record_level_seconds']:.2f}x faster than a warm full rerun; "
          f"vectors agree within {diff:.2e}", flush=True)
    return out


def scenarios(args: argparse.Namespace) -> None:
    import ray

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    results, bad = [], []
    for name in args.only or ("append", "re-export", "duplicates"):
        work = Path(tempfile.mkdtemp(prefix=f"featx-bench-{name}-"))
        try:
            inp = work / "in"
            inp.mkdir()
            cfg = {"input": str(inp), "format": "jsonl", "model": args.model, "key_column": "id",
                   "output": str(work / "out"), "max_length": args.max_length}
            rows = args.rows_per_shard if args.rows_per_shard > 1 else 500
            if name in ("append", "re-export"):
                for s in range(20):
                    (inp / f"s{s:02d}.jsonl").write_text("\n".join(_lines(s, 0, rows)) + "\n")
            if name == "append":
                grow = max(1, rows // 50)

                def change() -> None:
                    for s in range(20):
                        with open(inp / f"s{s:02d}.jsonl", "a") as f:
                            f.write("\n".join(_lines(s, rows, grow)) + "\n")
                results.append(_three_ways(name, work, inp, cfg, change, 20 * grow))
            elif name == "re-export":
                edits = max(1, rows // 100)

                def change() -> None:
                    rng = random.Random(2)
                    for s in range(20):
                        lines = (inp / f"s{s:02d}.jsonl").read_text().splitlines()
                        rng.shuffle(lines)
                        for j in range(edits):
                            row = json.loads(lines[j])
                            lines[j] = json.dumps({"id": row["id"], "text": row["text"] + " (edited)"})
                        (inp / f"export-{s:02d}.jsonl").write_text("\n".join(lines) + "\n")
                        (inp / f"s{s:02d}.jsonl").unlink()
                results.append(_three_ways(name, work, inp, cfg, change, 20 * edits))
            else:
                import numpy as np

                from pipelines.demo.sample_data import PHOTOS, crops

                rng = np.random.default_rng(0)
                originals = [jpg for p in PHOTOS for jpg in crops(p, args.photos_per_class, rng)]
                copies = round(len(originals) * 0.3 / 0.7)
                for i, jpg in enumerate(originals):
                    (inp / f"img-{i:05d}.jpg").write_bytes(jpg)
                img = {"input": str(inp), "format": "images", "model": "efficientnet-lite0", "output": str(work / "out")}

                def change() -> None:  # byte-identical copies under other names: 30% of the set afterwards
                    for i in range(copies):
                        (inp / f"copy-{i:05d}.jpg").write_bytes(originals[i % len(originals)])
                res = _three_ways(name, work, inp, img, change, 0)
                # the whole set (with its copies) embedded from scratch in one run, against the same run with
                # reuse: none (every copy embedded): each distinct content must reach the model once
                fresh = step("duplicates: fresh embed of the set, reuse: content",
                             build_config(None, {**img, "output": str(work / "fresh")}))
                every = step("duplicates: fresh embed of the set, reuse: none",
                             build_config(None, {**img, "output": str(work / "fresh-none"), "reuse": "none"}))
                distinct = len(set(originals))
                assert fresh["rows_model"] == distinct, (fresh, distinct)
                fresh_diff = _agree(work / "fresh", work / "fresh-none")
                res["fresh_embed"] = {"reuse_content": fresh, "reuse_none": every, "files": len(originals) + copies,
                                      "distinct": distinct, "max_vector_difference": fresh_diff,
                                      "none_over_content_seconds": round(every["seconds"] / fresh["seconds"], 2)}
                print(f"  duplicates, fresh embed: {fresh['rows_model']} of {len(originals) + copies} files reach the "
                      f"model ({every['rows_model']} with reuse: none); "
                      f"{res['fresh_embed']['none_over_content_seconds']:.2f}x faster; vectors agree within "
                      f"{fresh_diff:.2e}", flush=True)
                results.append(res)
                if fresh_diff > 1e-4:
                    bad.append(name + " (fresh embed)")
            if results[-1]["max_vector_difference"] > 1e-4:
                bad.append(name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()
    out = Path(args.out).with_name("refresh_reuse.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "refresh_reuse", "model": args.model, "results": results,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "load": os.getloadavg()}}, indent=1))
    print(f"wrote {out}")
    if bad:
        sys.exit(f"vectors disagree with the shard-level baseline in: {', '.join(bad)}")


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
    ap.add_argument("--scenarios", action="store_true", help="the record-level refresh scenarios (see above)")
    ap.add_argument("--photos-per-class", type=int, default=6, help="--scenarios duplicates: originals per photo")
    ap.add_argument("--only", nargs="*", help="--scenarios: some of append, re-export, duplicates")
    args = ap.parse_args()
    if args.scenarios:
        scenarios(args)
        return

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
        # featx plan before the refresh: its shard counts must be exact; its time is compared with the run's
        from pipelines.embed.dryrun import plan_run

        plan = plan_run(build_config(None, base))
        steps.append(step(f"refresh, {args.changed:.0%} changed", build_config(None, base), "refresh"))
        planned = {"shards": plan["shards"], "pieces_to_build": plan["pieces"]["to_build"],
                   "records_estimate": plan["embed"]["records_estimate"], "estimate": plan["estimate"],
                   "measured_seconds": steps[-1]["seconds"],
                   "error": round(steps[-1]["seconds"] / plan["estimate"]["seconds"] - 1, 3)
                   if plan["estimate"].get("seconds") else None}
        assert plan["shards"]["changed"] == n_changed == steps[-1]["shards_embedded"], (plan["shards"], steps[-1])
        assert plan["shards"]["new"] == plan["shards"]["removed"] == 0
        assert plan["pieces"]["to_build"] == steps[-1]["pieces_rebuilt"], (plan["pieces"], steps[-1])
        print(f"featx plan said {plan['shards']['changed']} changed shards in {plan['pieces']['to_build']} pieces, "
              f"about {plan['estimate'].get('seconds')} s ({plan['estimate']['basis']}); the refresh took "
              f"{steps[-1]['seconds']:.1f} s (error {planned['error']})", flush=True)
        if args.full_rerun:
            steps.append(step("full rerun, same data", build_config(None, {**base, "output": str(work / "out-full")})))
        ray.shutdown()

        full, refresh = steps[-1] if args.full_rerun else steps[0], steps[2]
        assert refresh["shards_embedded"] == n_changed, refresh
        assert refresh["published_rows"] == full["published_rows"] == args.shards * args.rows_per_shard
        result = {
            "benchmark": "refresh", "shards": args.shards, "rows_per_shard": args.rows_per_shard,
            "changed_shards": n_changed, "model": args.model, "max_length": args.max_length, "listing_seconds": round(listing_s, 3),
            "steps": steps, "plan": planned,
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
