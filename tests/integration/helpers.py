"""Integration test helpers: input files of the sample photos, expected embeddings (the pure inner loop, no Ray) and
child processes with their own cluster."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from operators import columns as C
from pipelines.demo.sample_data import PHOTOS, crops


def write_image_files(folder: str | Path, per_photo: int = 4, photos: tuple[str, ...] = PHOTOS, seed: int = 0,
                      fmt: str = "jpg") -> dict[str, Any]:
    """Loose image files ``PHOTO/III.jpg`` (or .png/.webp)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    n = 0
    for name in photos:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, jpg in enumerate(crops(name, per_photo, rng)):
            path = folder / name / f"{i:03d}.{fmt}"
            if fmt == "jpg":
                path.write_bytes(jpg)
            else:
                Image.open(io.BytesIO(jpg)).save(path)
            n += 1
    return {"path": str(folder), "records": n, "shards": n}


def write_image_parquet(folder: str | Path, per_photo: int = 4, shards: int = 2, photos: tuple[str, ...] = PHOTOS,
                        seed: int = 0) -> dict[str, Any]:
    """Parquet shards with an ``image`` bytes column and a ``label`` column."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = [{"id": f"{name}-{i}", "image": jpg, "label": name}
            for name in photos for i, jpg in enumerate(crops(name, per_photo, rng))]
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards]), folder / f"part-{s:05d}.parquet")
    return {"path": str(folder), "records": len(rows), "shards": shards}


def reference_embeddings(inp: Path, model: str, key_column: str = "id") -> dict[str, np.ndarray]:
    """key -> vector for every record of the JSONL shards in ``inp``, embedded by read + preprocess + embed_table."""
    from operators.embed.embedder import embed_table
    from operators.read.readers import read_shard
    from operators.models.registry import load
    from pipelines.config import build_config
    from operators.read.loading import prepare_rows
    from pipelines.config import model_spec, read_options

    cfg = build_config(None, {"input": str(inp), "format": "jsonl", "output": "/unused", "model": model,
                              "key_column": key_column})
    spec = model_spec(cfg)
    backbone = load(spec)
    out: dict[str, np.ndarray] = {}
    for f in sorted(inp.glob("*.jsonl")):
        rows = prepare_rows(read_shard(str(f), f.name, read_options(cfg)), "p", spec.preprocessing, 0.0)
        t = embed_table(backbone, rows, 8)
        out.update(zip(t[C.KEY].to_pylist(), np.array(t[C.EMBEDDING].to_pylist(), dtype=np.float32)))
    return out


def assert_matches_reference(keys: list[str], vectors: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    """Every reference record exactly once, with the reference's vector."""
    assert len(keys) == len(set(keys)) == len(ref) and set(keys) == set(ref)
    got = dict(zip(keys, vectors))
    np.testing.assert_allclose(np.stack([got[k] for k in ref]), np.stack(list(ref.values())), atol=1e-5)


def run_child(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``script`` in a fresh Python (its own Ray cluster, apart from the session's Ray); its ``RESULT`` line."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])
