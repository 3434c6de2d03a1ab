"""Exact top-k over chunks equals a brute-force sort (same keys, same order, same scores)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from operators.errors import InputError
from operators.search.topk import ROW, TopK, best_k, query_matrix, reported, scores, vectors_from_arrow


def _brute(m: np.ndarray, q: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        s = (m @ q.T).T / np.linalg.norm(m, axis=1)[None, :] / np.linalg.norm(q, axis=1)[:, None]
    elif metric == "dot":
        s = (m @ q.T).T
    else:
        s = -((m[None, :, :] - q[:, None, :]) ** 2).sum(-1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("chunk", [7, 100, 1000])
def test_chunked_top_k_equals_brute_force(metric: str, chunk: int) -> None:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((523, 12)).astype(np.float32)
    q = rng.standard_normal((4, 12)).astype(np.float32)
    k = 9
    top = TopK(len(q), k)
    qm = query_matrix(q, 12, metric)
    for s in range(0, len(m), chunk):
        part = m[s:s + chunk]
        t = pa.table({"key": [f"k{i}" for i in range(s, s + len(part))], ROW: pa.array(np.arange(s, s + len(part)))})
        top.push(scores(part, qm, metric), t)
    got = top.results(metric)
    order, best = _brute(m, q, metric, k)
    for qi in range(len(q)):
        assert got[qi]["key"].to_pylist() == [f"k{i}" for i in order[qi]]
        want = np.sqrt(-best[qi]) if metric == "l2" else best[qi]
        np.testing.assert_allclose(got[qi]["score"].to_numpy(), want, rtol=1e-4, atol=1e-4)
    assert top.scanned == len(m)
    assert top.rows is not None and top.rows.num_rows <= len(q) * k  # only live candidates are held


def test_ties_break_by_row_number_across_chunks() -> None:
    m = np.ones((50, 4), dtype=np.float32)  # every row scores the same
    top = TopK(1, 5)
    q = query_matrix(np.ones(4), 4, "dot")
    for s in (30, 0, 10):  # chunks arrive out of order
        t = pa.table({"key": [f"k{i}" for i in range(s, s + 10)], ROW: pa.array(np.arange(s, s + 10))})
        top.push(scores(m[s:s + 10], q, "dot"), t)
    assert top.results("dot")[0]["key"].to_pylist() == ["k0", "k1", "k2", "k3", "k4"]


def test_best_k_fewer_rows_than_k() -> None:
    s, r = best_k(np.array([[0.5, 0.9]]), np.array([10, 11]), 5)
    assert r.tolist() == [[11, 10]] and s.tolist() == [[0.9, 0.5]]


def test_query_checks() -> None:
    with pytest.raises(InputError, match="dim 8"):
        query_matrix(np.ones(5), 8, "cosine")
    with pytest.raises(InputError, match="zero query"):
        query_matrix(np.zeros(8), 8, "cosine")
    with pytest.raises(InputError, match="metric 'hamming'"):
        query_matrix(np.ones(8), 8, "hamming")
    with pytest.raises(InputError, match="NaN"):
        query_matrix(np.full(8, np.nan), 8, "dot")
    with pytest.raises(InputError, match="k must be"):
        TopK(1, 0)


def test_zero_rows_score_zero_and_l2_reports_distance() -> None:
    m = np.array([[0, 0], [3, 4]], dtype=np.float32)
    q = query_matrix(np.array([3, 4]), 2, "cosine")
    assert scores(m, q, "cosine").tolist() == [[0.0, 1.0]]
    d = reported(scores(m, query_matrix(np.array([0, 0]), 2, "l2"), "l2"), "l2")
    np.testing.assert_allclose(d, [[0.0, 5.0]])


def test_vectors_from_arrow_float16_and_chunks() -> None:
    v = np.arange(12, dtype=np.float16).reshape(3, 4)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 4)
    col = pa.chunked_array([arr.slice(0, 1), arr.slice(1)])
    out = vectors_from_arrow(col, 4)
    assert out.dtype == np.float32 and out.tolist() == v.astype(np.float32).tolist()
