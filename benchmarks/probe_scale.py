"""The linear probe at scale: 1 million x 384 generated features, labelled, on 2 cores.

A featx table of clustered, labelled vectors (10 classes, overlapping Gaussian clusters, 384 dims) is
published without a model (``write_vector_table``); then, for each ``--rows`` size:

``featx``
    :func:`pipelines.learn.train.run_train` with the linear head, ``--workers`` Ray Train workers: the scan
    pre-pass (label counts, moments) in Ray tasks, the rows streamed by Ray Data into the workers (the
    driver never holds them), the L2 strength by 5-fold CV on a ``cv_max_rows`` sample, the final
    full-batch L-BFGS fit on every training row. The summary's own timings split CV and the final fit.
``featx solver, 1 process`` (the ceiling of featx's own solver)
    :func:`operators.learn.convex.solve` at the C featx chose, in this process, on the rows already in memory
    (no Ray, no reads, no CV): what the final fit costs with nothing around it.
``scikit-learn`` (what a user runs instead)
    ``LogisticRegression(C=<featx's C>, class_weight="balanced")`` (lbfgs) on the same rows in memory,
    standardised by ``StandardScaler``: one fit, no CV (``LogisticRegressionCV`` with its defaults fits
    5 folds x 10 Cs; on 1M rows that is 50 such fits). Skipped above ``--sklearn-max-rows``.

Peak memory is sampled every 0.2 s over all processes of this session (driver, Ray's processes and workers).
The predictions of featx's head and scikit-learn's fit must agree on at least 99% of held-out rows, else
the script exits 1. Figures go to ``benchmarks/results/probe_scale.json``. Run from the repository root::

    .venv/bin/python benchmarks/probe_scale.py                         # 250k, 500k, 1M rows (~25 min on 2 cores)
    .venv/bin/python benchmarks/probe_scale.py --rows 100000           # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "probe_scale.json"


def make_data(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, labelled features: each class a Gaussian around its own centre, overlapping (not separable)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32) * 0.12
    y = rng.integers(0, classes, size=n)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # in chunks: no float64 copy of the whole matrix
        e = min(n, s + 100_000)
        x[s:e] = centres[y[s:e]] + rng.standard_normal(size=(e - s, dim), dtype=np.float32)
    return x, y


class PeakRSS:
    """Peak total resident memory of this process and all its descendants (Ray's processes included)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        import psutil

        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.2)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._total()
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def one_size(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import torch
    from safetensors.numpy import load_file

    from operators.learn.convex import Shard, solve
    from operators.learn.heads import scaler_from_moments
    from pipelines.config import TrainConfig, build_config
    from pipelines.demo.sample_data import write_vector_table
    from pipelines.learn.train import run_train

    x, y = make_data(n, args.dim, args.classes)
    table = root / f"table-{n}"
    t0 = time.perf_counter()
    split = np.where(np.arange(n) % 10 == 0, "test", "train")  # 10% held out for the agreement check
    write_vector_table(str(table), x, {"label": y.astype(np.int64), "split": split})
    publish_s = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in (table / "data").iterdir()) / 2**20
    print(f"{n:,} rows x {args.dim}: table published ({mb:.0f} MiB of Parquet, {publish_s:.1f} s)", flush=True)

    cfg = build_config(None, {"embeddings": str(table), "label_column": "label", "split_column": "split",
                              "head": "linear", "output": str(root / f"head-{n}"), "num_workers": args.workers,
                              "cpus_per_worker": args.cpus_per_worker,
                              **({"cv_max_rows": args.cv_max_rows} if args.cv_max_rows else {})},
                       cls=TrainConfig)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        summary = run_train(cfg, progress=lambda m: print("  " + m, flush=True))
        featx_s = time.perf_counter() - t0
    solver = summary["solver"]
    out: dict[str, Any] = {
        "rows": n, "dim": args.dim, "classes": args.classes, "parquet_mib": round(mb, 1),
        "featx": {"seconds": round(featx_s, 2), "cv_seconds": solver["cv_seconds"], "fit_seconds": solver["fit_seconds"],
                  "c": solver["c"], "iterations": solver["iterations"], "evaluations": solver["evaluations"],
                  "converged": solver["converged"], "grad_max": solver["grad_max"], "cv_rows": summary["cv"]["rows"],
                  "held_out_accuracy": summary["held_out"]["val_accuracy"], "peak_rss_gib": round(mem.peak / 2**30, 2),
                  "workers": solver["workers"]},
    }
    print(f"  featx: {featx_s:.1f} s (CV {solver['cv_seconds']:.1f} s on {summary['cv']['rows']:,} rows, final fit "
          f"{solver['fit_seconds']:.1f} s, {solver['iterations']} iterations), held-out accuracy "
          f"{summary['held_out']['val_accuracy']:.4f}, peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)

    # the same rows in this process: featx's scaler and solver alone, then scikit-learn
    train = split == "train"
    xs = x[train]
    mom = scaler_from_moments(xs.mean(0, dtype=np.float64), xs.var(0, dtype=np.float64))
    mean, std = np.asarray(mom["mean"], np.float32), np.asarray(mom["std"], np.float32)
    z = (xs - mean) / std
    counts = np.bincount(y[train], minlength=args.classes)
    cw = counts.sum() / (len(counts) * counts)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sol = solve(Shard(torch.from_numpy(z), torch.from_numpy(y[train].astype(np.int64)),
                      torch.from_numpy(cw[y[train]]), np.zeros(len(z), dtype=np.int64)), args.classes, solver["c"])
    ceiling_s = time.perf_counter() - t0
    out["solver_one_process"] = {"seconds": round(ceiling_s, 2), "iterations": sol.iterations}
    print(f"  featx's solver in 1 process, same C: {ceiling_s:.1f} s ({sol.iterations} iterations)", flush=True)

    head = load_file(str(root / f"head-{n}" / "head.safetensors"))
    zt = (x[~train] - mean) / std
    fx_pred = np.argmax(zt @ head["1.weight"].T + head["1.bias"], 1)
    del z
    if n <= args.sklearn_max_rows:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        t0 = time.perf_counter()
        sc = StandardScaler().fit(xs)
        clf = LogisticRegression(C=solver["c"], class_weight="balanced", max_iter=1000).fit(sc.transform(xs), y[train])
        sk_s = time.perf_counter() - t0
        sk_pred = clf.predict(sc.transform(x[~train]))
        agree = float((fx_pred == sk_pred).mean())
        out["sklearn_fit"] = {"seconds": round(sk_s, 2), "iterations": int(np.max(clf.n_iter_)),
                              "held_out_accuracy": float((sk_pred == y[~train]).mean()), "agreement": agree}
        print(f"  scikit-learn LogisticRegression, same C, 1 fit: {sk_s:.1f} s; same label on {agree:.4f} of held-out "
              "rows", flush=True)
    out["ratios"] = {
        "featx final fit / featx's solver in 1 process (ceiling)": round(solver["fit_seconds"] / ceiling_s, 3),
        **({"featx whole run / scikit-learn 1 fit (no CV)": round(featx_s / out["sklearn_fit"]["seconds"], 3),
            "featx final fit / scikit-learn 1 fit": round(solver["fit_seconds"] / out["sklearn_fit"]["seconds"], 3)}
           if "sklearn_fit" in out else {}),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--cv-max-rows", type=int, default=None, help="featx's cv_max_rows (default: the config's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process solver")
    ap.add_argument("--sklearn-max-rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    results = []
    with tempfile.TemporaryDirectory(prefix="featx-probe-") as d:
        for n in args.rows:
            results.append(one_size(n, args, Path(d)))
    ray.shutdown()
    failed = [r["rows"] for r in results if r.get("sklearn_fit", {}).get("agreement", 1.0) < 0.99
              or not r["featx"]["converged"]]
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
              "settings": vars(args) | {"out": str(args.out)}, "results": results, "failed": failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print("\nrows        featx s   CV s   fit s  iters  1-proc solver s  sklearn 1 fit s  peak RSS GiB  agree")
    for r in results:
        f, sk = r["featx"], r.get("sklearn_fit", {})
        print(f"{r['rows']:>9,}  {f['seconds']:8.1f} {f['cv_seconds']:6.1f} {f['fit_seconds']:7.1f} {f['iterations']:6d}"
              f"  {r['solver_one_process']['seconds']:15.1f}  {sk.get('seconds', float('nan')):15.1f}"
              f"  {f['peak_rss_gib']:12.2f}  {sk.get('agreement', float('nan')):.4f}")
    print(f"results: {args.out}" + (f"; FAILED (agreement < 0.99 or not converged) at {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
