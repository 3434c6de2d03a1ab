"""`featx index`: an approximate nearest-neighbour index (FAISS IVF or HNSW) stored beside the table.

The index is built from one published snapshot and stored under ``OUTPUT/_index/`` with that snapshot's
number, content fingerprint and metric. A search uses it only when all three match the snapshot being
read (and no row filter is given); otherwise the search is exact and says why. FAISS ids are the rows'
positions in the manifest's file order, so a hit's other columns are read from the row groups holding it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from operators import columns as C
from operators.errors import InputError
from operators.search.topk import METRICS, ROW, reported, vectors_from_arrow
from operators.io.storage import delete, get_fs, is_local, join, list_files, read_bytes, retry, write_bytes

if TYPE_CHECKING:
    from pipelines.read.table import FeatxTable

INDEX_DIR = "_index"
KINDS: tuple[str, ...] = ("ivf", "hnsw")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise InputError("the approximate index needs FAISS: pip install 'featx[index]' (faiss-cpu)") from None
    return faiss


def _name(snapshot: int, kind: str, metric: str) -> str:
    return f"{snapshot:08d}-{kind}-{metric}"


@dataclass
class Index:
    kind: str
    metric: str
    meta: dict[str, Any]
    faiss_index: Any

    def search(self, table: "FeatxTable", q: np.ndarray, k: int) -> tuple[list[pa.Table], int]:
        """Per query, the index's k best rows with their columns and a ``score`` (distance for l2)."""
        dist, ids = self.faiss_index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        score = -dist if self.metric == "l2" else dist  # FAISS L2 gives squared distances: higher is better here
        wanted = np.unique(ids[ids >= 0])
        rows = rows_at(table, wanted)
        pos = {int(r): i for i, r in enumerate(rows[ROW].to_numpy())} if rows.num_rows else {}
        out = []
        for qi in range(len(q)):
            keep = ids[qi] >= 0
            t = rows.take(pa.array([pos[int(r)] for r in ids[qi][keep]], pa.int64())).drop_columns([ROW])
            out.append(t.append_column("score", pa.array(reported(score[qi][keep].astype(np.float64), self.metric).astype(np.float32))))
        return out, int(self.faiss_index.ntotal)


def rows_at(table: "FeatxTable", row_numbers: np.ndarray) -> pa.Table:
    """The rows (all columns but the vector) at global positions ``row_numbers``, read by row group."""
    import pyarrow.compute as pc

    cols = [n for n in table.columns if n != C.EMBEDDING]
    parts, start = [], 0
    for f, uri in zip(table.manifest["files"], table.files):
        end = start + int(f["rows"])
        mine = row_numbers[(row_numbers >= start) & (row_numbers < end)]
        if len(mine):
            pf = table._file(uri)
            rg_start = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                sel = mine[(mine >= start + rg_start) & (mine < start + rg_start + n)]
                if len(sel):
                    t = pf.read_row_group(g, columns=cols)
                    t = t.append_column(ROW, pa.array(np.arange(start + rg_start, start + rg_start + n, dtype=np.int64)))
                    parts.append(t.filter(pc.is_in(t[ROW], pa.array(sel))))
                rg_start += n
        start = end
    if not parts:
        return pa.table({ROW: pa.array([], pa.int64())})
    return pa.concat_tables(parts)


def build_index(output: str, kind: str = "ivf", metric: str = "cosine", nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                storage_options: dict[str, Any] | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Build an index over the published snapshot and store it under ``OUTPUT/_index/``."""
    from pipelines.read.table import open as open_table

    faiss = _faiss()
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
    name = _name(table.snapshot, kind, metric)
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


def _read_index(faiss: Any, uri: str, so: dict[str, Any]) -> Any | None:
    import os
    import tempfile

    fs, path = get_fs(uri, so)
    if is_local(fs):
        return faiss.read_index(path) if os.path.exists(path) else None
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "index.faiss")
        try:
            retry(lambda: fs.get_file(path, local), f"downloading {uri!r}")
        except FileNotFoundError:
            return None
        return faiss.read_index(local)


def _prepared(m: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        norms[norms == 0] = 1
        m = m / norms
    return np.ascontiguousarray(m, dtype=np.float32)


def _sample(table: "FeatxTable", metric: str, want: int) -> np.ndarray:
    """An even sample of about ``want`` vectors (every n-th row), for IVF training."""
    stride = max(1, table.rows // want)
    parts = [vectors_from_arrow(c[C.EMBEDDING], table.dim)[::stride] for c in table.iter_batches([C.EMBEDDING])]
    return _prepared(np.concatenate(parts), metric)


def _load(table: "FeatxTable", m: dict[str, Any]) -> Index | None:
    """The index a metadata file describes, loaded once per table handle."""
    cache = table.__dict__.setdefault("_indexes", {})
    ident = (m["file"], m.get("built"))
    if ident not in cache:
        faiss = _faiss()
        index = _read_index(faiss, join(table.output, INDEX_DIR, m["file"]), table.storage_options)
        if index is None:
            return None
        if m["kind"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(m["params"]["nprobe"])
        else:
            index.hnsw.efSearch = int(m["params"]["efSearch"])
        cache[ident] = Index(m["kind"], m["metric"], m, index)
    return cache[ident]


def find_index(table: "FeatxTable", metric: str, filtered: bool, use_index: bool | None) -> tuple[Index | None, str]:
    """The index to use for this snapshot and metric, or None with the reason the search is exact."""
    if use_index is False:
        return None, "exact search (index use turned off)"
    names = [p for p in list_files(join(table.output, INDEX_DIR), table.storage_options) if p.endswith(".json")]
    metas = [json.loads(read_bytes(join(table.output, INDEX_DIR, p), table.storage_options) or b"{}") for p in names]
    metas = [m for m in metas if m.get("metric") == metric]
    note = ""
    fresh = [m for m in metas if m.get("snapshot") == table.snapshot
             and m.get("content_fingerprint") == table.manifest.get("content_fingerprint")
             and m.get("rows") == table.rows]
    fresh.sort(key=lambda m: -m.get("built", 0))  # the newest build of this snapshot and metric
    if filtered and fresh:
        note = "exact search: a row filter was given and the FAISS index cannot filter"
    elif fresh:
        m = fresh[0]
        index = _load(table, m)
        if index is not None:
            return index, (
                f"approximate search with the {m['kind']} index built for snapshot {m['snapshot']} ({m['params']})")
        note = f"exact search: the index file {m['file']} is missing; run `featx index` again"
    elif metas:
        snaps = sorted({m.get("snapshot") for m in metas})
        note = (f"exact search: the {metric} index is for snapshot {', '.join(map(str, snaps))} but this is snapshot "
                f"{table.snapshot} (stale index not used); run `featx index {table.output}` again")
    else:
        note = f"exact search over {table.rows} rows (no {metric} index; `featx index` builds one)"
    if use_index:
        raise InputError(f"an index was required but none can be used: {note}")
    return None, note
