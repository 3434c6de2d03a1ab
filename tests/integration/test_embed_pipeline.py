"""End to end on a real local Ray: every input format, from local folders and a real S3 server (moto), to both."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from operators.errors import ConfigError, UnknownModelError
from pipelines.config import build_config
from pipelines.demo.sample_data import write_image_tars, write_text_shards
from pipelines.embed.job import run_embed
from pipelines.publish.manifest import load_manifest
from pipelines.read.table import duckdb_connection, read_table
from tests.conftest import upload
from tests.integration.helpers import write_image_files, write_image_parquet
from tests.isolation import child_env, python

pytestmark = pytest.mark.usefixtures("ray_local")

PHOTOS = ("chelsea", "coffee", "brick")


def _make_input(fmt: str, folder: Path) -> tuple[int, dict[str, Any]]:
    """Write a small real input of ``fmt``; returns (records, extra config)."""
    if fmt == "images":
        info = write_image_files(folder, per_photo=2, photos=PHOTOS)
        # one png and one webp among the jpgs
        from PIL import Image

        Image.open(folder / "chelsea" / "000.jpg").save(folder / "chelsea" / "100.png")
        Image.open(folder / "coffee" / "000.jpg").save(folder / "coffee" / "100.webp")
        return info["records"] + 2, {}
    if fmt == "webdataset":
        return write_image_tars(folder, per_photo=3, shards=2, photos=PHOTOS)["records"], {}
    if fmt == "parquet-images":
        return write_image_parquet(folder, per_photo=2, shards=2, photos=PHOTOS)["records"], {"passthrough": ["label"]}
    if fmt in ("jsonl", "parquet"):
        info = write_text_shards(folder, fmt=fmt, shards=3, max_per_topic=2, limit=60)
        return info["records"], {"passthrough": ["id", "label"], "key_column": "id" if fmt == "parquet" else None}
    raise AssertionError(fmt)


def _model(fmt: str, tiny_bert: str, tiny_resnet_weights: str) -> dict[str, Any]:
    if fmt in ("jsonl", "parquet"):
        return {"model": f"hf:{tiny_bert}"}
    return {"model": "resnet18", "weights": tiny_resnet_weights}


FORMATS = ["images", "webdataset", "parquet-images", "jsonl", "parquet"]


def _uri(where: str, local: Path, s3_fs: Any, bucket: str, prefix: str) -> str:
    if where == "local":
        return str(local)
    return upload(s3_fs, local, bucket, prefix) if local.exists() else f"s3://{bucket}/{prefix}"


def _check_output(output: str, n: int, fmt: str, expected_dim: int, storage_options: dict | None = None) -> pa.Table:
    manifest = load_manifest(output, storage_options)
    assert manifest is not None
    assert manifest["rows"] == n and manifest["error_rows"] == 0
    assert manifest["dim"] == expected_dim and manifest["model_fingerprint"]
    assert all(s["fingerprint"] and s["size"] > 0 for p in manifest["pieces"] for s in p["shards"])
    assert sum(f["rows"] for f in manifest["files"]) == n
    assert all(f["path"].startswith("data/") for f in manifest["files"])
    table = read_table(output, storage_options)
    assert table.num_rows == n
    assert table.column_names[:3] == ["key", "source_uri", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), expected_dim)
    keys = table["key"].to_pylist()
    assert len(set(keys)) == n  # unique keys
    if fmt == "webdataset":
        assert {"cls", "json"} <= set(table.column_names)
    if fmt in ("jsonl", "parquet"):
        assert {"id", "label"} <= set(table.column_names)
    meta = json.loads(table.schema.metadata[b"featx"])
    for k in ("model", "weights_fingerprint", "dim", "pooling", "normalize", "preprocessing_fingerprint", "featx_version"):
        assert k in meta, k
    emb = np.array(table["embedding"].to_pylist())
    assert np.isfinite(emb).all() and (np.linalg.norm(emb, axis=1) > 0).all()
    return table


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_local(fmt: str, tmp_path: Path, tiny_bert: str, tiny_resnet_weights: str) -> None:
    n, extra = _make_input(fmt, tmp_path / "in")
    out = tmp_path / "out"
    cfg = build_config(None, {"input": str(tmp_path / "in"), "format": fmt, "output": str(out),
                              **_model(fmt, tiny_bert, tiny_resnet_weights), **extra, "piece_max_shards": 4})
    report = run_embed(cfg, progress=lambda m: None)
    assert report["status"] == "succeeded"
    assert report["rows_in"] == report["rows_out"] == n and report["error_rows"] == 0
    dim = 32 if fmt in ("jsonl", "parquet") else 512
    _check_output(str(out), n, fmt, dim)
    for f in ("_manifest.json", "_report.json", "_config.json"):
        assert (out / f).exists()
    assert json.loads((out / "_report.json").read_text())["run_id"] == report["run_id"]
    # preprocessing runs in CPU tasks of its own, not fused into the embedding actors
    ops = report["operators"]
    assert any("load_pieces" in o and "EmbedActor" not in o for o in ops), ops
    assert any("EmbedActor" in o and "load_pieces" not in o for o in ops), ops


# every format s3 -> s3; the local <-> s3 mixes with the formats whose readers differ most
OBJECT_CASES = [(f, "s3", "s3") for f in FORMATS] + [
    ("images", "local", "s3"), ("webdataset", "s3", "local"),
]


@pytest.mark.parametrize("fmt,src,dst", OBJECT_CASES, ids=[f"{f}-{a}-to-{b}" for f, a, b in OBJECT_CASES])
def test_each_format_object_storage(fmt: str, src: str, dst: str, tmp_path: Path, s3_fs: Any, s3_bucket: str,
                                    tiny_bert: str, tiny_resnet_weights: str) -> None:
    n, extra = _make_input(fmt, tmp_path / "in")
    input_uri = _uri(src, tmp_path / "in", s3_fs, s3_bucket, "input")
    output = str(tmp_path / "out") if dst == "local" else f"s3://{s3_bucket}/emb/{fmt}"
    cfg = build_config(None, {"input": input_uri, "format": fmt, "output": output,
                              **_model(fmt, tiny_bert, tiny_resnet_weights), **extra, "piece_max_shards": 4})
    report = run_embed(cfg, progress=lambda m: None)
    assert report["rows_out"] == n
    table = _check_output(output, n, fmt, 32 if fmt in ("jsonl", "parquet") else 512)
    if src == "s3":
        assert all(u.startswith(f"s3://{s3_bucket}/input/") for u in table["source_uri"].to_pylist())
    if dst == "s3":
        s3_fs.invalidate_cache()
        assert s3_fs.exists(f"{s3_bucket}/emb/{fmt}/_manifest.json")
        # the saved config and report never carry credentials
        for f in ("_config.json", "_report.json"):
            body = s3_fs.cat_file(f"{s3_bucket}/emb/{fmt}/{f}").decode()
            assert "CANARY" not in body


def test_explicit_storage_options_are_used_and_never_saved(tmp_path: Path, s3_fs: Any, s3_bucket: str,
                                                           s3_server: dict, tiny_bert: str) -> None:
    n, extra = _make_input("jsonl", tmp_path / "in")
    input_uri = upload(s3_fs, tmp_path / "in", s3_bucket, "txt")
    opts = {"key": s3_server["key"], "secret": s3_server["secret"], "client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    output = f"s3://{s3_bucket}/out"
    cfg = build_config(None, {"input": input_uri, "format": "jsonl", "output": output, "model": f"hf:{tiny_bert}",
                              "storage_options": opts, **extra})
    report = run_embed(cfg, progress=lambda m: None)
    assert report["rows_out"] == n
    saved = s3_fs.cat_file(f"{s3_bucket}/out/_config.json").decode()
    assert s3_server["secret"] not in saved and "***" in saved


def test_keys_and_vectors_are_stable_across_runs_and_rerun_skips(tmp_path: Path, tiny_resnet_weights: str) -> None:
    n, _ = _make_input("webdataset", tmp_path / "in")
    base = {"input": str(tmp_path / "in"), "format": "webdataset", "model": "resnet18", "weights": tiny_resnet_weights}
    run_embed(build_config(None, {**base, "output": str(tmp_path / "a")}), progress=lambda m: None)
    run_embed(build_config(None, {**base, "output": str(tmp_path / "b"), "batch_size": 3}), progress=lambda m: None)
    a = read_table(str(tmp_path / "a")).sort_by("key")
    b = read_table(str(tmp_path / "b")).sort_by("key")
    assert a["key"].to_pylist() == b["key"].to_pylist() and a.num_rows == n
    np.testing.assert_allclose(np.array(a["embedding"].to_pylist()), np.array(b["embedding"].to_pylist()), atol=1e-4)
    files_a = sorted(p.name for p in (tmp_path / "a" / "data").iterdir())
    files_b = sorted(p.name for p in (tmp_path / "b" / "data").iterdir())
    assert files_a == files_b  # deterministic names: shard identity + content fingerprint
    # a rerun on the same output finds every piece published and embeds nothing again
    again = run_embed(build_config(None, {**base, "output": str(tmp_path / "a")}), progress=lambda m: None)
    assert again["pieces_processed"] == 0 and again["shards_skipped"] == 2 and again["published_rows"] == n
    m = load_manifest(str(tmp_path / "a"))
    assert m["snapshot"] == 1 and m["rows"] == n and again["snapshot"] == 1  # nothing changed: no new snapshot
    from pipelines.publish.status import output_status

    st = output_status(str(tmp_path / "a"))
    assert st["published"]["snapshot"] == 1 and st["published"]["rows"] == n and st["published"]["shards"] == 2
    assert [r["status"] for r in st["runs"]] == ["succeeded", "succeeded"]
    assert [r["shards_processed"] for r in st["runs"]] == [2, 0]
    assert (tmp_path / "a" / "_manifests" / "00000001.json").exists()


def test_bad_records_are_recorded_not_dropped(tmp_path: Path, tiny_resnet_weights: str) -> None:
    folder = tmp_path / "in"
    n_good = write_image_files(folder, per_photo=2, photos=PHOTOS)["records"]
    (folder / "broken.jpg").write_bytes(b"definitely not a jpeg")
    good = (folder / "chelsea" / "000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    base = {"input": str(folder), "format": "images", "output": str(out), "model": "resnet18",
            "weights": tiny_resnet_weights}
    # 2 bad records are over the default budget (1%): the run fails with a summary and publishes nothing
    from operators.errors import PipelineError

    with pytest.raises(PipelineError) as e:
        run_embed(build_config(None, base), progress=lambda m: None)
    msg = str(e.value)
    assert f"2 of {n_good + 2} records failed" in msg and "decode/UnidentifiedImageError x1" in msg and "max_error_fraction" in msg
    assert load_manifest(str(out)) is None
    assert json.loads((out / "_report.json").read_text())["status"] == "failed"
    report = run_embed(build_config(None, {**base, "max_error_fraction": 0.5}), progress=lambda m: None)
    assert report["rows_out"] == n_good and report["error_rows"] == 2 and report["rows_in"] == n_good + 2
    m = load_manifest(str(out))
    errs = pa.concat_tables([pq.read_table(out / f["path"]) for f in m["error_files"]])
    assert sorted(errs["key"].to_pylist()) == ["broken.jpg", "truncated.jpg"]
    assert set(errs["stage"].to_pylist()) == {"decode"}
    assert m["rows"] + m["error_rows"] == n_good + 2
    # decoding in the embedding actors (the GPU-decode option; torchvision's decoder on this CPU actor):
    # the same records fail at decode, the good ones get about the same vectors as Pillow's preprocessing
    out2 = tmp_path / "out-actor-decode"
    report2 = run_embed(build_config(None, {**base, "output": str(out2), "max_error_fraction": 0.5,
                                            "image_decode": "actors"}), progress=lambda m: None)
    assert report2["rows_out"] == n_good and report2["error_rows"] == 2
    assert report2["content_fingerprint"] != report["content_fingerprint"]  # other pixels: never mixed in a refresh
    m2 = load_manifest(str(out2))
    errs2 = pa.concat_tables([pq.read_table(out2 / f["path"]) for f in m2["error_files"]])
    assert sorted(errs2["key"].to_pylist()) == ["broken.jpg", "truncated.jpg"]
    assert set(errs2["stage"].to_pylist()) == {"decode"}
    a, b = read_table(str(out)).sort_by("key"), read_table(str(out2)).sort_by("key")
    assert a["key"].to_pylist() == b["key"].to_pylist()
    va, vb = np.array(a["embedding"].to_pylist()), np.array(b["embedding"].to_pylist())
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    assert cos.min() > 0.98, cos.min()
    assert report2["startup"]["first_actor_ready"] <= report2["startup"]["first_embedded"]
    assert sum(report2["actor_rows"].values()) == n_good + 2


def test_duckdb_ranks_by_cosine_with_the_cast(tmp_path: Path, tiny_bert: str) -> None:
    n, extra = _make_input("jsonl", tmp_path / "in")
    out = tmp_path / "out"
    run_embed(build_config(None, {"input": str(tmp_path / "in"), "format": "jsonl", "output": str(out),
                                  "model": f"hf:{tiny_bert}", **extra}), progress=lambda m: None)
    import duckdb

    table = read_table(str(out))
    emb = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    q = emb[7]
    expected = np.argsort(-(emb @ q) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q)))[:5]
    files = [str(out / f["path"]) for f in load_manifest(str(out))["files"]]
    rows = duckdb.execute(
        "SELECT key, array_cosine_similarity(embedding::FLOAT[32], ?::FLOAT[32]) AS score "
        "FROM read_parquet(?) ORDER BY score DESC LIMIT 5", [q.tolist(), files]).fetchall()
    assert [r[0] for r in rows] == [table["key"][int(i)].as_py() for i in expected]
    assert rows[0][1] == pytest.approx(1.0, abs=1e-5)
    # the ready-made view does the cast for the user
    con = duckdb_connection(str(out))
    assert con.execute("SELECT typeof(embedding), count(*) FROM embeddings GROUP BY 1").fetchall() == [("FLOAT[32]", n)]


def test_errors_before_any_ray_work(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="Known models"):
        run_embed(build_config(None, {"input": str(tmp_path), "format": "jsonl", "output": str(tmp_path / "o"),
                                      "model": "bert-large-nonexistent"}))
    from operators.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        run_embed(build_config(None, {"input": str(tmp_path / "missing"), "format": "jsonl", "output": str(tmp_path / "o")}))
    with pytest.raises(ConfigError, match="inside input"):
        run_embed(build_config(None, {"input": str(tmp_path), "format": "jsonl", "output": str(tmp_path / "emb")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input files matching"):
        run_embed(build_config(None, {"input": str(tmp_path / "empty"), "format": "jsonl", "output": str(tmp_path / "o")}))


def test_every_actor_of_a_pool_gets_work(tmp_path: Path, tiny_bert: str) -> None:
    """Two embedding actors, each with rows, asserted without a race: failpoint ``actors-meet:2`` holds each
    actor's first block until the other actor has taken one, so the pool must hand work to both (a pool that
    fed one actor only would leave the first block waiting, and the run with one actor's rows). Runs as a
    `featx embed` child: the failpoint reaches the actors through the environment of the child's own Ray."""
    n, extra = _make_input("jsonl", tmp_path / "in")
    cfg = {"input": str(tmp_path / "in"), "format": "jsonl", "output": str(tmp_path / "o"), "model": f"hf:{tiny_bert}",
           "num_cpus": 0.5, "preprocess_num_cpus": 0.5, "min_actors": 2, "max_actors": 2, "piece_max_shards": 1,
           **extra}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = child_env({"FEATX_FAILPOINTS": f"actors-meet:2:{tmp_path / 'met'}"})
    r = python(["-m", "pipelines.cli", "embed", "--config", str(tmp_path / "job.yaml"), "--json"], 400, env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["rows_out"] == n and report["resources"]["min_actors"] == 2
    assert len(report["actor_rows"]) == 2 and all(rows > 0 for rows in report["actor_rows"].values()), report["actor_rows"]
    assert sum(report["actor_rows"].values()) == n
    assert len(list((tmp_path / "met").iterdir())) == 2  # both actors reached the meeting point


def test_a_pool_that_would_hang_is_refused(tmp_path: Path, tiny_bert: str) -> None:
    _make_input("jsonl", tmp_path / "in")
    cfg = build_config(None, {"input": str(tmp_path / "in"), "format": "jsonl", "output": str(tmp_path / "o"),
                              "model": f"hf:{tiny_bert}", "num_cpus": 1, "min_actors": 2, "max_actors": 2})
    with pytest.raises(ConfigError, match="wait forever"):
        run_embed(cfg, progress=lambda m: None)


def test_fractional_cpus_two_actors_and_logical_gpus_do_not_hang(tmp_path: Path, tiny_bert: str) -> None:
    n, extra = _make_input("jsonl", tmp_path / "in")
    cfg = build_config(None, {"input": str(tmp_path / "in"), "format": "jsonl", "output": str(tmp_path / "o"),
                              "model": f"hf:{tiny_bert}", "num_cpus": 0.5, "num_gpus": 0.5, "min_actors": 2,
                              "max_actors": 2, "piece_max_shards": 1, **extra})
    report = run_embed(cfg, progress=lambda m: None)
    assert report["rows_out"] == n and report["pieces_processed"] == 3
    assert report["resources"]["max_actors"] == 2 and report["resources"]["cluster_gpus"] == 1
    assert sum(report["actor_rows"].values()) == n
    # GPU actors autotune their batch size by default (these fall back to the CPU and still do): every row is
    # counted at the size its block ran at; CPU actors keep batch_size
    # rows per batch size: every row that went through a batch (a copy of content held for another block's
    # representative went through none)
    held = report["reuse"].get("held_for_fill", 0)
    assert report["resources"]["batch_autotune"] is True and sum(report["batch_sizes"].values()) == n - held
    assert min(int(b) for b in report["batch_sizes"]) >= cfg.batch_size
    # CPU actors: with two of them each piece (a third of the input) is read in two row slices, which travel
    # in blocks of their own (4 blocks for 6 slices here) and are written as parts of their piece
    cpu = run_embed(cfg.model_copy(update={"num_gpus": 0.0, "output": str(tmp_path / "cpu")}), progress=lambda m: None)
    m = load_manifest(str(tmp_path / "cpu"))
    assert cpu["rows_out"] == m["rows"] == n and len(m["pieces"]) == 3
    assert len(m["files"]) > 3  # some piece came back in several parts
    assert sum(cpu["actor_rows"].values()) == n
    assert cpu["resources"]["batch_autotune"] is False and cpu["batch_sizes"] == {
        str(cfg.batch_size): n - cpu["reuse"].get("held_for_fill", 0)}
    keys = read_table(str(tmp_path / "cpu"))["key"].to_pylist()
    assert len(keys) == len(set(keys)) == n  # no row lost or doubled by slicing
    # asking for more GPUs than the cluster has is refused up front, not left waiting
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        run_embed(cfg.model_copy(update={"num_gpus": 1.0, "min_actors": 2, "max_actors": 2, "num_cpus": 0.5,
                                         "output": str(tmp_path / "o2")}),
                  progress=lambda m: None)
