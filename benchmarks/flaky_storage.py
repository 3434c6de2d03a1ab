"""Flaky object storage: the issue-16 scenario (12 JSONL shards x 30 records, MiniLM, S3) run through a
fault-injecting front (tests/flaky_s3.py) before moto's S3 server, at several fault mixes.

For each scenario it prints and records: requests seen, faults injected (by operation and kind), the
outcome (published / failed with a storage error), rows published against the clean run's, featx's own
storage retries, and whether the published vectors equal the clean run's. A run that publishes fewer (or
other) rows than the clean run makes this script exit 1.

    .venv/bin/python benchmarks/flaky_storage.py [--json benchmarks/results/flaky_storage.json]

botocore's and s3fs's own retries stay at their defaults here (what a user runs); the tests turn
botocore's off to count featx's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.flaky_s3 import RANDOM_KINDS, FaultPlan, FlakyS3, Rule  # noqa: E402

SCENARIOS: dict[str, FaultPlan] = {
    "clean": FaultPlan(),
    "drop 5%": FaultPlan(rate=0.05, kinds=("drop",), seed=1),
    "all kinds 5%": FaultPlan(rate=0.05, kinds=RANDOM_KINDS, seed=2, delay_s=0.3),
    "all kinds 20%": FaultPlan(rate=0.2, kinds=RANDOM_KINDS, seed=3, delay_s=0.3),
    "one shard always 500": FaultPlan(rules=[Rule("read", "txt/part-00003", "500", 10**6)]),
    "one shard short body": FaultPlan(rules=[Rule("read", "txt/part-00005", "short", 10**6)]),
    "manifest PUT always 503": FaultPlan(rules=[Rule("write", "_manifest.json", "503", 10**6)]),
    "HEAD says empty (the reported fault)": FaultPlan(rules=[Rule("head", ".jsonl", "short", 10**6)]),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "flaky_storage.json"))
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    front = FlakyS3(port).start()
    os.environ.update({"AWS_ENDPOINT_URL": front.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    import numpy as np
    import ray
    import s3fs

    from operators.errors import StorageError
    from pipelines.config import build_config
    from pipelines.embed.job import run_embed
    from pipelines.publish.manifest import load_manifest
    from pipelines.read.table import read_table
    from pipelines.demo.sample_data import write_text_shards

    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    direct.mkdir("bench-in")
    folder = tempfile.mkdtemp()
    write_text_shards(folder, shards=12, max_per_topic=None, limit=360)
    direct.put(folder + "/", "bench-in/txt/", recursive=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: list[dict[str, Any]] = []
    clean_table = None
    bad = 0
    for i, (name, plan) in enumerate(SCENARIOS.items()):
        bucket = f"bench-out-{i}"
        direct.mkdir(bucket)
        out = f"s3://{bucket}/txt"
        cfg = build_config(None, {"input": "s3://bench-in/txt/", "format": "jsonl", "model": "minilm-l6",
                                  "output": out, "num_cpus": 1, "preprocess_num_cpus": 1})
        front.set_plan(plan)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"scenario": name}
        try:
            report = run_embed(cfg, progress=lambda m: None)
            row.update(outcome="published", rows=report["published_rows"], error_rows=report["published_error_rows"],
                       storage_retries=report["storage_retries"])
        except StorageError as e:
            row.update(outcome="storage error", message=str(e)[:160])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["requests"] = sum(front.requests.values())
        row["faults"] = {f"{op}/{kind}": n for (op, kind), n in sorted(front.injected.items())}
        front.clear()
        m = load_manifest(out, {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}})
        if row["outcome"] == "published":
            table = read_table(out).sort_by("key")
            if clean_table is None:
                clean_table = table
            same_keys = table["key"].to_pylist() == clean_table["key"].to_pylist()
            diff = float(np.abs(np.array(table["embedding"].to_pylist()) -
                               np.array(clean_table["embedding"].to_pylist())).max()) if same_keys else None
            row.update(same_rows_as_clean=same_keys, max_vector_diff=diff)
            bad += int(not same_keys or diff is None or diff > 1e-5)
        else:
            row["published_anything"] = m is not None
            bad += int(m is not None)
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"scenarios": results, "violations": bad}, indent=1))
    print(f"{len(results)} scenarios; runs that published fewer or other rows than the clean run, or published "
          f"after a storage error: {bad}")
    front.stop()
    server.stop()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
