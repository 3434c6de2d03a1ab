"""A node lost mid-run, on a real multi-node Ray (`ray.cluster_utils.Cluster`): the job still ends exact.

Runs in a child process (its own two-node cluster, apart from the session's one-node Ray): the embedding
actor is pinned to a worker node by a custom resource; once pieces have been journalled, that node is
removed (its raylet and workers die) and a replacement joins. Ray Data restarts the actor there and
retries the lost tasks; the run must publish exactly one row per input record.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipelines.demo.sample_data import write_text_shards
from pipelines.publish.manifest import load_manifest
from pipelines.read.table import read_table
from tests.integration.helpers import run_child

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent('''
    import json, sys, threading, time
    import ray
    from tests.isolation import LocalCluster
    from operators.io.storage import list_files
    from pipelines.config import build_config
    from pipelines.embed.job import run_embed

    inp, out, model = sys.argv[1:4]
    cluster = LocalCluster(num_cpus=1)  # every node's ports from the block the test gave this child
    gpu_node = cluster.add_node(num_cpus=1, resources={"embed_slot": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    cfg = build_config(None, {"input": inp, "format": "jsonl", "output": out, "model": model, "key_column": "id",
                              "piece_max_shards": 1, "journal_interval_s": 0, "embed_resources": {"embed_slot": 1}})
    result = {}
    def run():
        try:
            result.update(run_embed(cfg, progress=lambda m: None))
        except Exception as e:
            result["exception"] = repr(e)
    # the driver holds 5 s after journalling its first piece: the node is removed while the run is still running,
    # whatever the machine's speed (no race)
    import os
    os.environ["FEATX_FAILPOINTS"] = "driver-pause:journal:5"
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and t.is_alive():
        if any("/journal/" in f for f in list_files(out + "/_staging")):
            break
        time.sleep(0.05)
    killed_while_running = t.is_alive()
    removed = gpu_node.node_id
    cluster.remove_node(gpu_node, allow_graceful=False)
    time.sleep(1)
    cluster.add_node(num_cpus=1, resources={"embed_slot": 1})
    t.join(timeout=300)
    print("RESULT " + json.dumps({"killed_while_running": killed_while_running, "removed": removed,
                                  "report": result}), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


def test_node_lost_mid_run_the_job_still_ends_exact(tmp_path: Path, tiny_bert: str) -> None:
    write_text_shards(tmp_path / "in", fmt="jsonl", shards=12, max_per_topic=8, limit=48)
    out = tmp_path / "out"
    res = run_child(CHILD, [str(tmp_path / "in"), str(out), f"hf:{tiny_bert}"], timeout=420)  # under pytest's 600 s: a stuck child fails here, killed whole
    assert res["killed_while_running"], "the run finished before the node could be removed"
    report = res["report"]
    assert "exception" not in report, report
    assert report["status"] == "succeeded" and report["rows_out"] == 48
    keys = read_table(str(out))["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 48 and load_manifest(str(out))["rows"] == 48
