"""Parquet sink: one embedded piece -> one data file (+ one error file when rows failed).

File names are deterministic: the piece id (from its shards' URIs, sizes and
fingerprints), the content fingerprint (model, preprocessing, dtype, read
options) and the rows' key range, so a rerun of the same input with the same
settings writes the same names. A run writes under its own staging prefix
(``OUTPUT/_staging/<run_id>/``); the commit moves the files to their final
names and only then lists them in the manifest. The embedding column is plain
``fixed_size_list<float32>[dim]`` (float16 on request); Ray's tensor extension
type never reaches the file.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import columns as C
from operators.faults import drop_rows
from operators.io.parquet import read_parquet
from operators.io.storage import join, retries_done, short_hash, write_bytes

RESULT_SCHEMA = pa.schema(
    [
        pa.field("piece", pa.string()),
        pa.field("data_file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("error_file", pa.string()),
        pa.field("error_rows", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("piece_rows", pa.int64()),  # records the piece's embedded shards hold (all parts together)
        pa.field("reused_rows", pa.int64()),  # rows that took the snapshot's stored vector (same content)
        pa.field("deduped_rows", pa.int64()),  # rows that copied the vector of the same content in the run
        pa.field("held_rows", pa.int64()),  # rows held back for their representative in another block ...
        pa.field("pending_file", pa.string()),  # ... staged here (no vector yet) for the fill pass
        pa.field("held_from", pa.string()),  # JSON list: the pieces of their representatives
        pa.field("shard_rows", pa.string()),  # JSON {shard uri: records read}, as the read stage counted them
        pa.field("retries", pa.int64()),  # storage retries this part's read and write needed
        pa.field("dim", pa.int64()),
        pa.field("t_read", pa.float64()),
        pa.field("t_preprocess", pa.float64()),
        pa.field("t_embed", pa.float64()),
        pa.field("t_write", pa.float64()),
        pa.field("node_id", pa.string()),  # where the part was written
        pa.field("stage_nodes", pa.string()),  # JSON {"preprocess": {node id: rows}, "embed": {...}}: counts only
        pa.field("actors", pa.string()),  # JSON {actor id: rows}: which embedding actors did the work
        pa.field("batch_sizes", pa.string()),  # JSON {batch size: rows}: what autotuning chose
        # wall-clock times (time.time()) of this block: preprocessed, its actor ready, embedded, written
        pa.field("ts_preprocessed", pa.float64()),
        pa.field("ts_actor_ready", pa.float64()),
        pa.field("ts_embedded", pa.float64()),
        pa.field("ts_written", pa.float64()),
    ]
)


@dataclass(frozen=True)
class SinkOptions:
    output: str
    content_fingerprint: str
    metadata: dict[str, Any]
    embedding_dtype: str = "float32"
    storage_options: dict[str, Any] = field(default_factory=dict)
    staging: str = ""  # prefix under output where this run writes ("_staging/<run_id>"); "" writes final names

    def staged(self, rel: str) -> str:
        return join(self.output, self.staging, rel) if self.staging else join(self.output, rel)


def data_file_name(piece: str, content_fp: str, part: str) -> str:
    return f"part-{piece}-{content_fp[:12]}-{part}.parquet"


def output_table(table: pa.Table, embedding_dtype: str) -> pa.Table:
    """The published columns of the rows that succeeded: key, source_uri, embedding, passthrough."""
    good = table.filter(C.ok_mask(table))
    emb = good[C.EMBEDDING].combine_chunks() if good.num_rows else pa.array([], table.schema.field(C.EMBEDDING).type)
    if embedding_dtype == "float16":
        dim = emb.type.list_size
        values = pc.cast(emb.flatten(), pa.float16()) if len(emb) else pa.array([], pa.float16())
        emb = pa.FixedSizeListArray.from_arrays(values, dim)
    fixed = (C.KEY, C.SOURCE, C.EMBEDDING, C.CONTENT_HASH)
    passthrough = [c for c in table.column_names if not C.is_internal(c) and c not in fixed]
    cols = {C.KEY: good[C.KEY], C.SOURCE: good[C.SOURCE], C.EMBEDDING: emb}
    if C.CONTENT_HASH in table.column_names:
        cols[C.CONTENT_HASH] = good[C.CONTENT_HASH]
    for c in passthrough:
        cols[c] = good[c]
    return pa.table(cols)


def error_table(table: pa.Table) -> pa.Table:
    bad = table.filter(pc.invert(C.ok_mask(table)))
    return pa.table(
        {C.KEY: bad[C.KEY], C.SOURCE: bad[C.SOURCE],
         C.CONTENT_HASH: bad[C.CONTENT_HASH] if C.CONTENT_HASH in bad.column_names else pa.nulls(bad.num_rows, pa.binary(16)),
         "stage": bad[C.ERR_STAGE],
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
    retries0 = retries_done()
    read_counts = part[C.SHARD_ROWS][0].as_py() if C.SHARD_ROWS in part.column_names and part.num_rows else "{}"
    read_retries = int(pc.sum(part[C.RETRIES]).as_py() or 0) if C.RETRIES in part.column_names else 0
    part = drop_rows(part)  # inert unless a test asks (the commit must then refuse: see pipelines.publish.commit)
    keys = part[C.KEY]
    tag = short_hash(str(part.num_rows), str(keys[0]), str(keys[-1]), n=8)
    name = data_file_name(piece, opts.content_fingerprint, tag)
    whole = part  # the stage figures count every row that went through the stages, held ones too
    pending_file, held, held_from = None, 0, None
    if C.HOW in part.column_names and pc.any(pc.equal(part[C.HOW], C.HOW_HELD)).as_py():
        is_held = pc.equal(part[C.HOW], C.HOW_HELD)
        pending = held_table(part.filter(is_held))
        held = pending.num_rows
        held_from = json.dumps(sorted(pc.unique(pending[C.FOLLOW_PIECE]).to_pylist()))
        pending_file = f"_pending/{name}"
        write_bytes(opts.staged(pending_file), _parquet_bytes(pending, None), opts.storage_options)
        part = part.filter(pc.invert(is_held))
    out = output_table(part, opts.embedding_dtype)
    errs = error_table(part)
    dim = int(part.schema.field(C.EMBEDDING).type.list_size)
    meta = {**opts.metadata, "dim": dim}
    data_file, error_file, nbytes = None, None, 0
    if out.num_rows:
        payload = _parquet_bytes(out, meta)
        nbytes = len(payload)
        data_file = f"data/{name}"
        write_bytes(opts.staged(data_file), payload, opts.storage_options)
    if errs.num_rows:
        error_file = f"_errors/{name}"
        write_bytes(opts.staged(error_file), _parquet_bytes(errs, None), opts.storage_options)

    def first(col: str) -> float:
        return float(whole[col][0].as_py()) if col in whole.column_names and whole.num_rows else 0.0

    def total(col: str) -> float:  # stage seconds: the sum of the part's rows' shares
        return float(pc.sum(whole[col]).as_py() or 0.0) if col in whole.column_names and whole.num_rows else 0.0

    def how(value: int) -> int:  # rows (published) that got their vector this way
        if C.HOW not in part.column_names or not part.num_rows:
            return 0
        return int(pc.sum(pc.and_(pc.equal(part[C.HOW], value), C.ok_mask(part))).as_py() or 0)

    return {
        "piece": piece, "data_file": data_file, "rows": out.num_rows, "error_file": error_file,
        "error_rows": errs.num_rows, "bytes": nbytes, "dim": dim,
        "reused_rows": how(C.HOW_REUSED), "deduped_rows": how(C.HOW_DEDUPED),
        "held_rows": held, "pending_file": pending_file, "held_from": held_from,
        "piece_rows": int(whole[C.PIECE_ROWS][0].as_py()) if C.PIECE_ROWS in whole.column_names else whole.num_rows,
        "shard_rows": read_counts, "retries": read_retries + retries_done() - retries0,
        "t_read": total(C.T_READ), "t_preprocess": total(C.T_PRE), "t_embed": total(C.T_EMBED),
        "t_write": time.perf_counter() - t0, "node_id": C.current_node_id(),
        "stage_nodes": json.dumps({"preprocess": C.node_counts(whole, C.NODE_PRE),
                                   "embed": C.node_counts(whole, C.NODE_EMBED)}),
        "actors": json.dumps(C.node_counts(whole, C.ACTOR)),
        "batch_sizes": json.dumps(C.node_counts(part, C.BATCH)),  # held rows were in no batch
        "ts_preprocessed": first(C.TS_PRE) or None, "ts_actor_ready": first(C.TS_ACTOR_READY) or None,
        "ts_embedded": first(C.TS_EMBED) or None, "ts_written": time.time(),
    }


def held_table(rows: pa.Table) -> pa.Table:
    """Rows held back for their representative, as staged: the published columns but ``embedding``, and the
    representative's key and piece."""
    fixed = (C.KEY, C.SOURCE, C.EMBEDDING, C.CONTENT_HASH)
    passthrough = [c for c in rows.column_names if not C.is_internal(c) and c not in fixed]
    return rows.select([C.KEY, C.SOURCE, C.CONTENT_HASH, *passthrough, C.FOLLOW, C.FOLLOW_PIECE])


