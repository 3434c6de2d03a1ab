"""Exact k-nearest-neighbour search over streamed chunks: pure functions, bounded memory.

A query batch (Q vectors) is scored against one chunk of rows at a time; :class:`TopK` keeps, per query,
the k best (score, row number) pairs seen so far and the Arrow rows of the live candidates only, so the
memory held is one chunk plus Q x k rows, whatever the table's size. Ties are broken by row number (the
position in the manifest's file order), so the result is deterministic and equals a brute-force sort.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from operators.errors import InputError

METRICS: tuple[str, ...] = ("cosine", "dot", "l2")
ROW = "__row"  # global row number (position in the snapshot's file order) while a search runs


def vectors_from_arrow(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """fixed_size_list<float32|float16>[dim] -> float32 [N, dim] (zero-copy for float32 single chunks)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(len(arr), dim)


def query_matrix(query: np.ndarray | list[float] | list[list[float]], dim: int, metric: str) -> np.ndarray:
    """Q x dim float32 queries, checked; unit length for cosine."""
    if metric not in METRICS:
        raise InputError(f"metric {metric!r} is not supported; choose one of: {', '.join(METRICS)}")
    q = np.asarray(query, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise InputError(f"the query vector has shape {tuple(np.shape(query))} but the table's vectors have dim {dim}; "
                         "embed the query with the table's model (featx query --text/--image does that)")
    if not np.isfinite(q).all():
        raise InputError("the query vector holds NaN or infinite values")
    if metric == "cosine":
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():
            raise InputError("a zero query vector has no cosine similarity to anything; use metric 'dot' or 'l2'")
        q = q / norms
    return np.ascontiguousarray(q)


def row_norms(matrix: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix))


def scores(matrix: np.ndarray, queries: np.ndarray, metric: str, norms: np.ndarray | None = None) -> np.ndarray:
    """Q x N scores where higher is better: cosine similarity, dot product, or minus the squared L2 distance.

    ``norms``: the rows' L2 norms when already known (cached tables)."""
    dots = queries @ matrix.T
    if metric == "dot":
        return dots
    norms = row_norms(matrix) if norms is None else norms
    if metric == "cosine":
        safe = np.where(norms == 0, np.inf, norms)  # a zero vector is similar to nothing (score 0)
        return dots / safe[None, :]
    return 2 * dots - (norms**2)[None, :] - np.einsum("ij,ij->i", queries, queries)[:, None]


def reported(score: np.ndarray, metric: str) -> np.ndarray:
    """What users see: similarity for cosine/dot, the (non-squared) distance for l2 (smaller is nearer)."""
    return np.sqrt(np.maximum(-score, 0)) if metric == "l2" else score


def best_k(score: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best (score desc, row asc) of ``score`` (Q x N) with row numbers ``rows`` (N or Q x N)."""
    rows = np.broadcast_to(rows, score.shape)
    n = score.shape[1]
    if n > k:
        part = np.argpartition(-score, k - 1, axis=1)[:, :k]
        # a tie at the k-th score may hide a smaller row number outside the partition: include every tie
        kth = np.take_along_axis(score, part, 1).min(axis=1, keepdims=True)
        if (np.sum(score >= kth, axis=1) > k).any():
            part = np.argsort(-score, axis=1, kind="stable")[:, : max(k, int(np.sum(score >= kth, axis=1).max()))]
        s = np.take_along_axis(score, part, 1)
        r = np.take_along_axis(rows, part, 1)
    else:
        s, r = score, rows
    order = np.lexsort((r, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)


class TopK:
    """The k best rows per query over a stream of chunks; keeps only the candidate rows' Arrow data."""

    def __init__(self, n_queries: int, k: int) -> None:
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        self.k = k
        self.score = np.full((n_queries, 0), -np.inf, dtype=np.float64)
        self.row = np.zeros((n_queries, 0), dtype=np.int64)
        self.rows: pa.Table | None = None  # candidate rows, with their ROW column
        self.scanned = 0

    def push(self, chunk_scores: np.ndarray, chunk: pa.Table) -> None:
        """Merge one chunk: ``chunk_scores`` is Q x len(chunk); ``chunk`` carries the ROW column."""
        self.scanned += chunk.num_rows
        if not chunk.num_rows:
            return
        chunk_rows = chunk[ROW].to_numpy()
        s, r = best_k(chunk_scores.astype(np.float64), chunk_rows, self.k)
        s, r = best_k(np.concatenate([self.score, s], 1), np.concatenate([self.row, r], 1), self.k) \
            if self.score.shape[1] else (s, r)
        self.score, self.row = s, r
        live = np.unique(self.row)
        new = chunk.filter(pa.array(np.isin(chunk_rows, live)))
        old = self.rows.filter(pa.array(np.isin(self.rows[ROW].to_numpy(), live))) if self.rows is not None else None
        self.rows = new if old is None else pa.concat_tables([old, new], promote_options="permissive")

    def results(self, metric: str) -> list[pa.Table]:
        """One table per query, best first, with a ``score`` column (distance for l2)."""
        out = []
        if self.rows is None:
            empty = pa.table({"score": pa.array([], pa.float32())})
            return [empty for _ in range(self.score.shape[0])]
        pos = {int(r): i for i, r in enumerate(self.rows[ROW].to_numpy())}
        for qi in range(self.score.shape[0]):
            keep = np.isfinite(self.score[qi])
            idx = pa.array([pos[int(r)] for r in self.row[qi][keep]], pa.int64())
            t = self.rows.take(idx).drop_columns([ROW])
            out.append(t.append_column("score", pa.array(reported(self.score[qi][keep], metric).astype(np.float32))))
        return out
