"""Exact search over a large featx table: featx's streaming search against a numpy full-matrix baseline.

    .venv/bin/python benchmarks/search.py                       # 1,000,000 x 384 (generated), 64 queries
    .venv/bin/python benchmarks/search.py --rows 100000 --quick # a smoke run

One generated table (clustered Gaussian vectors, float32, published with a real manifest) is searched by
each case in its own subprocess, so that each case's peak RSS is its own:

- numpy full matrix (baseline): read every vector into one [rows, dim] array, normalise once, then
  ``M @ Q.T`` + argpartition per query batch. Load time reported apart from query time.
- featx exact: ``featx.open(...).search_many(Q, k)``: streams the manifest's files in chunks of 65,536 rows;
  nothing is loaded up front; every batch of queries is one pass over the files.
- featx + FAISS IVF: ``featx index`` once (build time reported), then ``search_many`` through the index;
  recall@10 against the exact results.

Queries run as one batch of --queries vectors and as single queries (--single of them). The results of
featx exact and numpy are compared (same keys in the same order). JSON goes to benchmarks/results/search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_table(out: str, rows: int, dim: int, seed: int = 0) -> float:
    from pipelines.demo.sample_data import write_vector_table

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32) * 2
    step = 100_000
    manifest = None
    # written in pieces of 100k rows so that generating the data needs no more memory than the search does
    from pipelines.publish.manifest import build_manifest, commit

    pieces = []
    for i, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        v = centres[rng.integers(0, 256, n)] + rng.standard_normal((n, dim), dtype=np.float32)
        sub = write_vector_table(f"{out}/_gen/{i:04d}", v, rows_per_file=n)
        f = sub["files"][0]
        src = Path(out) / "_gen" / f"{i:04d}" / f["path"]
        dst = Path(out) / "data" / f"part-{i:04d}.parquet"
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        pieces.append({"id": f"p{i:04d}", "shards": [{"uri": f"generated://{i}", "size": n}],
                       "files": [{"path": f"data/{dst.name}", "rows": n, "bytes": dst.stat().st_size}], "error_files": []})
        manifest = sub
    import shutil

    shutil.rmtree(Path(out) / "_gen")
    full = build_manifest(previous=None, run_id="generated", model=manifest["model"], model_fingerprint="generated",
                          content_fingerprint="generated", dim=dim, embedding_dtype="float32", input_uri="generated://",
                          input_format="parquet", pieces=pieces)
    commit(out, full)
    return time.perf_counter() - t0


def case(name: str, table: str, queries: np.ndarray, k: int, single: int) -> dict:
    """Runs inside the case's own process."""
    import featx

    base_rss = peak_rss_mb()
    out: dict = {"case": name}
    if name == "numpy":
        t0 = time.perf_counter()
        import pyarrow.parquet as pq

        # plain pyarrow + numpy, no featx: one preallocated matrix filled file by file (no double copies)
        manifest = json.loads((Path(table) / "_manifest.json").read_text())
        m = np.empty((manifest["rows"], manifest["dim"]), dtype=np.float32)
        keys_parts, at = [], 0
        for f in manifest["files"]:
            data = pq.read_table(str(Path(table) / f["path"]), columns=["key", "embedding"])
            m[at:at + data.num_rows] = data["embedding"].combine_chunks().flatten().to_numpy().reshape(data.num_rows, -1)
            keys_parts.append(data["key"].to_numpy(zero_copy_only=False).astype(str))
            at += data.num_rows
            del data
        keys = np.concatenate(keys_parts)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        out["load_seconds"] = time.perf_counter() - t0

        def run(q: np.ndarray) -> list[list[str]]:
            qn = q / np.linalg.norm(q, axis=1, keepdims=True)
            s = qn @ m.T
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(s, part, 1)
            order = np.argsort(-top, axis=1, kind="stable")
            return [list(keys[p[o]]) for p, o in zip(part, order)]
    elif name == "featx-exact":
        t = featx.open(table)
        out["load_seconds"] = 0.0
    elif name == "featx-exact-cached":
        t = featx.open(table, cache_mb=1e9)  # the first pass keeps the vectors; later searches score from memory
        t0 = time.perf_counter()
        t.search_many(queries[:1], k, use_index=False)
        out["load_seconds"] = time.perf_counter() - t0
        assert t._cache is not None

    if name.startswith("featx-exact"):
        def run(q: np.ndarray) -> list[list[str]]:
            return [h.keys for h in t.search_many(q, k, use_index=False)]
    elif name == "featx-faiss-ivf":
        from pipelines.read.index import build_index

        t0 = time.perf_counter()
        meta = build_index(table, kind="ivf", progress=lambda m: None)
        out["load_seconds"] = time.perf_counter() - t0
        out["index"] = meta["params"]
        t = featx.open(table)
        t.search_many(queries[:1], k)  # loads the index into memory (counted with the build)
        out["load_seconds"] = time.perf_counter() - t0

        def run(q: np.ndarray) -> list[list[str]]:
            hits = t.search_many(q, k)
            assert hits[0].method == "faiss-ivf", hits[0].note
            return [h.keys for h in hits]

    t0 = time.perf_counter()
    res = run(queries)
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(single):
        run(queries[i:i + 1])
    single_s = time.perf_counter() - t0
    out.update({
        "batch_queries": len(queries), "batch_seconds": round(batch_s, 3), "batch_qps": round(len(queries) / batch_s, 2),
        "single_queries": single, "single_seconds": round(single_s, 3), "single_qps": round(single / single_s, 3) if single else None,
        "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(base_rss, 1), "results": res,
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=64, help="queries in the batch")
    ap.add_argument("--single", type=int, default=3, help="single queries timed one by one")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--workdir", default=None, help="where the generated table goes (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search.json"))
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 16 queries")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.rows, a.queries, a.single = min(a.rows, 100_000), 16, 2
    rng = np.random.default_rng(42)
    if a.case:  # child process
        q = np.load(Path(a.table) / "_bench_queries.npy")
        print(json.dumps(case(a.case, a.table, q, a.k, a.single)))
        return

    tmp = tempfile.TemporaryDirectory(dir=a.workdir)
    table = str(Path(tmp.name) / "table")
    print(f"generating {a.rows:,} x {a.dim} float32 vectors ({a.rows * a.dim * 4 / 2**30:.2f} GiB) ...", flush=True)
    gen_s = make_table(table, a.rows, a.dim)
    import featx

    t = featx.open(table)
    sample = t.to_arrow(["embedding"]).slice(0, 50_000)  # queries near the data: perturbed stored vectors
    from operators.search.topk import vectors_from_arrow

    base = vectors_from_arrow(sample["embedding"], a.dim)
    q = base[rng.integers(0, len(base), a.queries)] + rng.standard_normal((a.queries, a.dim), dtype=np.float32) * 0.5
    np.save(Path(table) / "_bench_queries.npy", q.astype(np.float32))
    del sample, base
    disk = sum(f.stat().st_size for f in (Path(table) / "data").iterdir())
    print(f"table: {disk / 2**30:.2f} GiB of Parquet in {len(t.files)} files, written in {gen_s:.1f} s; load average {os.getloadavg()}")

    results = {}
    for name in ("numpy", "featx-exact", "featx-exact-cached", "featx-faiss-ivf"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--table", table, "--single", str(a.single), "-k", str(a.k)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"case {name} failed")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:16s} batch {r['batch_qps']:9.2f} q/s  single {r['single_qps']} q/s  peak RSS {r['peak_rss_mb']:8.1f} MB  "
              f"load/build {r['load_seconds']:.1f} s  (case wall {time.perf_counter() - t0:.1f} s)", flush=True)

    exact, ref = results["featx-exact"]["results"], results["numpy"]["results"]
    same = sum(a_ == b_ for a_, b_ in zip(exact, ref))
    recall = float(np.mean([len(set(x) & set(y)) / a.k for x, y in zip(results["featx-faiss-ivf"]["results"], exact)]))
    np_r, fx, iv, fc = results["numpy"], results["featx-exact"], results["featx-faiss-ivf"], results["featx-exact-cached"]
    summary = {
        "exact_equals_numpy": f"{same}/{len(ref)} queries with identical keys in identical order",
        "featx_exact_vs_numpy_batch_qps": round(fx["batch_qps"] / np_r["batch_qps"], 3),
        "featx_exact_vs_numpy_single_qps": round(fx["single_qps"] / np_r["single_qps"], 3) if a.single else None,
        "featx_exact_vs_numpy_peak_rss": round(fx["peak_rss_mb"] / np_r["peak_rss_mb"], 3),
        "featx_cached_vs_numpy_batch_qps": round(fc["batch_qps"] / np_r["batch_qps"], 3),
        "featx_cached_vs_numpy_single_qps": round(fc["single_qps"] / np_r["single_qps"], 3) if a.single else None,
        "featx_cached_vs_numpy_peak_rss": round(fc["peak_rss_mb"] / np_r["peak_rss_mb"], 3),
        "featx_faiss_vs_numpy_batch_qps": round(iv["batch_qps"] / np_r["batch_qps"], 3),
        "faiss_ivf_recall_at_10": round(recall, 4),
        "numpy_seconds_to_first_answer": round(np_r["load_seconds"] + np_r["batch_seconds"] / max(1, a.queries), 2),
        "featx_seconds_to_first_answer_single": round(fx["single_seconds"] / max(1, a.single), 2) if a.single else None,
    }
    for r in results.values():
        r.pop("results")
    doc = {"benchmark": "search", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": a.rows, "dim": a.dim, "k": a.k,
           "queries": a.queries, "table_gib": round(disk / 2**30, 3), "generate_seconds": round(gen_s, 1),
           "loadavg_at_end": os.getloadavg(), "nproc": os.cpu_count(), "cases": results, "ratios": summary}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))
    if same != len(ref):
        print("WARNING: featx exact and numpy disagree on some queries (near-ties in float32 are the usual cause)")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
