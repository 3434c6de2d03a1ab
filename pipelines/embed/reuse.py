"""The reuse lookup before the streaming pass: which records of this run's blocks have a content the
published snapshot already embedded (same content fingerprint), and where its vector is stored.

A partitioned hash join in plain Ray tasks (no row reaches the driver, which holds object refs and counts):

1. snapshot side, one task per group of data files: ``(content_hash, file, row)`` from the files'
   ``content_hash`` column only (16 bytes a row), cut into ``P`` partitions by hash;
2. run side, one task per block of the streaming pass: the block's records read and hashed
   ``(content_hash, key, block)``, cut the same way;
3. one join task per partition: the hits (each new record whose hash the snapshot holds, with the first
   stored row of it), cut per block; and the count of in-run duplicates it sees;
4. one task per block: its hits from every partition, written as the block's plan
   (``_staging/<run>/reuse/<block>.parquet``: ``key``, ``file``, ``row``), read by the block's read task
   (:func:`operators.read.loading.stored_vectors`).

Work and memory per task: a partition holds ``snapshot rows / P`` entries (P grows with the table, about
250,000 entries each), so the lookup grows linearly with the snapshot's rows, spread over the cluster,
with each side read once; the driver's memory does not grow with the table (refs: P per task).
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from operators import columns as C
from operators.io.parquet import read_parquet, write_parquet_bytes
from operators.io.storage import join, write_bytes
from operators.read.content import by_block, content_hashes, split
from operators.read.content import join as join_partition
from operators.read.loading import read_piece
from operators.read.readers import ReadOptions
from pipelines.config import EmbedConfig, read_options

ROWS_PER_PARTITION = 250_000
FILES_PER_TASK = 16
EMPTY_NEW = pa.schema([(C.CONTENT_HASH, pa.binary(16)), (C.KEY, pa.string()), ("block", pa.int32())])
EMPTY_OLD = pa.schema([(C.CONTENT_HASH, pa.binary(16)), ("file", pa.int32()), ("row", pa.int64())])


def partitions_for(snapshot_rows: int) -> int:
    return max(1, min(1024, -(-snapshot_rows // ROWS_PER_PARTITION)))


def _parts(tables: list[pa.Table], partitions: int) -> Any:
    return tables[0] if partitions == 1 else tuple(tables)


def snapshot_side(output: str, files: list[str], first: int, partitions: int, so: dict[str, Any]) -> Any:
    """``(content_hash, file, row)`` of ``files`` (numbered from ``first``), in ``partitions`` tables."""
    tables = []
    for i, f in enumerate(files):
        hashes = read_parquet(join(output, f), so, columns=[C.CONTENT_HASH])[C.CONTENT_HASH]
        n = len(hashes)
        tables.append(pa.table({C.CONTENT_HASH: hashes.cast(pa.binary(16)),
                                "file": pa.array([first + i] * n, pa.int32()), "row": pa.array(range(n), pa.int64())}))
    table = pa.concat_tables(tables) if tables else EMPTY_OLD.empty_table()
    return _parts(split(table, partitions), partitions)


def run_side(block: pa.Table, index: int, ropts: ReadOptions, partitions: int) -> Any:
    """``(content_hash, key, block)`` of a block's records, in ``partitions`` tables."""
    import json

    slices = block["slice"].to_pylist() if "slice" in block.column_names else [[0, 1]] * block.num_rows
    tables = []
    for shards, sl in zip(block["shards"].to_pylist(), slices):
        raw, _, _ = read_piece(json.loads(shards), ropts, *sl)
        tables.append(pa.table({C.CONTENT_HASH: content_hashes(raw[C.PAYLOAD]), C.KEY: raw[C.KEY],
                                "block": pa.array([index] * raw.num_rows, pa.int32())}))
    table = pa.concat_tables(tables) if tables else EMPTY_NEW.empty_table()
    return _parts(split(table, partitions), partitions)


def join_side(blocks: int, n_old: int, *tables: pa.Table) -> tuple[Any, ...]:
    """One partition: its hits cut per block, then ``{"hits", "in_run_duplicates"}``."""
    old = pa.concat_tables(tables[:n_old]) if n_old else EMPTY_OLD.empty_table()
    new = pa.concat_tables(tables[n_old:]) if len(tables) > n_old else EMPTY_NEW.empty_table()
    hits, dups = join_partition(new, old)
    return (*by_block(hits, blocks), {"hits": hits.num_rows, "in_run_duplicates": dups})


def write_plan(uri: str, files: list[str], so: dict[str, Any], *tables: pa.Table) -> int:
    """A block's hits from every partition, as its plan file (``key``, ``file`` path, ``row``); rows written."""
    hits = pa.concat_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables) else None
    if hits is None:
        return 0
    paths = pa.array(files, pa.string()).take(hits["file"])
    plan = pa.table({C.KEY: hits[C.KEY], "file": paths, "row": hits["row"]})
    write_bytes(uri, write_parquet_bytes(plan), so)
    return plan.num_rows


def plan_reuse(cfg: EmbedConfig, blocks: list[pa.Table], base: dict[str, Any],
               plan_prefix: str) -> tuple[list[pa.Table], dict[str, Any]]:
    """``blocks`` with a ``plan`` column (the block's plan file, or null when none of its records is stored),
    and the lookup's figures for the run report."""
    import ray

    t0 = time.perf_counter()
    so = dict(cfg.storage_options)
    files = [f["path"] for f in base["files"]]
    parts = partitions_for(int(base["rows"]))
    g = len(blocks)
    cpus = {"num_cpus": cfg.preprocess_num_cpus, "max_retries": cfg.max_task_retries}
    old_task = ray.remote(snapshot_side).options(num_returns=parts, **cpus)
    new_task = ray.remote(run_side).options(num_returns=parts, **cpus)
    join_task = ray.remote(join_side).options(num_returns=g + 1, **cpus)
    plan_task = ray.remote(write_plan).options(num_cpus=0, max_retries=cfg.max_task_retries)

    def as_list(refs: Any) -> list[Any]:
        return [refs] if parts == 1 else list(refs)

    old = [as_list(old_task.remote(cfg.output, files[i:i + FILES_PER_TASK], i, parts, so))
           for i in range(0, len(files), FILES_PER_TASK)]
    ropts = read_options(cfg)
    new = [as_list(new_task.remote(b, i, ropts, parts)) for i, b in enumerate(blocks)]
    joined = []
    for p in range(parts):
        out = join_task.remote(g, len(old), *[o[p] for o in old], *[n[p] for n in new])
        joined.append([out] if g + 1 == 1 else list(out))
    uris = [join(plan_prefix, f"{i:06d}.parquet") for i in range(g)]
    written = ray.get([plan_task.remote(uris[i], files, so, *[j[i] for j in joined]) for i in range(g)])
    stats = ray.get([j[g] for j in joined])
    planned = [b.append_column("plan", pa.array([uris[i] if written[i] else None] * b.num_rows, pa.string()))
               .append_column("reuse_dim", pa.array([int(base["dim"])] * b.num_rows, pa.int32()))
               for i, b in enumerate(blocks)]
    return planned, {"partitions": parts, "snapshot_rows": int(base["rows"]), "snapshot_files": len(files),
                     "hits": sum(s["hits"] for s in stats),
                     "in_run_duplicates": sum(s["in_run_duplicates"] for s in stats),
                     "blocks_with_hits": sum(1 for w in written if w), "seconds": round(time.perf_counter() - t0, 3)}
