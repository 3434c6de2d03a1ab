"""The Delta log at OUTPUT against featx's manifests, read back with deltalake (delta-rs) itself; local and S3.

The outputs here are featx manifests and Parquet files written directly (no Ray): what featx publishes is
the manifest; the Delta reader must return exactly the rows of the manifest's files, read with pyarrow.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from operators.io.storage import join, list_files, write_bytes
from pipelines.publish import delta
from pipelines.publish.commit import clean_up
from pipelines.publish.manifest import build_manifest, commit, load_manifest

RNG = np.random.default_rng(0)


def _file(output: str, name: str, keys: list[str], dim: int, so: dict | None = None,
          dtype: Any = pa.float32()) -> dict[str, Any]:
    vectors = RNG.standard_normal((len(keys), dim)).astype(np.float32)
    table = pa.table({"key": keys, "source_uri": [f"s3://in/{k}" for k in keys],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), dtype), dim),
                      "label": [k[:1] for k in keys]},
                     metadata={b"featx": b'{"model": "m"}'})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    body = sink.getvalue().to_pybytes()
    write_bytes(join(output, f"data/{name}.parquet"), body, so)
    return {"id": name, "shards": [{"uri": f"s3://in/{name}", "records": len(keys)}],
            "files": [{"path": f"data/{name}.parquet", "rows": len(keys), "bytes": len(body)}], "error_files": []}


def _publish(output: str, pieces: list[dict], dim: int, so: dict | None = None, model: str = "m",
             dtype: str = "float32") -> dict[str, Any]:
    m = build_manifest(previous=load_manifest(output, so), run_id=f"run-{model}", model={"model": model},
                       model_fingerprint=model, content_fingerprint=f"cfp-{model}", dim=dim, embedding_dtype=dtype,
                       input_uri="s3://in", input_format="jsonl", pieces=pieces)
    commit(output, m, so)
    return m


def _expected(output: str, manifest: dict, so: dict | None = None) -> dict[str, list[float]]:
    """The manifest's rows, read file by file with pyarrow: what featx publishes."""
    from operators.io.storage import get_fs

    fs, root = get_fs(output, so)
    rows: dict[str, list[float]] = {}
    for f in manifest["files"]:
        t = pq.read_table(f"{root}/{f['path']}", filesystem=fs)
        rows.update(zip(t["key"].to_pylist(), t["embedding"].to_pylist()))
    return rows


