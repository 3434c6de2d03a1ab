"""Memory at scale and start-up: featx's peak RSS for 1x and 10x the data, and the time to the first row.

On one local Ray (started once, its start timed apart), three ``run_embed`` jobs of ``minilm-l6`` over
JSONL shards of real sentences (Python's documentation) with the same shard and piece size:

``cold``  1x the data, the first job after ``ray.init``: worker processes, imports and the model load are
          all paid here, so its time to first result is the start-up a new user sees
``1x``    the same data again into a fresh output (warm worker processes)
``10x``   ten times the shards

A sampler thread reads every 0.2 s the resident memory of the driver (this process) and of every Ray
worker process (``ray::...`` command lines); each job reports the driver's peak, the largest single
worker's peak and the peak of all workers together. Streaming means the 10x figures stay within 1.2x of
the 1x ones. JSON in ``benchmarks/results/scaling.json``::

    .venv/bin/python benchmarks/scaling.py              # 600 and 6,000 sentences
    .venv/bin/python benchmarks/scaling.py --rows 200   # quicker
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.demo import sample_data  # noqa: E402

MB = 1 << 20


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process from /proc (None when it is gone)."""
    return rss_parts(pid).get("VmRSS")


def rss_parts(pid: int) -> dict[str, int]:
    """VmRSS and its parts from /proc: RssAnon (the process's own heap), RssFile, RssShmem (shared memory:
    for a Ray worker, the pages of the object store it has read or written, which the store bounds)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Ray's workers are children of the raylet, a child of the driver)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class RssSampler(threading.Thread):
    """Peak RSS of this process and of Ray's worker processes, sampled in the background."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.driver_peak = 0
            self.worker_peaks: dict[int, tuple[int, str]] = {}
            self.worker_anon_peaks: dict[int, int] = {}  # private memory only (RssAnon)
            self.worker_shmem_peaks: dict[int, int] = {}  # object-store pages mapped (RssShmem)
            self.workers_sum_peak = 0
            self.samples = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop_flag.is_set():
            try:
                driver = rss_bytes(me) or 0
                workers: dict[int, tuple[int, str]] = {}
                parts: dict[int, dict[str, int]] = {}
                for pid in descendants(me):  # this Ray's workers only (other Rays may run on the machine)
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    parts[pid] = rss_parts(pid) if cmd.startswith("ray::") else {}
                    rss = parts[pid].get("VmRSS")
                    if rss:
                        workers[pid] = (rss, cmd.split()[0][:60])
                with self.lock:
                    self.samples += 1
                    self.driver_peak = max(self.driver_peak, driver)
                    for pid, (rss, name) in workers.items():
                        old = self.worker_peaks.get(pid, (0, name))
                        self.worker_peaks[pid] = (max(old[0], rss), name if rss >= old[0] else old[1])
                        self.worker_anon_peaks[pid] = max(self.worker_anon_peaks.get(pid, 0), parts[pid].get("RssAnon", 0))
                        self.worker_shmem_peaks[pid] = max(self.worker_shmem_peaks.get(pid, 0),
                                                           parts[pid].get("RssShmem", 0))
                    self.workers_sum_peak = max(self.workers_sum_peak, sum(r for r, _ in workers.values()))
            except OSError:
                pass
            self.stop_flag.wait(self.period)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            peaks = sorted(self.worker_peaks.values(), reverse=True)
            return {"driver_peak_mb": round(self.driver_peak / MB, 1),
                    "worker_peak_max_mb": round(peaks[0][0] / MB, 1) if peaks else None,
                    "worker_peak_max_name": peaks[0][1] if peaks else None,
                    "worker_anon_peak_max_mb": round(max(self.worker_anon_peaks.values(), default=0) / MB, 1),
                    "worker_shmem_peak_max_mb": round(max(self.worker_shmem_peaks.values(), default=0) / MB, 1),
                    "workers_sum_peak_mb": round(self.workers_sum_peak / MB, 1),
                    "worker_processes_seen": len(peaks), "samples": self.samples,
                    "worker_peaks_mb": [[n, round(r / MB, 1)] for r, n in peaks[:8]]}


