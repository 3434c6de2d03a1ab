"""Content hashes and the reuse lookup: a record whose input bytes were embedded before (same content
fingerprint) takes the stored vector instead of going to the model. Pure functions over Arrow tables;
Ray only schedules them (pipelines/embed/reuse.py).

``content_hash``: BLAKE2b-128 of the record's input as read: an image's file bytes, a text's UTF-8 (after
the reader's own handling: the JSON/Parquet value as read, no other normalisation). 16 bytes, in the
output and the error rows.

The lookup is a partitioned hash join: the snapshot's ``(content_hash, file, row)`` and the run's new
``(content_hash, key)`` are cut into ``P`` partitions by hash, each partition joined on its own (each side
read once, no row on the driver), and the hits (``key -> file, row``) regrouped per block of the run.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C

HASH_TYPE = pa.binary(16)


def content_hashes(payloads: pa.Array | pa.ChunkedArray) -> pa.Array:
    """BLAKE2b-128 of each payload (bytes, or a string's UTF-8); null where the payload is null."""
    out = []
    for v in payloads.to_pylist():
        if v is None:
            out.append(None)
        else:
            out.append(hashlib.blake2b(v.encode("utf-8") if isinstance(v, str) else v, digest_size=16).digest())
    return pa.array(out, HASH_TYPE)


def partition_of(hashes: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of each (non-null) hash: its first two bytes modulo ``partitions``."""
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    if not len(hashes):
        return np.zeros(0, np.int64)
    raw = np.frombuffer(hashes.buffers()[1], np.uint8)[hashes.offset * 16:(hashes.offset + len(hashes)) * 16]
    head = raw.reshape(-1, 16)[:, :2].astype(np.int64)
    return (head[:, 0] * 256 + head[:, 1]) % partitions


def split(table: pa.Table, partitions: int) -> list[pa.Table]:
    """``table`` (with a ``content_hash`` column; null hashes dropped) cut into ``partitions`` tables."""
    table = table.filter(pc.is_valid(table[C.CONTENT_HASH]))
    part = partition_of(table[C.CONTENT_HASH], partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    sorted_t = table.take(pa.array(order))
    return [sorted_t.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


def join(new: pa.Table, old: pa.Table) -> tuple[pa.Table, pa.Table, int]:
    """One partition of the lookup. ``new``: this run's rows (``content_hash``, ``key``, ``block``, ``piece``);
    ``old``: the snapshot's (``content_hash``, ``file``, ``row``).

    Returns the hits (each new row whose hash the snapshot holds, with the first stored row of it: ``key``,
    ``block``, ``file``, ``row``); the followers (among the other new rows, those whose content has its
    representative, the row with the lowest ``(block, key)``, in another block: ``key``, ``block``,
    ``_follow`` (the representative's key), ``_follow_piece``); and the number of new rows (not hits) whose
    content appeared earlier in the run (in-run duplicates, in the same block or not)."""
    firsts = old.group_by(C.CONTENT_HASH, use_threads=False).aggregate([("file", "first"), ("row", "first")]) \
        if old.num_rows else pa.table({C.CONTENT_HASH: pa.array([], HASH_TYPE), "file_first": pa.array([], pa.int32()),
                                        "row_first": pa.array([], pa.int64())})
    hits = new.join(firsts, C.CONTENT_HASH, join_type="inner", use_threads=False)
    hits = hits.select([C.KEY, "block", "file_first", "row_first"]).rename_columns([C.KEY, "block", "file", "row"])
    misses = new.filter(pc.invert(pc.is_in(new[C.CONTENT_HASH], value_set=firsts[C.CONTENT_HASH])))
    followers, dups = representatives(misses)
    return hits, followers, dups


def representatives(rows: pa.Table) -> tuple[pa.Table, int]:
    """Among ``rows`` (``content_hash``, ``key``, ``block``, ``piece``), the representative of each content (lowest
    ``block``, then ``key``); the rows whose representative sits in another block (they are held back, and copy
    its vector once it is written), and the number of rows that are not their content's representative."""
    empty = pa.table({C.KEY: pa.array([], pa.string()), "block": pa.array([], pa.int32()),
                      C.FOLLOW: pa.array([], pa.string()), C.FOLLOW_PIECE: pa.array([], pa.string())})
    if not rows.num_rows:
        return empty, 0
    rows = rows.sort_by([(C.CONTENT_HASH, "ascending"), ("block", "ascending"), (C.KEY, "ascending")])
    hashes = rows[C.CONTENT_HASH].combine_chunks()
    raw = np.frombuffer(hashes.buffers()[1], np.uint8)[hashes.offset * 16:(hashes.offset + len(hashes)) * 16]
    raw = raw.reshape(-1, 16)
    starts = np.ones(len(raw), bool)
    starts[1:] = np.any(raw[1:] != raw[:-1], axis=1)
    rep = np.maximum.accumulate(np.where(starts, np.arange(len(raw)), 0))  # each row's group's first row
    block = rows["block"].to_numpy()
    follows = np.flatnonzero(block != block[rep])
    if not len(follows):
        return empty, int((~starts).sum())
    idx, rep_idx = pa.array(follows), pa.array(rep[follows])
    return pa.table({C.KEY: rows[C.KEY].take(idx), "block": rows["block"].take(idx),
                     C.FOLLOW: rows[C.KEY].take(rep_idx), C.FOLLOW_PIECE: rows["piece"].take(rep_idx)}), int((~starts).sum())


def by_block(hits: pa.Table, blocks: int) -> list[pa.Table]:
    """One partition's hits (or followers) cut per block of the run."""
    block = hits["block"].to_numpy(zero_copy_only=False) if hits.num_rows else np.zeros(0, np.int64)
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(blocks + 1))
    sorted_t = hits.take(pa.array(order))
    return [sorted_t.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


def reuse_column(keys: pa.ChunkedArray | pa.Array, plan_keys: pa.Array, vectors: pa.Array) -> pa.Array:
    """The stored vector of each row whose key the plan lists (``vectors`` in the plan's order), else null."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    return vectors.take(pc.index_in(keys, value_set=plan_keys))
