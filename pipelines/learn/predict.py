"""`featx predict`: apply a trained head to an embeddings table; write key, label, score, probabilities.

Ray Data streams the published files through a pool of tasks that load the head (small) once per task,
and each block is written as one Parquet file named after its first key, so a rerun overwrites the same
names. The head refuses a table of another dim or model (its vectors would mean something else).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import pyarrow as pa

from operators import columns as C
from operators.errors import InputError
from operators.io.parquet import arrow_filesystem
from operators.io.storage import join, short_hash, write_bytes
from operators.learn.heads import features, load_head, predict_proba
from operators.search.topk import vectors_from_arrow
from pipelines.publish.manifest import load_manifest, published_files


def predict_block(batch: pa.Table, head_dir: str, output: str, storage_options: dict[str, Any]) -> pa.Table:
    """One block -> one Parquet file of predictions; returns its row count."""
    import pyarrow.parquet as pq

    head, spec, _ = _cached_head(head_dir)
    if not batch.num_rows:
        return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
    proba = predict_proba(head, features(vectors_from_arrow(batch[C.EMBEDDING], spec.dim), spec, train=False))
    best = proba.argmax(1)
    labels = pa.array([spec.labels[i] for i in best])
    out = pa.table({
        C.KEY: batch[C.KEY], "label": labels, "score": pa.array(proba.max(1), pa.float32()),
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(proba.reshape(-1), pa.float32()), spec.n_classes),
    })
    meta = {b"featx_predict": json.dumps({"head": head_dir, "labels": spec.labels}, default=str).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(out.replace_schema_metadata(meta), sink, compression="zstd")
    name = f"pred-{short_hash(str(batch[C.KEY][0]), str(batch.num_rows), n=16)}.parquet"
    write_bytes(join(output, name), sink.getvalue().to_pybytes(), storage_options)
    return pa.table({"file": [name], "rows": [batch.num_rows]})


_HEADS: dict[str, Any] = {}


def _cached_head(head_dir: str) -> Any:
    if head_dir not in _HEADS:
        _HEADS[head_dir] = load_head(head_dir)
    return _HEADS[head_dir]


def run_predict(head_dir: str, embeddings: str, output: str, storage_options: dict[str, Any] | None = None,
                progress: Callable[[str], None] = print, ray_address: str | None = None) -> dict[str, Any]:
    import ray.data

    from pipelines.runtime import init_ray

    so = dict(storage_options or {})
    t0 = time.perf_counter()
    _, spec, meta = load_head(head_dir)
    manifest = load_manifest(embeddings, so)
    if manifest is None:
        raise InputError(f"{embeddings!r} has no published featx table (no _manifest.json)")
    if int(manifest["dim"]) != spec.dim:
        raise InputError(f"the head in {head_dir} takes dim {spec.dim} but {embeddings!r} has dim {manifest['dim']}; "
                         "apply it to a table embedded with the model it was trained on")
    trained_on = (spec.model or {}).get("weights_fingerprint")
    if trained_on and manifest.get("model", {}).get("weights_fingerprint") not in (None, trained_on):
        raise InputError(f"the head in {head_dir} was trained on {spec.model.get('model')} embeddings but "
                         f"{embeddings!r} holds {manifest['model'].get('model')} ones; re-embed or retrain")
    files = published_files(manifest, embeddings)
    init_ray(ray_address)
    ds = ray.data.read_parquet(files, columns=[C.KEY, C.EMBEDDING], filesystem=arrow_filesystem(files[0], so))
    ds = ds.map_batches(predict_block, fn_args=(str(head_dir), output, so), batch_format="pyarrow", batch_size=None)
    written = ds.take_all()
    rows = sum(r["rows"] for r in written)
    summary = {"head": str(head_dir), "embeddings": embeddings, "output": output, "rows": rows,
               "files": sorted(r["file"] for r in written), "labels": spec.labels,
               "seconds": round(time.perf_counter() - t0, 2), "head_trained": meta.get("trained")}
    write_bytes(join(output, "_predict.json"), json.dumps(summary, indent=1, default=str).encode(), so)
    progress(f"featx predict: {rows} rows -> {output} ({len(written)} files)")
    return summary