def _delta_rows(output: str, so: dict | None = None, version: int | None = None) -> dict[str, list[float]]:
    uri, dso = delta.location(output, so)
    t = DeltaTable(uri, version=version, storage_options=dso).to_pyarrow_dataset().to_table()
    keys = t["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key twice in the Delta table"
    return dict(zip(keys, t["embedding"].to_pylist()))


def _same(got: dict[str, list[float]], want: dict[str, list[float]]) -> None:
    assert set(got) == set(want)
    np.testing.assert_array_equal(np.array([got[k] for k in sorted(want)], np.float32),
                                  np.array([want[k] for k in sorted(want)], np.float32))


def _history(output: str) -> list[dict[str, Any]]:
    """Each version's commitInfo, from the log files themselves (what any Delta reader reads)."""
    out = []
    for name in sorted(os.listdir(Path(output) / "_delta_log")):
        if name.endswith(".json"):
            for line in (Path(output) / "_delta_log" / name).read_text().splitlines():
                action = json.loads(line)
                if "commitInfo" in action:
                    out.append({"version": int(name.split(".")[0]), **action["commitInfo"]})
    return out


def test_each_snapshot_is_one_delta_version_with_exactly_its_files(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a, b, c = (_file(out, n, [f"{n}{i}" for i in range(3)], 4) for n in "abc")
    m1 = _publish(out, [a, b, c], 4)
    s1 = delta.sync(out, m1, None, keep_snapshots=5)
    assert s1["in_sync"] and s1["snapshot"] == 1
    _same(_delta_rows(out), _expected(out, m1))
    # a refresh: b carried, c's piece changed (new file), a removed, d added
    c2, d = _file(out, "c2", ["c0", "cx"], 4), _file(out, "d", ["d0"], 4)
    m2 = _publish(out, [b, c2, d], 4)
    s2 = delta.sync(out, m2, None, keep_snapshots=5)
    assert s2["in_sync"] and s2["snapshot"] == 2 and s2["version"] == s1["version"] + 1
    _same(_delta_rows(out), _expected(out, m2))
    dt = DeltaTable(out)
    assert delta.current_files(out, None) == {f["path"] for f in m2["files"]}
    assert dt.metadata().configuration["featx.model"] == "m" and dt.metadata().configuration["featx.dim"] == "4"
    # what Delta readers are told the vectors are: an array of float (fixed_size_list is not a Delta type)
    field = {f["name"]: f for f in json.loads(dt.schema().to_json())["fields"]}["embedding"]
    assert field["type"] == {"type": "array", "elementType": "float", "containsNull": True}
    info = {h["version"]: h for h in _history(out)}[s2["version"]]
    assert (info["featx.snapshot"], info["featx.run_id"], info["featx.model"], info["featx.content_fingerprint"]) == \
        ("2", "run-m", "m", "cfp-m")
    # time travel lines up: snapshot N <-> the version that shows it
    assert delta.version_of(out, 1, None) == s1["version"] and delta.version_of(out, 2, None) == s2["version"]
    _same(_delta_rows(out, version=delta.version_of(out, 1, None)), _expected(out, m1))
    assert delta.sync(out, m2, None, keep_snapshots=5)["written"] == []  # in sync: nothing written


def test_a_model_change_overwrites_the_schema_and_the_properties(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    m1 = _publish(out, [_file(out, "a", ["a0", "a1"], 4)], 4)
    delta.sync(out, m1, None, keep_snapshots=5)
    m2 = _publish(out, [_file(out, "a8", ["a0", "a1"], 8)], 8, model="m2")
    s2 = delta.sync(out, m2, None, keep_snapshots=5)
    assert s2["in_sync"] and len(s2["written"]) == 2  # the data (new schema), then the table properties
    got = _delta_rows(out)
    _same(got, _expected(out, m2))
    assert {len(v) for v in got.values()} == {8}
    conf = DeltaTable(out).metadata().configuration
    assert (conf["featx.model"], conf["featx.dim"]) == ("m2", "8")
    assert delta.version_of(out, 2, None) == s2["version"]
    _same(_delta_rows(out, version=delta.version_of(out, 1, None)), _expected(out, m1))


def test_missing_versions_are_written_in_order_and_old_tables_migrate(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a = _file(out, "a", ["a0"], 4)
    manifests = [_publish(out, [a], 4)]
    for n in range(2, 5):  # three commits whose Delta step never ran (a table from before Delta logs)
        manifests.append(_publish(out, [a, _file(out, f"p{n}", [f"p{n}"], 4)], 4))
    assert not (Path(out) / "_delta_log").exists()
    migrated = delta.sync(out, manifests[-1], None, keep_snapshots=5)
    assert migrated["in_sync"] and migrated["snapshot"] == 4 and len(migrated["written"]) == 1  # from the current one
    _same(_delta_rows(out), _expected(out, manifests[-1]))
    for n in range(5, 8):  # the Delta step of snapshots 5..7 died: the next sync writes each, in order
        manifests.append(_publish(out, [a, _file(out, f"p{n}", [f"p{n}"], 4)], 4))
    caught = delta.sync(out, manifests[-1], None, keep_snapshots=5)
    assert [delta.version_of(out, n, None) for n in (5, 6, 7)] == caught["written"]
    for n in (4, 5, 6, 7):
        _same(_delta_rows(out, version=delta.version_of(out, n, None)), _expected(out, manifests[n - 1]))
    # behind by more than keep_snapshots: only the kept snapshots get versions (older files may be gone)
    for n in range(8, 12):
        manifests.append(_publish(out, [a, _file(out, f"p{n}", [f"p{n}"], 4)], 4))
    assert len(delta.sync(out, manifests[-1], None, keep_snapshots=2)["written"]) == 2
    assert delta.version_of(out, 9, None) is None and delta.version_of(out, 10, None) is not None


def test_clean_up_keeps_what_the_delta_log_shows_and_a_user_vacuum_keeps_the_current_snapshot(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a, b = _file(out, "a", ["a0"], 4), _file(out, "b", ["b0"], 4)
    m1 = _publish(out, [a, b], 4)
    delta.sync(out, m1, None, keep_snapshots=1)
    m2 = _publish(out, [a, _file(out, "c", ["c0"], 4)], 4)  # b leaves; the Delta step has not run yet
    clean_up(out, m2, 1, None)
    assert (Path(out) / "data/b.parquet").exists()  # keep_snapshots=1, but Delta readers still see snapshot 1
    _same(_delta_rows(out), _expected(out, m1))
    delta.sync(out, m2, None, keep_snapshots=1)
    clean_up(out, m2, 1, None)
    assert sorted(list_files(f"{out}/data")) == ["a.parquet", "c.parquet"]
    # a user's VACUUM: the lite one (tombstones) and the full one (every unlisted file), retention checks off
    (Path(out) / "data/stray.parquet").write_bytes((Path(out) / "data/a.parquet").read_bytes())
    m3 = _publish(out, [_file(out, "d", ["d0"], 4), _file(out, "c", ["c0"], 4)], 4)
    delta.sync(out, m3, None, keep_snapshots=5)
    dt = DeltaTable(out)
    dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False, full=True)
    assert sorted(list_files(f"{out}/data")) == ["c.parquet", "d.parquet"]  # gone: the file m3 dropped, a stray one
    _same(_delta_rows(out), _expected(out, m3))  # the current snapshot is whole, for Delta and for featx
    assert all((Path(out) / f["path"]).exists() for f in m3["files"])
    assert (Path(out) / "_manifest.json").exists() and list_files(f"{out}/_manifests")  # `_` folders are not touched


def test_float16_tables_and_other_stores_say_why_they_have_no_delta_log(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    m = _publish(out, [_file(out, "a", ["a0"], 4, dtype=pa.float16())], 4, dtype="float16")
    s = delta.sync(out, m, None, keep_snapshots=5)
    assert "float16" in s["skipped"] and not (Path(out) / "_delta_log").exists()
    assert "memory" in delta.state("memory://x/out", m, None)["skipped"]


def test_s3_options_come_from_featx_storage_options_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    uri, opts = delta.location("s3://bkt/out/", {})
    assert uri == "s3://bkt/out" and opts == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1",
                                              "AWS_ALLOW_HTTP": "true"}  # credentials: delta-rs's own env lookup
    _, opts = delta.location("s3://bkt/out", {"key": "K", "secret": "S", "client_kwargs": {
        "endpoint_url": "https://minio:9000", "region_name": "us-east-2"}})
    assert opts == {"AWS_ENDPOINT_URL": "https://minio:9000", "AWS_REGION": "us-east-2", "AWS_ACCESS_KEY_ID": "K",
                    "AWS_SECRET_ACCESS_KEY": "S"}


def test_on_the_s3_server(s3_server: dict[str, Any], s3_fs: Any, s3_bucket: str) -> None:
    out = f"s3://{s3_bucket}/out"
    so = {"key": s3_server["key"], "secret": s3_server["secret"], "client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    a, b = _file(out, "a", ["a0", "a1"], 4, so), _file(out, "b", ["b0"], 4, so)
    m1 = _publish(out, [a, b], 4, so)
    s1 = delta.sync(out, m1, so, keep_snapshots=5)
    m2 = _publish(out, [b, _file(out, "c", ["c0"], 4, so)], 4, so)
    s2 = delta.sync(out, m2, so, keep_snapshots=5)
    assert s2["in_sync"] and s2["version"] == s1["version"] + 1
    _same(_delta_rows(out, so), _expected(out, m2, so))
    assert delta.version_of(out, 1, so) == s1["version"]
    _same(_delta_rows(out, so, version=s1["version"]), _expected(out, m1, so))
    text = json.dumps([s1, s2, delta.state(out, m2, so)])
    assert s3_server["secret"] not in text and s3_server["key"] not in text
