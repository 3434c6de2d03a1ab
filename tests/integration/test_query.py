"""Querying a real embedded table on S3 (moto): text queries through the table's own model, mismatches refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import featx
import numpy as np
import pytest
from typer.testing import CliRunner

from operators.errors import InputError
from pipelines.cli.app import app
from pipelines.config import build_config
from pipelines.demo.sample_data import write_text_shards
from pipelines.embed.job import run_embed

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


@pytest.fixture(scope="module")
def s3_table(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str, s3_fs: Any) -> tuple[str, list[dict[str, Any]]]:
    src = tmp_path_factory.mktemp("query-in")
    write_text_shards(src, fmt="jsonl", shards=3, max_per_topic=4, limit=80)
    bucket = "featx-query-test"
    s3_fs.mkdir(bucket)
    out = f"s3://{bucket}/emb"
    report = run_embed(build_config(None, {"input": str(src), "format": "jsonl", "output": out, "model": f"hf:{tiny_bert}",
                                           "passthrough": ["id", "label", "text"]}), progress=lambda m: None)
    assert report["status"] == "succeeded" and report["rows_out"] == 80
    records = [json.loads(line) for f in sorted(src.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return out, records


def test_text_query_embedded_with_the_tables_model_equals_brute_force(s3_table: tuple[str, list[dict[str, Any]]]) -> None:
    out, records = s3_table
    t = featx.open(out)
    assert t.rows == 80 and t.dim == 32
    vecs, keys = t.to_numpy(), t.keys()
    text = records[11]["text"]
    hits = t.search(text, k=5, chunk_rows=16)  # 80 rows in chunks of 16
    q = t.embed_query(text=text)
    s = vecs @ q / np.linalg.norm(vecs, axis=1) / np.linalg.norm(q)
    assert hits.keys == [keys[i] for i in np.argsort(-s, kind="stable")[:5]]
    np.testing.assert_allclose(hits.table["score"].to_numpy(), np.sort(s)[::-1][:5], rtol=1e-4, atol=1e-5)
    assert hits.table["text"][0].as_py() == text and hits.table["score"][0].as_py() == pytest.approx(1.0, abs=1e-4)
    # a filter on a passthrough column, on S3
    label = records[11]["label"]
    other = t.search(text, k=3, where=f"label <> '{label}'", chunk_rows=16)
    mask = np.array(t.to_arrow(["label"])["label"].to_pylist()) != label
    assert other.keys == [keys[i] for i in np.flatnonzero(mask)[np.argsort(-s[mask], kind="stable")[:3]]]
    # DuckDB over the S3 files, through fsspec
    got = dict(t.duckdb().sql("SELECT label, count(*) FROM embeddings GROUP BY 1").fetchall())
    assert sum(got.values()) == 80 and got[label] == sum(r["label"] == label for r in records)


def test_model_mismatch_is_refused(s3_table: tuple[str, list[dict[str, Any]]], tiny_bert: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    out, _ = s3_table
    t = featx.open(out)
    changed = tmp_path / "bert-changed"
    shutil.copytree(tiny_bert, changed)
    weights = changed / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("weight"))
    state[name] = state[name] + torch.full_like(state[name], 1e-3)
    save_file(state, str(weights))
    with pytest.raises(InputError, match="embedded differently"):
        t.use_encoder(weights=str(changed))
    with pytest.raises(InputError, match="embedded differently"):
        t.use_encoder(model="minilm-l6")
    same = tmp_path / "bert-copy"  # the same weights at another path: content fingerprint matches
    shutil.copytree(tiny_bert, same)
    t.use_encoder(weights=str(same))
    with pytest.raises(InputError, match="query it with --text"):
        t.search(image=b"\xff\xd8not-a-real-jpeg", k=3)
    res = CliRunner().invoke(app, ["query", out, "--text", "anything", "--weights", str(changed)])
    assert res.exit_code == 2 and "embedded differently" in " ".join(res.output.split())


def test_cli_query_and_index_on_s3(s3_table: tuple[str, list[dict[str, Any]]]) -> None:
    out, records = s3_table
    res = CliRunner().invoke(app, ["query", out, "--text", records[3]["text"], "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert hits["hits"][0]["text"] == records[3]["text"] and hits["method"] == "exact" and hits["snapshot"] == 1
    res = CliRunner().invoke(app, ["index", out, "--kind", "ivf", "--metric", "l2"])  # stored on S3, read back
    assert res.exit_code == 0, res.output
    t = featx.open(out)
    q = t.to_numpy()[:5] + 0.01
    approx, exact = t.search_many(q, 4, metric="l2"), t.search_many(q, 4, metric="l2", use_index=False)
    assert approx[0].method == "faiss-ivf" and [h.keys for h in approx] == [h.keys for h in exact]  # every list probed
    res = CliRunner().invoke(app, ["sql", out, "SELECT count(*) AS n FROM embeddings", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"n": 80}]


def test_image_query_finds_the_same_image(tmp_path: Path, tiny_resnet_weights: str) -> None:
    from tests.integration.helpers import write_image_files

    write_image_files(tmp_path / "in", per_photo=2, photos=("chelsea", "coffee", "brick"))
    out = str(tmp_path / "out")
    run_embed(build_config(None, {"input": str(tmp_path / "in"), "format": "images", "output": out, "model": "resnet18",
                                  "weights": tiny_resnet_weights}), progress=lambda m: None)
    probe = tmp_path / "in" / "coffee" / "001.jpg"
    res = CliRunner().invoke(app, ["query", out, "--image", str(probe), "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)["hits"]
    assert hits[0]["source_uri"].endswith("coffee/001.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    t = featx.open(out)
    with pytest.raises(InputError, match="query it with --image"):
        t.search("a text query", k=2)
    assert t.search(probe.read_bytes(), k=1).table["source_uri"][0].as_py().endswith("coffee/001.jpg")
