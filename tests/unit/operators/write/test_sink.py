"""The output contract: columns, types, metadata, error files, deterministic names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import columns as C
from operators.embed.embedder import vectors_to_arrow
from operators.write.sink import SinkOptions, write_piece


def _embedded(n: int, dim: int, bad: set[int]) -> pa.Table:
    vec = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    valid = np.array([i not in bad for i in range(n)])
    return pa.table({
        C.KEY: [f"k{i}" for i in range(n)], C.SOURCE: ["s3://b/x.tar"] * n,
        C.ERR_STAGE: [("decode" if i in bad else None) for i in range(n)],
        C.ERR_TYPE: [("OSError" if i in bad else None) for i in range(n)],
        C.ERR_MSG: [("broken" if i in bad else None) for i in range(n)],
        "label": list(range(n)), C.PIECE: ["p1"] * n, C.T_READ: [0.5] * n,
        C.EMBEDDING: vectors_to_arrow(vec, valid, dim),
    })


def test_write_piece_files_schema_metadata_and_errors(tmp_path: Path) -> None:
    opts = SinkOptions(output=str(tmp_path), content_fingerprint="abcdef123456789", metadata={"model": "m"})
    res = write_piece(_embedded(5, 4, {1}), opts).to_pylist()
    assert len(res) == 1 and res[0]["rows"] == 4 and res[0]["error_rows"] == 1 and res[0]["dim"] == 4
    data = pq.read_table(tmp_path / res[0]["data_file"])
    assert data.column_names == ["key", "source_uri", "embedding", "label"]
    assert data.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert data["key"].to_pylist() == ["k0", "k2", "k3", "k4"]
    assert data["embedding"][1].as_py() == [8.0, 9.0, 10.0, 11.0]
    meta = json.loads(data.schema.metadata[b"featx"])
    assert meta == {"model": "m", "dim": 4}
    errs = pq.read_table(tmp_path / res[0]["error_file"]).to_pylist()
    assert errs == [{"key": "k1", "source_uri": "s3://b/x.tar", "content_hash": None, "stage": "decode", "error_type": "OSError", "message": "broken"}]
    # same rows, same model -> same file name (a rerun overwrites, never adds)
    again = write_piece(_embedded(5, 4, {1}), opts).to_pylist()
    assert again[0]["data_file"] == res[0]["data_file"]
    assert res[0]["data_file"].startswith("data/part-p1-abcdef123456-")


def test_float16_on_request(tmp_path: Path) -> None:
    opts = SinkOptions(output=str(tmp_path), content_fingerprint="f" * 16, metadata={}, embedding_dtype="float16")
    res = write_piece(_embedded(3, 2, set()), opts).to_pylist()
    t = pq.read_table(tmp_path / res[0]["data_file"])
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 2)
    assert res[0]["error_file"] is None