def fill_held(piece: str, pending_files: list[str], sources: dict[str, dict[str, list[str]]], piece_rows: int,
              opts: SinkOptions) -> dict[str, Any]:
    """The fill pass for one piece: its held rows (``pending_files``) get their representative's vector, bit for
    bit, or its error (the same content fails the same way), and are written as one more part of the piece.

    ``sources``: per representative piece, its staged ``data`` and ``errors`` files (this run's parts).
    """
    from operators.errors import PipelineError

    t0 = time.perf_counter()
    retries0 = retries_done()
    pending = pa.concat_tables([read_parquet(opts.staged(f), opts.storage_options) for f in pending_files],
                               promote_options="permissive")
    found_keys, vectors, err_keys, err_rows = [], [], [], []
    for rep_piece, files in sources.items():
        wanted = pc.unique(pending.filter(pc.equal(pending[C.FOLLOW_PIECE], rep_piece))[C.FOLLOW])
        for f in files.get("data", []):
            t = read_parquet(opts.staged(f), opts.storage_options, columns=[C.KEY, C.EMBEDDING])
            t = t.filter(pc.is_in(t[C.KEY], value_set=wanted))
            if t.num_rows:
                found_keys.append(t[C.KEY].combine_chunks())
                emb = t[C.EMBEDDING].combine_chunks()
                vectors.append(emb.cast(pa.list_(pa.float32(), emb.type.list_size)))
        for f in files.get("errors", []):
            t = read_parquet(opts.staged(f), opts.storage_options)
            t = t.filter(pc.is_in(t[C.KEY], value_set=wanted))
            if t.num_rows:
                err_keys.append(t[C.KEY].combine_chunks())
                err_rows += t.select(["stage", "error_type", "message"]).to_pylist()
    rep_keys = pending[C.FOLLOW].combine_chunks()
    ok_keys = pa.concat_arrays(found_keys) if found_keys else pa.array([], pa.string())
    bad_keys = pa.concat_arrays(err_keys) if err_keys else pa.array([], pa.string())
    at = pc.index_in(rep_keys, value_set=ok_keys)
    at_err = pc.index_in(rep_keys, value_set=bad_keys).to_pylist()
    missing = [k for k, a, b in zip(rep_keys.to_pylist(), at.to_pylist(), at_err) if a is None and b is None]
    if missing:
        raise PipelineError(f"piece {piece}: {len(missing)} rows held back for their representative found no row of it "
                            f"(e.g. {missing[0]!r}) in this run's parts; nothing was published. This is a bug: rerun "
                            "with reuse: none and report it.")
    if vectors:
        emb = pa.concat_arrays(vectors).take(at)  # null where the representative failed
    else:  # every representative failed: no vector (and no data file: the dim is not recorded)
        emb = pa.nulls(pending.num_rows, pa.list_(pa.float32(), 1))
    failed = [None if b is None else (k, err_rows[b]) for k, b in zip(rep_keys.to_pylist(), at_err)]
    stages = [f and f[1]["stage"] for f in failed]
    types = [f and f[1]["error_type"] for f in failed]
    msgs = [f and f"the same content as {f[0]!r}, which failed: {f[1]['message']}"[:2000] for f in failed]
    n = pending.num_rows
    table = pending.drop_columns([C.FOLLOW, C.FOLLOW_PIECE]).append_column(C.EMBEDDING, emb)
    table = table.append_column(C.ERR_STAGE, pa.array(stages, pa.string())).append_column(
        C.ERR_TYPE, pa.array(types, pa.string())).append_column(C.ERR_MSG, pa.array(msgs, pa.string()))
    table = table.append_column(C.PIECE, pa.array([piece] * n, pa.string()))
    table = table.append_column(C.PIECE_ROWS, pa.array([piece_rows] * n, pa.int64()))
    table = table.append_column(C.HOW, pa.array(np.full(n, C.HOW_DEDUPED, np.int8)))
    table = table.append_column(C.T_EMBED, C.row_shares(time.perf_counter() - t0, n))
    reads = retries_done() - retries0
    result = _write_one(table, piece, opts)
    result["retries"] += reads
    return result


