"""Integration test helpers: input files of the sample photos, expected embeddings (the pure inner loop, no Ray) and
child processes with their own cluster."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.demo.sample_data import PHOTOS, crops

# the bundled photos the transfer-learning tests classify (one class each; test_transfer, test_linear_probe,
# test_finetune), in the order their figures were measured with
TRANSFER_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
                   "moon", "page", "rocket", "text", "clock")


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
    """key -> vector for every record of the JSONL shards in ``inp``, computed by transformers alone (no featx
    code): the folder's tokenizer and AutoModel, then mean pooling over the attention mask, which is what
    featx's ``hf:<folder>`` models promise (pooling mean, no normalisation)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    assert model.startswith("hf:"), "the independent reference covers hf:<folder> models"
    folder = model[len("hf:"):]
    tok = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder).eval()
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for f in sorted(inp.glob("*.jsonl")):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                enc = tok(rec["text"], truncation=True, max_length=encoder.config.max_position_embeddings,
                          return_tensors="pt")
                hidden = encoder(**enc).last_hidden_state[0]
                mask = enc["attention_mask"][0].unsqueeze(-1).float()
                out[f"{f.name}#{rec[key_column]}"] = ((hidden * mask).sum(0) / mask.sum()).numpy()
    return out


def assert_matches_reference(keys: list[str], vectors: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    """Every reference record exactly once, with the reference's vector."""
    assert len(keys) == len(set(keys)) == len(ref) and set(keys) == set(ref)
    got = dict(zip(keys, vectors))
    np.testing.assert_allclose(np.stack([got[k] for k in ref]), np.stack(list(ref.values())), atol=1e-5)


def run_child(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``script`` in a fresh Python (its own Ray cluster, own ports and temp dir: tests/isolation.py), killed
    with its whole process group when it returns or runs past ``timeout``; its ``RESULT`` line."""
    from tests.isolation import python

    proc = python(["-c", script, *args], timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])
