"""Reading published tables without Ray: featx.open, exact search, filters, time travel, DuckDB, FAISS, inspect, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import featx
import numpy as np
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from operators.errors import InputError
from pipelines.cli.app import app
from pipelines.demo.sample_data import write_vector_table
from pipelines.publish.manifest import load_manifest
from pipelines.read.index import build_index
from pipelines.read.inspect import inspect_table

N, DIM = 3000, 24
LABELS = np.array(["cat", "dog", "eel"])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((12, DIM)) * 3  # clustered, like real embeddings
    v = (centres[rng.integers(0, 12, N)] + rng.standard_normal((N, DIM))).astype(np.float32)
    return v, LABELS[rng.integers(0, 3, N)]


@pytest.fixture(scope="module")
def table_uri(tmp_path_factory: pytest.TempPathFactory, data: tuple[np.ndarray, np.ndarray]) -> str:
    out = str(tmp_path_factory.mktemp("vectors") / "table")
    v, labels = data
    write_vector_table(out, v, {"label": labels.tolist(), "n": np.arange(N).tolist()}, rows_per_file=1100, row_group_rows=400)
    return out


def brute(v: np.ndarray, q: np.ndarray, metric: str, k: int, mask: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    if metric == "cosine":
        s = v @ q / np.linalg.norm(v, axis=1) / np.linalg.norm(q)
    elif metric == "dot":
        s = v @ q
    else:
        s = -((v - q) ** 2).sum(1)
    idx = np.arange(len(v)) if mask is None else np.flatnonzero(mask)
    order = idx[np.argsort(-s[idx], kind="stable")[:k]]
    best = s[order]
    return [f"row-{i:08d}" for i in order], (np.sqrt(-best) if metric == "l2" else best)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_search_equals_brute_force_with_and_without_filter(table_uri: str, data: tuple[np.ndarray, np.ndarray], metric: str) -> None:
    v, labels = data
    t = featx.open(table_uri)
    q = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    hits = t.search(q, k=15, metric=metric, chunk_rows=256, use_index=False)  # table >> chunk
    keys, best = brute(v, q, metric, 15)
    assert hits.keys == keys and hits.method == "exact" and hits.scanned == N
    np.testing.assert_allclose(hits.table["score"].to_numpy(), best, rtol=1e-4, atol=1e-4)
    hits = t.search(q, k=15, metric=metric, where="label = 'dog' AND n % 2 = 0", chunk_rows=256)
    keys, best = brute(v, q, metric, 15, (labels == "dog") & (np.arange(N) % 2 == 0))
    assert hits.keys == keys and set(hits.table["label"].to_pylist()) == {"dog"}
    np.testing.assert_allclose(hits.table["score"].to_numpy(), best, rtol=1e-4, atol=1e-4)
    expr_hits = t.search(q, k=15, metric=metric, where=(pc.field("label") == "dog") & (pc.bit_wise_and(pc.field("n"), 1) == 0), chunk_rows=256)
    assert expr_hits.keys == keys


def test_like_key_and_batch_queries(table_uri: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    v, _ = data
    t = featx.open(table_uri)
    hits = t.search(like="row-00000042", k=5)
    keys, _ = brute(v, v[42], "cosine", 6)
    assert hits.keys == [k for k in keys if k != "row-00000042"][:5]
    qs = v[[1, 2, 3]] + 0.01
    for q, h in zip(qs, t.search_many(qs, k=4, use_index=False)):
        assert h.keys == brute(v, q, "cosine", 4)[0]
    with pytest.raises(InputError, match="no row with key"):
        t.search(like="nope")
    with pytest.raises(InputError, match="not valid SQL"):
        t.search(v[0], where="no_such_column = 1")
    with pytest.raises(InputError, match="exactly one"):
        t.search(v[0], like="row-00000001")


def test_handles_arrow_numpy_torch_duckdb_polars(table_uri: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    import polars as pl
    import pyarrow.parquet as pq

    v, labels = data
    t = featx.open(table_uri)
    assert t.rows == N and t.dim == DIM and len(t.files) == 3
    np.testing.assert_array_equal(t.to_numpy(), v)
    assert t.keys() == [f"row-{i:08d}" for i in range(N)]
    assert t.to_torch().shape == (N, DIM)
    arrow = t.to_arrow(["key", "label"])
    assert arrow.column_names == ["key", "label"] and arrow["label"].to_pylist() == labels.tolist()
    con = t.duckdb()
    assert con.sql("SELECT typeof(embedding) FROM embeddings LIMIT 1").fetchall()[0][0] == f"FLOAT[{DIM}]"
    top = con.sql(f"SELECT key FROM embeddings ORDER BY array_cosine_similarity(embedding, ?::FLOAT[{DIM}]) DESC LIMIT 3",
                  params=[v[5].tolist()]).fetchall()
    assert [r[0] for r in top] == brute(v, v[5], "cosine", 3)[0]
    # the README's one-liners: Polars and pyarrow straight from the manifest's files
    manifest = json.loads((Path(table_uri) / "_manifest.json").read_text())
    files = [str(Path(table_uri) / f["path"]) for f in manifest["files"]]
    assert pl.read_parquet(files)["label"].to_list() == labels.tolist()
    assert pq.ParquetDataset(files).read(columns=["key"]).num_rows == N


def test_readers_see_old_snapshot_until_commit_then_time_travel(tmp_path: Path) -> None:
    from pipelines.publish.manifest import commit

    out = str(tmp_path / "t")
    first = write_vector_table(out, np.ones((10, 4), np.float32))
    seen: list[int] = []
    import pipelines.publish.manifest as manifest_mod

    real_commit = manifest_mod.commit

    def spying_commit(output, manifest, storage_options=None, before_publish=lambda: None):  # type: ignore[no-untyped-def]
        # between the numbered snapshot and _manifest.json (files all in place): readers still see snapshot 1
        return real_commit(output, manifest, storage_options, before_publish=lambda: seen.append(featx.open(out).rows))

    manifest_mod.commit = spying_commit
    try:
        second = write_vector_table(out, np.full((25, 4), 2, np.float32), snapshot_of=first)
    finally:
        manifest_mod.commit = commit
    assert seen == [10]
    now = featx.open(out)
    assert now.snapshot == 2 and now.rows == 25 and (now.to_numpy() == 2).all()
    old = featx.open(out, snapshot=1)
    assert old.rows == 10 and (old.to_numpy() == 1).all() and old.latest_snapshot == 2
    assert second["snapshot"] == 2
    with pytest.raises(InputError, match="no snapshot 7"):
        featx.open(out, snapshot=7)
    for f in first["files"]:  # a clean-up removed snapshot 1's files
        (Path(out) / f["path"]).unlink()
    with pytest.raises(InputError, match="data files are gone"):
        featx.open(out, snapshot=1)
    with pytest.raises(InputError, match="nothing is published"):
        featx.open(str(tmp_path / "empty"))


def test_faiss_recall_and_stale_index(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    v, _ = data
    out = str(tmp_path / "t")
    first = write_vector_table(out, v, rows_per_file=1000)
    t = featx.open(out)
    qs = v[::97] + np.random.default_rng(2).standard_normal((len(v[::97]), DIM)).astype(np.float32) * 0.3
    exact = t.search_many(qs, k=10, use_index=False)
    recalls = {}
    for kind in ("ivf", "hnsw"):
        build_index(out, kind=kind, progress=lambda m: None)
        approx = t.search_many(qs, k=10)
        assert approx[0].method == f"faiss-{kind}" and "snapshot 1" in approx[0].note
        recalls[kind] = float(np.mean([len(set(a.keys) & set(e.keys)) / 10 for a, e in zip(approx, exact)]))
        for a, q in zip(approx, qs):  # the scores of the hits are the true cosine scores of those rows
            rows = v[[int(k[4:]) for k in a.keys]]
            np.testing.assert_allclose(a.table["score"].to_numpy(), rows @ q / np.linalg.norm(rows, axis=1) / np.linalg.norm(q), rtol=1e-4)
    print(f"recall@10 on {len(qs)} queries: {recalls}")
    assert recalls["hnsw"] >= 0.9 and recalls["ivf"] >= 0.8
    # IVF searching every list is exact
    build_index(out, kind="ivf", nlist=16, nprobe=16, progress=lambda m: None)
    full = t.search_many(qs, k=10)
    assert [h.keys for h in full] == [e.keys for e in exact] and full[0].method == "faiss-ivf"
    # a new snapshot makes the index stale: exact search, and it says so
    write_vector_table(out, v[:500], snapshot_of=first)
    t2 = featx.open(out)
    h = t2.search(v[3], k=3)
    assert h.method == "exact" and "stale" in h.note and h.keys[0] == "row-00000003"
    with pytest.raises(InputError, match="index was required"):
        t2.search(v[3], k=3, use_index=True)
    assert t2.search(v[3], k=3, metric="l2").note.startswith("exact search over 500 rows")


def test_inspect_reports_health_duplicates_and_map(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    v, labels = data
    out = str(tmp_path / "t")
    write_vector_table(out, v[:600], {"label": labels[:600].tolist()}, rows_per_file=200)
    rep = inspect_table(out, color="label", plot=str(tmp_path / "map.png"))
    assert rep["healthy"] and rep["rows"] == 600 and rep["files"] == 3 and rep["duplicate_keys"]["count"] == 0
    norms = np.linalg.norm(v[:600], axis=1)
    assert rep["vectors"]["norm"]["max"] == pytest.approx(float(norms.max()), rel=1e-5)
    assert rep["plot"]["points"] > 100 and (tmp_path / "map.png").stat().st_size > 5000
    from PIL import Image

    assert Image.open(tmp_path / "map.png").size[0] > 300
    # a second file listing the same keys: reported, and `featx inspect` exits 1
    manifest = load_manifest(out)
    manifest["files"].append(dict(manifest["files"][0]))
    manifest["rows"] += manifest["files"][0]["rows"]
    (Path(out) / "_manifest.json").write_text(json.dumps(manifest))
    rep = inspect_table(out)
    assert not rep["healthy"] and rep["duplicate_keys"]["count"] == 200 and rep["duplicate_keys"]["examples"][0] == "row-00000000"
    assert CliRunner().invoke(app, ["inspect", out]).exit_code == 1
    res = CliRunner().invoke(app, ["inspect", out, "--color", "nope"])
    assert res.exit_code == 2 and "not a column" in res.output


def test_cli_query_sql_index(table_uri: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    v, labels = data
    runner = CliRunner()
    res = runner.invoke(app, ["sql", table_uri, "SELECT label, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"label": str(lab), "n": int((labels == lab).sum())} for lab in LABELS]
    res = runner.invoke(app, ["query", table_uri, "--like", "row-00000009", "-k", "3", "--where", "label = 'eel'", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    want = brute(v, v[9], "cosine", 4, labels == "eel")[0]
    assert [h["key"] for h in out["hits"]] == [k for k in want if k != "row-00000009"][:3]
    assert out["method"] == "exact" and all(h["label"] == "eel" for h in out["hits"])
    res = runner.invoke(app, ["sql", table_uri, "SELEC nonsense"])
    assert res.exit_code == 2 and "DuckDB refused" in res.output
    res = runner.invoke(app, ["query", table_uri, "--text", "hello"])  # a generated table has no saved model config
    assert res.exit_code == 2 and "no saved config" in res.output
    res = runner.invoke(app, ["index", table_uri, "--kind", "hnsw", "--metric", "dot"])
    assert res.exit_code == 0 and json.loads(res.stdout)["rows"] == N
    res = runner.invoke(app, ["query", table_uri, "--like", "row-00000009", "-k", "3", "--metric", "dot"])
    assert res.exit_code == 0 and "faiss-hnsw" in res.output


def test_in_memory_cache_gives_the_same_answers_within_its_budget(table_uri: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    v, _ = data
    q = v[[10, 20]] + 0.05
    want = [brute(v, x, "l2", 6)[0] for x in q]
    cached = featx.open(table_uri, cache_mb=64)
    first = cached.search_many(q, 6, metric="l2", use_index=False, chunk_rows=500)
    assert cached._cache is not None and sum(b[1].num_rows for b in cached._cache) == N
    again = cached.search_many(q, 6, metric="l2", use_index=False, where="label <> 'cat'")
    assert [h.keys for h in first] == want
    labels = data[1]
    assert [h.keys for h in again] == [brute(v, x, "l2", 6, labels != "cat")[0] for x in q]
    small = featx.open(table_uri, cache_mb=0.1)  # the vectors do not fit: it keeps streaming
    assert [h.keys for h in small.search_many(q, 6, metric="l2", use_index=False)] == want and small._cache is None
