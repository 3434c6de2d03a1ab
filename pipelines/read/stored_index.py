"""A FAISS index stored beside a table: where it lives, whether it fits a snapshot, and searching with it.

An index (built by :mod:`pipelines.read.index`) is stored under ``OUTPUT/_index/`` with the number, content
fingerprint and metric of the snapshot it was built from. A search uses it only when all three match the
snapshot being read (and no row filter is given); otherwise the search is exact and says why. FAISS ids are
the rows' positions in the manifest's file order, so a hit's other columns are read from the row groups
holding it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.errors import InputError
from operators.io.parquet import open_parquet_file
from operators.io.storage import get_fs, is_local, join, list_files, read_bytes, retry
from operators.search.topk import ROW, reported
from pipelines.read.snapshot import Snapshot

INDEX_DIR = "_index"
KINDS: tuple[str, ...] = ("ivf", "hnsw")


def faiss_module() -> Any:
    """The faiss module, or an error that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise InputError("the approximate index needs FAISS: pip install 'featx[index]' (faiss-cpu)") from None
    return faiss


def index_name(snapshot: int, kind: str, metric: str) -> str:
    """The stem of an index's files under ``OUTPUT/_index/`` (``.faiss`` and ``.json``)."""
    return f"{snapshot:08d}-{kind}-{metric}"


@dataclass
class Index:
    """A loaded index and the metadata it was stored with."""

    kind: str
    metric: str
    meta: dict[str, Any]
    faiss_index: Any

    def search(self, table: Snapshot, q: np.ndarray, k: int) -> tuple[list[pa.Table], int]:
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


def rows_at(table: Snapshot, row_numbers: np.ndarray) -> pa.Table:
    """The rows (all columns but the vector) at global positions ``row_numbers``, read by row group."""
    cols = [n for n in table.columns if n != C.EMBEDDING]
    parts, start = [], 0
    for f, uri in zip(table.manifest["files"], table.files):
        end = start + int(f["rows"])
        mine = row_numbers[(row_numbers >= start) & (row_numbers < end)]
        if len(mine):
            pf = open_parquet_file(uri, table.storage_options)
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


def _read_index(faiss: Any, uri: str, so: dict[str, Any]) -> Any | None:
    """The index file at ``uri`` (through a local copy where the store is remote), or None if it is gone."""
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


def _load(table: Snapshot, m: dict[str, Any]) -> Index | None:
    """The index a metadata file describes, loaded once per table handle."""
    cache = table.indexes
    ident = (m["file"], m.get("built"))
    if ident not in cache:
        faiss = faiss_module()
        index = _read_index(faiss, join(table.output, INDEX_DIR, m["file"]), table.storage_options)
        if index is None:
            return None
        if m["kind"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(m["params"]["nprobe"])
        else:
            index.hnsw.efSearch = int(m["params"]["efSearch"])
        cache[ident] = Index(m["kind"], m["metric"], m, index)
    return cache[ident]


def find_index(table: Snapshot, metric: str, filtered: bool, use_index: bool | None) -> tuple[Index | None, str]:
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
