"""`featx inspect`: what a published table holds, whether it is healthy, and a 2-D map of its vectors.

One streaming pass over the snapshot's vectors (norm statistics, NaN / zero / null vectors, an even sample
for the map); DuckDB counts duplicate keys over exactly the published files; the map is a PCA of the
sample, coloured by a chosen column, saved as PNG.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from operators import columns as C
from operators.errors import InputError
from operators.search.topk import vectors_from_arrow
from operators.io.storage import join, list_files
from pipelines.publish.manifest import SNAPSHOTS
from pipelines.read.table import FeatxTable
from pipelines.read.table import open as open_table


def inspect_table(output: str, snapshot: int | None = None, color: str | None = None, plot: str | None = None,
                  sample: int = 5000, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    table = open_table(output, snapshot, storage_options)
    so = table.storage_options
    m = table.manifest
    schema = table.schema
    if color is not None and color not in schema.names:
        raise InputError(f"--color {color!r} is not a column of {output!r}; columns: {', '.join(schema.names)}")
    footer = _footer_metadata(table)
    report: dict[str, Any] = {
        "output": output, "snapshot": table.snapshot, "delta_version": table.delta_version,
        "latest_snapshot": table.latest_snapshot,
        "snapshots_kept": sorted(int(p.split(".")[0]) for p in list_files(join(output, SNAPSHOTS), so) if p.endswith(".json")),
        "created": m.get("created"), "run_id": m.get("run_id"), "input": m.get("input"),
        "model": m.get("model"), "content_fingerprint": m.get("content_fingerprint"),
        "dim": table.dim, "embedding_dtype": m.get("embedding_dtype"), "file_metadata": footer,
        "schema": {f.name: str(f.type) for f in schema},
        "rows": table.rows, "error_rows": m.get("error_rows", 0), "shards": m.get("shards"),
        "files": len(table.files), "error_files": len(m.get("error_files", [])),
        "bytes": sum(int(f.get("bytes", 0)) for f in m["files"]),
        "rows_per_file": _spread([int(f["rows"]) for f in m["files"]]),
        "indexes": sorted(p for p in list_files(join(output, "_index"), so) if p.endswith(".json")),
    }
    norms, pts, labels, nulls, counted = _scan(table, color, sample)
    report["vectors"] = {
        "rows_scanned": counted, "null": nulls, "nan": int(np.isnan(norms).sum()),
        "zero": int((norms == 0).sum()),
        "norm": _spread(norms[np.isfinite(norms)]),
    }
    report["rows_match_manifest"] = counted == table.rows
    report["accounting"] = check_files(output, m, so)
    report["duplicate_keys"] = _duplicates(table)
    if plot:
        report["plot"] = _plot(pts, labels, color, plot, table)
    report["healthy"] = bool(report["rows_match_manifest"] and report["accounting"]["ok"]
                             and not report["duplicate_keys"]["count"]
                             and not report["vectors"]["nan"] and not nulls)
    return report


def check_files(output: str, manifest: dict[str, Any], storage_options: dict[str, Any]) -> dict[str, Any]:
    """Re-check the commit's row accounting from the files: per piece, records read (the manifest's per-shard
    counts) = rows in its data files + rows in its error files, each file counted from its own footer."""
    from pipelines.publish.commit import accounting_problems, footer_rows, read_rows

    pieces = manifest.get("pieces", [])
    file_rows = footer_rows(output, pieces, storage_options)
    problems = accounting_problems(pieces, file_rows)
    counted = [p for p in pieces if read_rows(p) is not None]
    return {"ok": not problems, "pieces_checked": len(counted), "pieces_without_read_counts": len(pieces) - len(counted),
            "rows_read": sum(read_rows(p) or 0 for p in counted), "rows_in_files": sum(file_rows.values()),
            "problems": problems[:20]}


def _footer_metadata(table: FeatxTable) -> dict[str, Any] | None:
    """The ``featx`` key-value metadata of the data files (the first file's footer)."""
    if not table.files:
        return None
    meta = table.schema.metadata or {}
    return json.loads(meta[b"featx"]) if b"featx" in meta else None


def _spread(a: Any) -> dict[str, float]:
    a = np.asarray(a, dtype=np.float64)
    if not a.size:
        return {}
    q = np.quantile(a, [0.01, 0.5, 0.99])
    return {"min": float(a.min()), "p01": float(q[0]), "median": float(q[1]), "mean": float(a.mean()),
            "p99": float(q[2]), "max": float(a.max()), "std": float(a.std())}


def _scan(table: FeatxTable, color: str | None, sample: int) -> tuple[np.ndarray, np.ndarray, list[Any], int, int]:
    """Norms of every vector (N floats), and an even sample of vectors (+ colour values) for the map."""
    stride = max(1, table.rows // max(1, sample))
    cols = [C.EMBEDDING] + ([color] if color else [])
    norms, pts, labels, nulls, counted = [], [], [], 0, 0
    for chunk in table.iter_batches(cols):
        counted += chunk.num_rows
        emb = chunk[C.EMBEDDING]
        if emb.null_count:
            nulls += emb.null_count
            keep = emb.is_valid()
            chunk, emb = chunk.filter(keep), chunk.filter(keep)[C.EMBEDDING]
        v = vectors_from_arrow(emb, table.dim)
        norms.append(np.linalg.norm(v, axis=1))
        pick = np.arange((-counted + chunk.num_rows) % stride, chunk.num_rows, stride)
        pts.append(v[pick])
        if color:
            labels.extend(chunk[color].take(pick).to_pylist())
    return (np.concatenate(norms) if norms else np.zeros(0), np.concatenate(pts) if pts else np.zeros((0, table.dim)),
            labels, nulls, counted)


def _duplicates(table: FeatxTable) -> dict[str, Any]:
    con = table.duckdb()
    rel = con.sql("SELECT key, count(*) AS n FROM raw_embeddings GROUP BY key HAVING count(*) > 1 ORDER BY n DESC, key")
    dups = rel.fetchall()
    return {"count": len(dups), "extra_rows": int(sum(n - 1 for _, n in dups)), "examples": [k for k, _ in dups[:5]]}


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project onto the two main principal components; returns (coords N x 2, explained variance ratio 2)."""
    x = points - points.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return x @ vt[:2].T, ratio


def _plot(pts: np.ndarray, labels: list[Any], color: str | None, path: str, table: FeatxTable) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(pts) < 2:
        raise InputError("the map needs at least 2 vectors")
    xy, ratio = pca_2d(pts.astype(np.float64))
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    if color and labels and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels if v is not None):
        cats = sorted({str(v) for v in labels}, key=lambda c: -sum(str(v) == c for v in labels))
        shown = cats[:20]
        for c in shown:
            idx = [i for i, v in enumerate(labels) if str(v) == c]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=6, label=c, alpha=0.7)
        rest = [i for i, v in enumerate(labels) if str(v) not in shown]
        if rest:
            ax.scatter(xy[rest, 0], xy[rest, 1], s=6, c="lightgray", label=f"{len(cats) - 20} more", alpha=0.5)
        ax.legend(fontsize=7, markerscale=2, loc="best", title=color)
    elif color and labels:
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=np.asarray([np.nan if v is None else v for v in labels], float), cmap="viridis")
        fig.colorbar(sc, ax=ax, label=color)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.7)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.set_title(f"{table.model.get('model', '?')} embeddings, snapshot {table.snapshot} ({len(pts)} of {table.rows} rows)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"path": path, "points": int(len(pts)), "explained_variance": [float(r) for r in ratio], "color": color}
