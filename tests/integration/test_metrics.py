"""A run's figures on the cluster's dashboards: read back from a real local Ray's Prometheus endpoint (the
node's metrics export port), the one a cluster's Prometheus scrapes."""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.config import build_config
from pipelines.demo.sample_data import write_text_shards
from pipelines.embed.job import run_embed


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, output: str, **tags: str) -> float | None:
    """The sample of metric ``name`` (Ray may prefix ``ray_``) whose labels hold ``output`` and ``tags``."""
    for line in text.splitlines():
        m = re.match(rf"^(?:ray_)?{name}\{{(.*)\}} ([0-9.e+-]+)$", line)
        if m and f'output="{output}"' in m.group(1) and all(f'{k}="{v}"' in m.group(1) for k, v in tags.items()):
            return float(m.group(2))
    return None


def test_a_runs_counters_reach_rays_metrics_endpoint(ray_local: Any, tmp_path: Path, tiny_bert: str) -> None:
    assert ray_local is not None, "the suite's own local Ray (tests/conftest.py) names its metrics port"
    port = ray_local.ports.node(0)["metrics_export_port"]
    write_text_shards(tmp_path / "in", fmt="jsonl", shards=2, max_per_topic=4, limit=12)
    out = str(tmp_path / "out")
    report = run_embed(build_config(None, {"input": str(tmp_path / "in"), "format": "jsonl", "output": out,
                                           "model": f"hf:{tiny_bert}", "key_column": "id"}), progress=lambda m: None)
    assert report["metrics"]["featx_rows_read"] == report["rows_in"] == 12
    deadline = time.monotonic() + 90  # the agent exports every few seconds
    text = ""
    while time.monotonic() < deadline:
        text = _scrape(port)
        if _value(text, "featx_rows_read_total", out, command="embed") is not None:
            break
        time.sleep(2)
    assert _value(text, "featx_rows_read_total", out, command="embed") == 12, text[-3000:]
    assert _value(text, "featx_rows_embedded_total", out) == report["rows_embedded"]
    assert _value(text, "featx_run_seconds", out) == report["seconds"]
    assert _value(text, "featx_stage_rows_per_second", out, stage="embed") > 0
