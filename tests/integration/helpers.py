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


def assert_delta_readers_agree(output: str, storage_options: dict[str, Any] | None = None,
                               expected_keys: set[str] | None = None, snapshot: int | None = None,
                               every_reader: bool = True) -> int:
    """Every reader a user would point at the Delta table returns exactly the featx snapshot's rows and vectors:
    deltalake (Arrow dataset and pandas), Polars (through pyarrow, and natively over the version's files),
    DuckDB over the Arrow dataset (the array cast back to FLOAT[dim]) and Ray Data's ``read_delta``.
    Returns the Delta version read (the latest, or the one that shows ``snapshot``). ``every_reader=False``:
    deltalake's Arrow dataset only (time travel checks)."""
    import duckdb
    import polars as pl
    import ray
    from deltalake import DeltaTable

    import featx
    from pipelines.publish.delta import location, version_of

    table = featx.open(output, snapshot=snapshot, storage_options=storage_options)
    want = table.to_arrow(["key", "embedding"])
    want_rows = dict(zip(want["key"].to_pylist(), np.asarray(want["embedding"].to_pylist(), np.float32)))
    if expected_keys is not None:
        assert set(want_rows) == expected_keys
    version = version_of(output, table.snapshot, storage_options)
    assert version is not None, f"no Delta version shows snapshot {table.snapshot}"
    uri, dso = location(output, storage_options)
    dt = DeltaTable(uri, version=version, storage_options=dso)
    assert dt.transaction_version("featx") == table.snapshot

    def same(name: str, keys: list[Any], vectors: Any) -> None:
        assert len(keys) == len(set(keys)), f"{name}: a key twice"
        assert set(keys) == set(want_rows), f"{name}: {len(set(keys) ^ set(want_rows))} keys differ"
        got = np.asarray([np.asarray(v, np.float32) for v in vectors])
        np.testing.assert_array_equal(got, np.stack([want_rows[k] for k in keys]), err_msg=name)

    ds = dt.to_pyarrow_dataset()
    t = ds.to_table(columns=["key", "embedding"])
    same("deltalake dataset", t["key"].to_pylist(), t["embedding"].to_pylist())
    if not every_reader:
        return version
    df = dt.to_pandas(columns=["key", "embedding"])
    same("pandas", df["key"].tolist(), df["embedding"].tolist())
    p = pl.read_delta(uri, version=version, storage_options=dso, use_pyarrow=True).select("key", "embedding")
    same("polars (use_pyarrow)", p["key"].to_list(), p["embedding"].to_list())
    if dso is None:  # natively Polars reads the version's files as they are (Array(Float32, dim))
        p = pl.scan_parquet(dt.file_uris()).select("key", "embedding").collect()
        same("polars scan_parquet(file_uris)", p["key"].to_list(), p["embedding"].to_list())
    con = duckdb.connect()
    con.register("delta_ds", ds)
    d = con.sql(f"SELECT key, embedding::FLOAT[{table.dim}] AS embedding FROM delta_ds").arrow()
    d = d.read_all() if hasattr(d, "read_all") else d
    same("duckdb", d["key"].to_pylist(), d["embedding"].to_pylist())
    assert ray.is_initialized()
    r = ray.data.read_delta(uri, version=version, storage_options=dso).select_columns(["key", "embedding"]).to_arrow_refs()
    r = pa.concat_tables(ray.get(r))
    same("ray.data.read_delta", r["key"].to_pylist(), r["embedding"].to_pylist())
    return version
