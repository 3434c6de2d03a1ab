"""Parquet sink: one embedded piece -> one data file (+ one error file when rows failed).

File names are deterministic: the piece id (from its shards' URIs and
fingerprints) and the model fingerprint, so a rerun of the same input with the
same model writes the same names, and nothing is published until the
manifest lists it. The embedding column is plain
``fixed_size_list<float32>[dim]`` (float16 on request); Ray's tensor extension
type never reaches the file.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import columns as C
from operators.storage import join, short_hash, write_bytes

RESULT_SCHEMA = pa.schema(
    [
        pa.field("piece", pa.string()),
        pa.field("data_file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("error_file", pa.string()),
        pa.field("error_rows", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("dim", pa.int64()),
        pa.field("t_read", pa.float64()),
        pa.field("t_preprocess", pa.float64()),
        pa.field("t_embed", pa.float64()),
        pa.field("t_write", pa.float64()),
        pa.field("node_id", pa.string()),
    ]
)


@dataclass(frozen=True)
class SinkOptions:
    output: str
    model_fingerprint: str
    metadata: dict[str, Any]
    embedding_dtype: str = "float32"
    storage_options: dict[str, Any] = field(default_factory=dict)


def data_file_name(piece: str, model_fp: str, part: str) -> str:
    return f"part-{piece}-{model_fp[:12]}-{part}.parquet"


def output_table(table: pa.Table, embedding_dtype: str) -> pa.Table:
    """The published columns of the rows that succeeded: key, source_uri, embedding, passthrough."""
    good = table.filter(C.ok_mask(table))
    emb = good[C.EMBEDDING].combine_chunks() if good.num_rows else pa.array([], table.schema.field(C.EMBEDDING).type)
    if embedding_dtype == "float16":
        dim = emb.type.list_size
        values = pc.cast(emb.flatten(), pa.float16()) if len(emb) else pa.array([], pa.float16())
        emb = pa.FixedSizeListArray.from_arrays(values, dim)
    passthrough = [c for c in table.column_names if not C.is_internal(c) and c not in (C.KEY, C.SOURCE, C.EMBEDDING)]
    cols = {C.KEY: good[C.KEY], C.SOURCE: good[C.SOURCE], C.EMBEDDING: emb}
    for c in passthrough:
        cols[c] = good[c]
    return pa.table(cols)


def error_table(table: pa.Table) -> pa.Table:
    bad = table.filter(pc.invert(C.ok_mask(table)))
    return pa.table(
        {C.KEY: bad[C.KEY], C.SOURCE: bad[C.SOURCE], "stage": bad[C.ERR_STAGE],
         "error_type": bad[C.ERR_TYPE], "message": bad[C.ERR_MSG]},
        schema=C.ERROR_SCHEMA,
    )


def _parquet_bytes(table: pa.Table, metadata: dict[str, Any] | None) -> bytes:
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"featx": json.dumps(metadata, sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=64 * 1024)
    return sink.getvalue().to_pybytes()


def write_piece(table: pa.Table, opts: SinkOptions) -> pa.Table:
    """Write the rows of one block (all of one piece, in the normal case) and return one result row per piece."""
    results = []
    pieces = pc.unique(table[C.PIECE]).to_pylist() if table.num_rows else []
    for piece in pieces:
        part = table.filter(pc.equal(table[C.PIECE], piece)) if len(pieces) > 1 else table
        results.append(_write_one(part, piece, opts))
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)


def _write_one(part: pa.Table, piece: str, opts: SinkOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    keys = part[C.KEY]
    tag = short_hash(str(part.num_rows), str(keys[0]), str(keys[-1]), n=8)
    name = data_file_name(piece, opts.model_fingerprint, tag)
    out = output_table(part, opts.embedding_dtype)
    errs = error_table(part)
    dim = int(part.schema.field(C.EMBEDDING).type.list_size)
    meta = {**opts.metadata, "dim": dim}
    data_file, error_file, nbytes = None, None, 0
    if out.num_rows:
        payload = _parquet_bytes(out, meta)
        nbytes = len(payload)
        data_file = f"data/{name}"
        write_bytes(join(opts.output, data_file), payload, opts.storage_options)
    if errs.num_rows:
        error_file = f"_errors/{name}"
        write_bytes(join(opts.output, error_file), _parquet_bytes(errs, None), opts.storage_options)

    def first(col: str) -> float:
        return float(part[col][0].as_py()) if col in part.column_names and part.num_rows else 0.0

    return {
        "piece": piece, "data_file": data_file, "rows": out.num_rows, "error_file": error_file,
        "error_rows": errs.num_rows, "bytes": nbytes, "dim": dim,
        "t_read": first(C.T_READ), "t_preprocess": first(C.T_PRE), "t_embed": first(C.T_EMBED),
        "t_write": time.perf_counter() - t0, "node_id": _node_id(),
    }


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray: the inner loop runs standalone too
        pass
    return f"local-{os.uname().nodename}"

