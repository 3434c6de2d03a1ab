"""Multi-node placement on a real `ray.cluster_utils.Cluster`: CPU stages on the CPU node, embedding on the GPU node.

Runs in a child process (its own cluster, apart from the session's one-node Ray). The head has no CPUs
(as on KubeRay, where the head only coordinates); one worker node is CPU-only and offers the custom
resource that read/preprocess tasks ask for; the other has a logical GPU that the embedding actors ask
for. The run report records, per stage, the node ids the rows went through.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipelines.demo.sample_data import write_text_shards
from pipelines.read.table import read_table
from tests.integration.helpers import assert_matches_reference, reference_embeddings, run_child

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent('''
    import json, sys
    import ray
    from tests.isolation import LocalCluster
    from pipelines.config import build_config
    from pipelines.embed.job import run_embed

    inp, out, model = sys.argv[1:4]
    cluster = LocalCluster(num_cpus=0)  # every node's ports from the block the test gave this child
    cpu_node = cluster.add_node(num_cpus=2, resources={"featx_preprocess": 1000})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    cfg = build_config(None, {"input": inp, "format": "jsonl", "output": out, "model": model, "key_column": "id",
                              "piece_max_shards": 1, "num_gpus": 0.5, "num_cpus": 0.5, "min_actors": 1,
                              "max_actors": 2, "preprocess_resources": {"featx_preprocess": 1}})
    report = run_embed(cfg, progress=lambda m: None)
    print("RESULT " + json.dumps({"report": report, "cpu_node": cpu_node.node_id, "gpu_node": gpu_node.node_id,
                                  "head": cluster.head_node.node_id}), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


def test_cpu_stages_on_cpu_nodes_embedding_on_gpu_nodes(tmp_path: Path, tiny_bert: str) -> None:
    info = write_text_shards(tmp_path / "in", fmt="jsonl", shards=4, max_per_topic=4, limit=24)
    out = tmp_path / "out"
    res = run_child(CHILD, [str(tmp_path / "in"), str(out), f"hf:{tiny_bert}"], timeout=400)
    report, n = res["report"], info["records"]
    assert report["status"] == "succeeded" and report["rows_out"] == n

    where = report["stage_nodes"]
    assert where["preprocess"] == {res["cpu_node"]: n}  # read + preprocess only where featx_preprocess is offered
    assert where["embed"] == {res["gpu_node"]: n}  # the embedding actors only on the GPU node
    assert sum(where["write"].values()) == n  # writes take no CPU: any node
    assert report["resources"]["min_actors"] == 1 and report["resources"]["max_actors"] == 2  # the pool's bounds

    table = read_table(str(out))
    assert_matches_reference(table["key"].to_pylist(), np.array(table["embedding"].to_pylist(), dtype=np.float32),
                             reference_embeddings(tmp_path / "in", f"hf:{tiny_bert}"))
