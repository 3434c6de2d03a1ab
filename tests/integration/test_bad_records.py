"""Quarantine: bad records of every kind, mixed into good shards, go to _errors; counts add up exactly."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.errors import PipelineError
from pipelines.config import build_config
from pipelines.demo.sample_data import write_image_tars
from pipelines.embed.job import run_embed
from pipelines.publish.manifest import load_manifest
from pipelines.read.table import read_table
from tests.integration.helpers import write_image_files

pytestmark = pytest.mark.usefixtures("ray_local")


def _errors(out: Path) -> dict[str, tuple[str, str, str]]:
    m = load_manifest(str(out))
    t = pa.concat_tables([pq.read_table(out / f["path"]) for f in m["error_files"]])
    return {r["key"]: (r["stage"], r["error_type"], r["message"]) for r in t.to_pylist()}


def _published(out: Path) -> set[str]:
    return set(read_table(str(out))["key"].to_pylist())


def test_bad_images_of_every_kind(tmp_path: Path, tiny_resnet_weights: str) -> None:
    from PIL import Image

    folder = tmp_path / "in"
    good = write_image_files(folder, per_photo=3, photos=("chelsea", "coffee", "brick"))["records"]
    jpg = (folder / "chelsea" / "000.jpg").read_bytes()
    (folder / "bad").mkdir()
    (folder / "bad" / "corrupt.jpg").write_bytes(jpg[:200] + bytes(range(256)) * 40)
    (folder / "bad" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (folder / "bad" / "html.jpg").write_bytes(b"<html><body>404 not found</body></html>")
    (folder / "bad" / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 Mpx in a few kB: a decompression bomb
    (folder / "bad" / "bomb.png").write_bytes(buf.getvalue())
    bad = {"bad/corrupt.jpg", "bad/truncated.jpg", "bad/html.jpg", "bad/empty.jpg", "bad/bomb.png"}
    out = tmp_path / "out"
    base = {"input": str(folder), "format": "images", "output": str(out), "model": "resnet18",
            "weights": tiny_resnet_weights}
    # 5 bad of 14 is over the default budget: the run fails with a summary and publishes nothing
    with pytest.raises(PipelineError, match=f"5 of {good + 5} records failed") as e:
        run_embed(build_config(None, base), progress=lambda m: None)
    assert "decode/" in str(e.value) and "max_error_fraction" in str(e.value)
    assert load_manifest(str(out)) is None
    report = run_embed(build_config(None, {**base, "max_error_fraction": 0.5}), progress=lambda m: None)
    errs = _errors(out)
    assert set(errs) == bad
    assert _published(out) == {p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")} - bad
    assert report["rows_in"] == good + 5 == report["published_rows"] + report["published_error_rows"]
    assert errs["bad/empty.jpg"][:2] == ("decode", "EmptyImage")
    assert errs["bad/bomb.png"][0] == "decode" and "pixel" in errs["bad/bomb.png"][2].lower()
    assert all(stage == "decode" for stage, _, _ in errs.values())
    assert all(k in msg for k, (_, _, msg) in errs.items())  # each message names its record


def test_bad_text_records_and_shards(tmp_path: Path, tiny_bert: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = [{"id": f"g{i}", "text": f"a perfectly fine sentence number {i}"} for i in range(12)]
    lines = [json.dumps(r).encode() for r in good[:6]]
    lines += [json.dumps({"id": "empty", "text": "   "}).encode(), json.dumps({"id": "null", "text": None}).encode(),
              json.dumps({"id": "missing"}).encode(), b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}',
              b"{this is not json", json.dumps(["a", "list"]).encode()]
    lines += [json.dumps(r).encode() for r in good[6:]]
    (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"id": ["x1", "x2"], "body": ["the text is in", "another column"]}), folder / "wrong.parquet")
    out = tmp_path / "out"
    cfg = {"input": str(folder), "format": "jsonl", "output": str(out), "model": f"hf:{tiny_bert}", "key_column": "id",
           "max_error_fraction": 0.5}
    report = run_embed(build_config(None, cfg), progress=lambda m: None)
    errs = _errors(out)
    published = _published(out)
    assert published == {f"mixed.jsonl#g{i}" for i in range(12)}
    # records that cannot be parsed have no id yet: their key is the line number (1-based)
    assert set(errs) == {"mixed.jsonl#empty", "mixed.jsonl#null", "mixed.jsonl#missing", "mixed.jsonl#10",
                         "mixed.jsonl#11", "mixed.jsonl#12"}
    assert {errs[k][1] for k in ("mixed.jsonl#empty", "mixed.jsonl#null", "mixed.jsonl#missing")} == {"EmptyText"}
    assert errs["mixed.jsonl#10"][:2] == ("read", "UnicodeDecodeError")  # undecodable bytes
    assert errs["mixed.jsonl#11"][0] == "read" and "line 11" in errs["mixed.jsonl#11"][2]
    assert report["rows_in"] == 18 == len(published) + len(errs)
    # the wrong-schema shard is a parquet file: its own job reports it whole, with the cause
    out2 = tmp_path / "out2"
    with pytest.raises(PipelineError, match="1 of 1 records failed"):
        run_embed(build_config(None, {**cfg, "format": "parquet", "output": str(out2), "max_error_fraction": 0.0}),
                  progress=lambda m: None)
    run_embed(build_config(None, {**cfg, "format": "parquet", "output": str(out2), "max_error_fraction": 1.0}),
              progress=lambda m: None)
    errs2 = _errors(out2)
    assert list(errs2) == ["wrong.parquet#shard"]
    stage, etype, msg = errs2["wrong.parquet#shard"]
    assert stage == "read" and "no column 'text'" in msg and "body" in msg and "text_column" in msg


def test_truncated_tar_keeps_the_records_before_the_cut(tmp_path: Path, tiny_resnet_weights: str) -> None:
    folder = tmp_path / "in"
    info = write_image_tars(folder, per_photo=2, shards=2, photos=("chelsea", "coffee", "brick"))
    tars = sorted(folder.glob("*.tar"))
    whole = tars[1].read_bytes()
    with tarfile.open(tars[1]) as t:
        members = [m for m in t.getmembers() if m.isfile()]
    cut = members[3].offset_data + members[3].size // 2  # inside the 4th member's data
    tars[1].write_bytes(whole[:cut])
    out = tmp_path / "out"
    report = run_embed(build_config(None, {"input": str(folder), "format": "webdataset", "output": str(out),
                                           "model": "resnet18", "weights": tiny_resnet_weights,
                                           "max_error_fraction": 0.5}), progress=lambda m: None)
    errs = _errors(out)
    assert list(errs) == [f"{tars[1].name}#truncated"] and errs[f"{tars[1].name}#truncated"][1] == "TruncatedShard"
    per_tar = info["records"] // 2
    published = _published(out)
    assert sum(k.startswith(tars[0].name) for k in published) == per_tar  # the intact shard: all of it
    before_cut = sum(k.startswith(tars[1].name) for k in published)
    assert 0 < before_cut < per_tar  # the truncated shard: the samples before the cut are still embedded
    assert report["rows_in"] == len(published) + 1

