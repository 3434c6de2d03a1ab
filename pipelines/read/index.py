"""`featx index`: build an approximate nearest-neighbour index (FAISS IVF or HNSW) over a published snapshot.

The index is stored beside the table under ``OUTPUT/_index/`` with that snapshot's number, content
fingerprint and metric (:mod:`pipelines.read.stored_index` finds it, checks it and searches with it).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np

from operators import columns as C
from operators.errors import InputError
from operators.io.storage import delete, get_fs, is_local, join, list_files, retry, write_bytes
from operators.search.topk import METRICS, vectors_from_arrow
from pipelines.read.stored_index import INDEX_DIR, KINDS, faiss_module, index_name
from pipelines.read.table import FeatxTable
from pipelines.read.table import open as open_table


def build_index(output: str, kind: str = "ivf", metric: str = "cosine", nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                storage_options: dict[str, Any] | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Build an index over the published snapshot and store it under ``OUTPUT/_index/``."""
    faiss = faiss_module()
    if kind not in KINDS:
        raise InputError(f"index kind {kind!r} is not supported; choose one of: {', '.join(KINDS)}")
    if metric not in METRICS:
        raise InputError(f"metric {metric!r} is not supported; choose one of: {', '.join(METRICS)}")
    t0 = time.perf_counter()
    table = open_table(output, storage_options=storage_options)
    if not table.rows:
        raise InputError(f"{output!r} has no rows to index")
    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    n, dim = table.rows, table.dim
    params: dict[str, Any]
    if kind == "ivf":
        nlist = nlist or max(1, min(int(np.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 training points per list
        nprobe = nprobe or max(1, min(nlist, int(np.ceil(nlist / 16)) + 4))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", fmetric)
        index.train(_sample(table, metric, max(nlist * 40, 10_000)))
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe}
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, fmetric)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "efConstruction": index.hnsw.efConstruction, "efSearch": ef_search}
    for chunk in table.iter_batches([C.EMBEDDING]):
        index.add(_prepared(vectors_from_arrow(chunk[C.EMBEDDING], dim), metric))
    name = index_name(table.snapshot, kind, metric)
    meta = {"kind": kind, "metric": metric, "snapshot": table.snapshot, "rows": int(index.ntotal), "dim": dim,
            "content_fingerprint": table.manifest.get("content_fingerprint"), "run_id": table.manifest.get("run_id"),
            "params": params, "file": f"{name}.faiss", "faiss_version": faiss.__version__,
            "build_seconds": round(time.perf_counter() - t0, 2), "built": time.time()}
    so = table.storage_options
    _store_index(faiss, index, join(output, INDEX_DIR, f"{name}.faiss"), so)
    write_bytes(join(output, INDEX_DIR, f"{name}.json"), json.dumps(meta, indent=1).encode(), so)  # written last
    old = [join(output, INDEX_DIR, p) for p in list_files(join(output, INDEX_DIR), so)
           if p.endswith((f"-{kind}-{metric}.json", f"-{kind}-{metric}.faiss")) and not p.startswith(name)]
    delete(old, so)
    progress(f"featx index: {kind} ({metric}) over {meta['rows']} rows of snapshot {table.snapshot} "
             f"-> {join(output, INDEX_DIR, name)}.faiss in {meta['build_seconds']} s")
    return meta


def _store_index(faiss: Any, index: Any, uri: str, so: dict[str, Any]) -> None:
    """Write through a local file (no in-memory copy of an index as large as the table), then put it in place."""
    import os
    import tempfile

    fs, path = get_fs(uri, so)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, local)
        retry(lambda: fs.put_file(local, path), f"uploading {uri!r}")


def _prepared(m: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        norms[norms == 0] = 1
        m = m / norms
    return np.ascontiguousarray(m, dtype=np.float32)


def _sample(table: FeatxTable, metric: str, want: int) -> np.ndarray:
    """An even sample of about ``want`` vectors (every n-th row), for IVF training."""
    stride = max(1, table.rows // want)
    parts = [vectors_from_arrow(c[C.EMBEDDING], table.dim)[::stride] for c in table.iter_batches([C.EMBEDDING])]
    return _prepared(np.concatenate(parts), metric)
