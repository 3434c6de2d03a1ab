"""Readers: every format, stable keys, passthrough, and bad records as error rows (never dropped)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import columns as C
from operators.errors import StorageError
from operators.read.readers import ReadOptions, read_shard
from pipelines.demo.sample_data import crops, write_image_tars


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_groups_members_and_passthrough(tmp_path: Path) -> None:
    info = write_image_tars(tmp_path, per_photo=2, shards=1, photos=("chelsea", "coffee"))
    shard = tmp_path / "shard-00000.tar"
    t = read_shard(str(shard), "shard-00000.tar", ReadOptions(format="webdataset"))
    assert t.num_rows == info["records"] == 4
    assert t[C.KEY].to_pylist() == [f"shard-00000.tar/{k}" for k in ("chelsea_000", "chelsea_001", "coffee_000", "coffee_001")]
    assert t["cls"].to_pylist() == [0, 0, 1, 1]
    assert json.loads(t["json"][2].as_py()) == {"photo": "coffee"}
    assert t[C.ERR_STAGE].null_count == 4
    assert all(p.startswith(b"\xff\xd8") for p in t[C.PAYLOAD].to_pylist())  # JPEG bytes


def test_webdataset_sample_without_image_and_truncated_tar(tmp_path: Path) -> None:
    jpg = crops("chelsea", 1, __import__("numpy").random.default_rng(0))[0]
    good = tmp_path / "a.tar"
    _tar(good, [("s1.jpg", jpg), ("s1.cls", b"3"), ("s2.txt", b"no image here")])
    t = read_shard(str(good), "a.tar", ReadOptions(format="webdataset"))
    assert t.num_rows == 2
    assert t[C.ERR_TYPE].to_pylist() == [None, "MissingImage"]
    assert t["txt"].to_pylist() == [None, "no image here"]

    big = tmp_path / "b.tar"
    _tar(big, [(f"s{i}.jpg", jpg) for i in range(5)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(big.read_bytes()[: len(jpg) * 3])  # truncated mid-record
    t = read_shard(str(cut), "cut.tar", ReadOptions(format="webdataset"))
    errors = [r for r in t.to_pylist() if r[C.ERR_STAGE]]
    assert len(errors) == 1 and errors[0][C.ERR_TYPE] == "TruncatedShard"
    assert "cut.tar" in errors[0][C.ERR_MSG]
    assert t.num_rows - 1 >= 1  # the records before the cut are kept


def test_jsonl_text_keys_passthrough_and_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "hello", "label": "a"}\n\n{"text": "world", "label": "b"}\nnot json\n{"label": "c"}\n')
    t = read_shard(str(p), "x.jsonl", ReadOptions(format="jsonl", passthrough=("label",)))
    rows = t.to_pylist()
    assert [r[C.KEY] for r in rows] == ["x.jsonl#1", "x.jsonl#3", "x.jsonl#4", "x.jsonl#5"]
    assert [r[C.PAYLOAD] for r in rows] == ["hello", "world", None, None]
    assert rows[2][C.ERR_STAGE] == "read" and "line 4" in rows[2][C.ERR_MSG]
    assert rows[3][C.ERR_STAGE] is None  # missing text is a preprocessing error, found there
    assert [r["label"] for r in rows] == ["a", "b", None, "c"]


def test_parquet_text_key_column_and_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["u1", "u2"], "body": ["one", "two"], "y": [1, 2]}), p)
    t = read_shard(str(p), "t.parquet", ReadOptions(format="parquet", text_column="body", key_column="id", passthrough=("y",)))
    assert t[C.KEY].to_pylist() == ["t.parquet#u1", "t.parquet#u2"]
    assert t["y"].to_pylist() == [1, 2]
    bad = read_shard(str(p), "t.parquet", ReadOptions(format="parquet", text_column="text"))
    assert bad.num_rows == 1 and bad[C.ERR_STAGE][0].as_py() == "read"
    msg = bad[C.ERR_MSG][0].as_py()
    assert "'text'" in msg and "body" in msg and "text_column" in msg


def test_parquet_images_plain_and_hf_struct(tmp_path: Path) -> None:
    import numpy as np

    jpgs = crops("coffee", 2, np.random.default_rng(1))
    p1 = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"image": jpgs, "label": ["c", "c"]}), p1)
    p2 = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(jpgs)]}), p2)
    for p in (p1, p2):
        t = read_shard(str(p), p.name, ReadOptions(format="parquet-images"))
        assert t[C.PAYLOAD].to_pylist() == jpgs
        assert t[C.KEY].to_pylist() == [f"{p.name}#0", f"{p.name}#1"]


def test_unreadable_shard_is_one_error_row(tmp_path: Path) -> None:
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"this is not parquet")
    t = read_shard(str(p), "broken.parquet", ReadOptions(format="parquet"))
    assert t.num_rows == 1
    r = t.to_pylist()[0]
    assert r[C.KEY] == "broken.parquet#shard" and r[C.ERR_STAGE] == "read" and str(p) in r[C.ERR_MSG]


def test_a_body_of_another_length_than_listed_is_a_storage_error_not_fewer_records(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_shard(str(p), "x.jsonl", ReadOptions(format="jsonl"), size=p.stat().st_size).num_rows == 2
    # the listing said more bytes than the store served (a partial body, or the object changed since)
    with pytest.raises(StorageError, match="listing said"):
        read_shard(str(p), "x.jsonl", ReadOptions(format="jsonl"), size=p.stat().st_size + 10)


def test_image_file_key_is_relative_path(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "cats").mkdir()
    f = tmp_path / "cats" / "1.jpg"
    f.write_bytes(crops("chelsea", 1, np.random.default_rng(0))[0])
    t = read_shard(str(f), "cats/1.jpg", ReadOptions(format="images"))
    assert t[C.KEY].to_pylist() == ["cats/1.jpg"] and t[C.SOURCE].to_pylist() == [str(f)]
    with pytest.raises(ValueError, match="unknown format"):
        read_shard(str(f), "cats/1.jpg", ReadOptions(format="tiff"))