def write_shards(folder: Path, rows: int, shard_rows: int) -> int:
    """JSONL shards of ``shard_rows`` real sentences (ids unique).

    The corpus is shuffled once (fixed seed) and cycled, so 1x is a sample of the same sentences as 10x:
    the corpus is grouped by topic, and its first 600 sentences (the 1x of an earlier version) are shorter
    than the rest, so 10x met longer sentences, hence bigger batches, than 1x ever did."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    sents = [s for _, s in sample_data.topic_sentences(max_per_topic=None)]
    random.Random(0).shuffle(sents)
    n = 0
    for start in range(0, rows, shard_rows):
        with open(folder / f"part-{start // shard_rows:05d}.jsonl", "w") as f:
            for i in range(start, min(rows, start + shard_rows)):
                f.write(json.dumps({"id": f"t{i:07d}", "text": sents[i % len(sents)]}) + "\n")
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=600, help="sentences at 1x (default %(default)s); 10x is ten times")
    p.add_argument("--shard-rows", type=int, default=100, help="sentences per JSONL shard (default %(default)s)")
    p.add_argument("--piece-max-shards", type=int, default=2, help="shards per piece (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-actors", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per embedding actor")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scaling.json")
    a = p.parse_args(argv)

    import ray
    import ray.data

    from pipelines.config import build_config
    from pipelines.embed.job import run_embed

    load0 = os.getloadavg()
    sampler = RssSampler()
    sampler.start()
    work = Path(tempfile.mkdtemp(prefix="featx-scaling-"))
    results: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init = round(time.perf_counter() - t0, 2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        print(f"ray.init {ray_init} s; load average {load0[0]:.2f}", flush=True)
        for name, scale in (("cold", 1), ("1x", 1), ("10x", 10)):
            data = work / f"in-{scale}x"
            if not data.exists():
                write_shards(data, a.rows * scale, a.shard_rows)
            out = work / f"out-{name}"
            cfg = build_config(None, {
                "input": str(data), "output": str(out), "format": "jsonl", "model": "minilm-l6",
                "batch_size": a.batch_size, "max_actors": a.max_actors, "num_cpus": a.num_cpus,
                "piece_max_shards": a.piece_max_shards, "torch_threads": a.torch_threads})
            load_before = os.getloadavg()[0]
            sampler.reset()
            t0 = time.perf_counter()
            report = run_embed(cfg, progress=lambda m: None)
            wall = time.perf_counter() - t0
            time.sleep(0.5)  # one more sample after the end
            mem = sampler.snapshot()
            r = {"rows": report["rows_in"], "seconds": round(wall, 2), "rows_per_second": report["rows_per_second"],
                 "seconds_to_first_result": report["seconds_to_first_result"], "pieces": report["pieces_processed"],
                 "data_files": report["data_files_written"], "stage_seconds": report["stage_seconds"],
                 "loadavg_1min_before": round(load_before, 2), **mem}
            results[name] = r
            print(f"{name:>4}: {r['rows']} rows in {r['seconds']} s ({r['rows_per_second']} rows/s), first result after "
                  f"{r['seconds_to_first_result']} s, {r['pieces']} pieces; peak RSS driver {mem['driver_peak_mb']} MB, "
                  f"largest worker {mem['worker_peak_max_mb']} MB ({mem['worker_peak_max_name']}; private "
                  f"{mem['worker_anon_peak_max_mb']} MB, object-store pages {mem['worker_shmem_peak_max_mb']} MB), all workers "
                  f"{mem['workers_sum_peak_mb']} MB; load {load_before:.2f}", flush=True)
    finally:
        sampler.stop_flag.set()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    ratios = {}
    if "1x" in results and "10x" in results:
        for k in ("driver_peak_mb", "worker_peak_max_mb", "worker_anon_peak_max_mb", "workers_sum_peak_mb"):
            if results["1x"].get(k) and results["10x"].get(k):
                ratios[f"{k} 10x/1x"] = round(results["10x"][k] / results["1x"][k], 3)
    startup = {"ray_init_seconds": ray_init,
               "cold_seconds_to_first_result": results.get("cold", {}).get("seconds_to_first_result"),
               "warm_seconds_to_first_result": results.get("1x", {}).get("seconds_to_first_result")}
    print("\nmemory ratios (target <= 1.2):", ratios)
    print("start-up:", startup)
    payload = {"benchmark": "scaling", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": vars(a) | {"out": str(a.out)},
               "loadavg_at_start": [round(x, 2) for x in load0], "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
               "nproc": os.cpu_count(), "results": results, "ratios": ratios, "startup": startup}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