def carry_piece(piece: str, sources: list[dict[str, Any]], opts: SinkOptions) -> dict[str, Any]:
    """Copy the published rows (and error rows) of a piece's unchanged shards into one part of the new piece.

    ``sources``: per old piece, its data files, error files and the URIs of the shards to keep. No model
    runs: the vectors are the ones already published for exactly these shard contents.
    """
    t0 = time.perf_counter()
    retries0 = retries_done()
    data, errs = [], []
    for src in sources:
        uris = pa.array(src["uris"], pa.string())
        for f in src["files"]:
            t = read_parquet(join(opts.output, f), opts.storage_options)
            data.append(t.filter(pc.is_in(t[C.SOURCE], value_set=uris)))
        for f in src["error_files"]:
            t = read_parquet(join(opts.output, f), opts.storage_options)
            errs.append(t.filter(pc.is_in(t[C.SOURCE], value_set=uris)))
    out = pa.concat_tables(data, promote_options="permissive") if data else None
    bad = pa.concat_tables(errs, promote_options="permissive") if errs else None
    keys = (out[C.KEY].to_pylist() if out is not None else []) + (bad[C.KEY].to_pylist() if bad is not None else [])
    tag = "c" + short_hash(str(len(keys)), *(sorted(keys)[:1] + sorted(keys)[-1:]), n=8)
    name = data_file_name(piece, opts.content_fingerprint, tag)
    data_file, error_file, nbytes, dim = None, None, 0, 0
    if out is not None and out.num_rows:
        dim = int(out.schema.field(C.EMBEDDING).type.list_size)
        meta = json.loads(out.schema.metadata[b"featx"]) if out.schema.metadata and b"featx" in out.schema.metadata \
            else {**opts.metadata, "dim": dim}
        payload = _parquet_bytes(out.replace_schema_metadata(None), meta)
        nbytes = len(payload)
        data_file = f"data/{name}"
        write_bytes(opts.staged(data_file), payload, opts.storage_options)
    if bad is not None and bad.num_rows:
        error_file = f"_errors/{name}"
        write_bytes(opts.staged(error_file), _parquet_bytes(bad.cast(C.ERROR_SCHEMA), None), opts.storage_options)
    rows = out.num_rows if out is not None else 0
    err_rows = bad.num_rows if bad is not None else 0
    per_shard: dict[str, int] = {}
    for t in (out, bad):
        if t is not None and t.num_rows:
            for v in pc.value_counts(t[C.SOURCE]):
                per_shard[v["values"].as_py()] = per_shard.get(v["values"].as_py(), 0) + v["counts"].as_py()
    return {"piece": piece, "data_file": data_file, "rows": rows, "error_file": error_file, "error_rows": err_rows,
            "bytes": nbytes, "piece_rows": rows + err_rows, "dim": dim, "t_read": 0.0, "t_preprocess": 0.0,
            "t_embed": 0.0, "t_write": time.perf_counter() - t0, "node_id": C.current_node_id(),
            # rows copied per shard: the commit checks them against the counts the old manifest recorded
            "shard_rows": json.dumps(per_shard, sort_keys=True), "retries": retries_done() - retries0}


def write_error_rows(piece: str, rows: list[dict[str, Any]], opts: SinkOptions) -> dict[str, Any]:
    """Write error rows found outside a block (records quarantined after crashing their worker)."""
    t = pa.Table.from_pylist(rows, schema=C.ERROR_SCHEMA)
    tag = "q" + short_hash(str(t.num_rows), *[r[C.KEY] for r in rows], n=8)
    error_file = f"_errors/{data_file_name(piece, opts.content_fingerprint, tag)}"
    write_bytes(opts.staged(error_file), _parquet_bytes(t, None), opts.storage_options)
    return {"piece": piece, "data_file": None, "rows": 0, "error_file": error_file, "error_rows": t.num_rows,
            "bytes": 0, "piece_rows": t.num_rows, "dim": 0, "t_read": 0.0, "t_preprocess": 0.0, "t_embed": 0.0,
            "t_write": 0.0, "node_id": C.current_node_id(), "shard_rows": "{}", "retries": 0}

