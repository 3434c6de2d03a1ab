"""The reuse lookup before the streaming pass: which records of this run's blocks have a content the
published snapshot already embedded (same content fingerprint), and where its vector is stored.

A partitioned hash join in plain Ray tasks (no row reaches the driver, which holds object refs and counts):

1. snapshot side, one task per group of data files: ``(content_hash, file, row)`` from the files'
   ``content_hash`` column only (16 bytes a row), cut into ``P`` partitions by hash;
2. run side, one task per block of the streaming pass: the block's records read and hashed
   ``(content_hash, key, block)``, cut the same way;
3. one join task per partition: the hits (each new record whose hash the snapshot holds, with the first
   stored row of it), cut per block; among the rest, each content's representative (lowest block, then key)
   and the followers, the rows of that content in other blocks; and the count of in-run duplicates;
4. one task per block: its hits and followers from every partition, written as the block's plans
   (``_staging/<run>/reuse/<block>.parquet``: ``key``, ``file``, ``row``; ``<block>.follow.parquet``: ``key``,
   ``_follow``, ``_follow_piece``), read by the block's read task
   (:func:`operators.read.loading.stored_vectors`, :func:`operators.read.loading.held_rows`).

Followers go through the stream without preprocessing or the model; the sink stages them
(``_pending/``) and, after the stream and any isolation, the fill pass (:func:`fill_pieces`, one task per
piece) copies their representative's vector (or error) from this run's staged parts into one more part of
their piece. A piece is journalled only once that part is in, so a run killed before the fill leaves
nothing half-done: the rerun embeds the piece again. Identical contents in one block are left to the
embedding actor (:func:`operators.embed.embedder.embed_distinct`). So every distinct content of a run
reaches the model once.

With no published snapshot to reuse from (a first run, a model change), the lookup still runs when the
run has more than one block, for the in-run part: it costs one more read of the records to embed
(reading is cheap beside embedding; ``reuse: none`` turns it off).

Work and memory per task: a partition holds ``snapshot rows / P`` entries (P grows with the table, about
250,000 entries each), so the lookup grows linearly with the snapshot's rows, spread over the cluster,
with each side read once; the driver's memory does not grow with the table (refs: P per task).
"""
from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from operators import columns as C
from operators.io.parquet import read_parquet, write_parquet_bytes
from operators.errors import PipelineError
from operators.faults import failpoint
from operators.io.storage import join, retries_done, write_bytes
from operators.read.content import by_block, content_hashes, split
from operators.read.content import join as join_partition
from operators.read.loading import read_piece
from operators.read.readers import ReadOptions
from operators.write.sink import SinkOptions, fill_held
from pipelines.config import EmbedConfig, read_options

ROWS_PER_PARTITION = 250_000
FILES_PER_TASK = 16
EMPTY_NEW = pa.schema([(C.CONTENT_HASH, pa.binary(16)), (C.KEY, pa.string()), ("block", pa.int32()),
                       ("piece", pa.string())])
EMPTY_OLD = pa.schema([(C.CONTENT_HASH, pa.binary(16)), ("file", pa.int32()), ("row", pa.int64())])


BLOCKS_PER_PARTITION = 64  # the run side: a block is a few MiB of input, some thousands of records


def partitions_for(snapshot_rows: int, blocks: int = 0) -> int:
    return max(1, min(1024, max(-(-snapshot_rows // ROWS_PER_PARTITION), -(-blocks // BLOCKS_PER_PARTITION))))


def _parts(tables: list[pa.Table], retries0: int) -> tuple[Any, ...]:
    """The partition tables and the storage retries the task needed (the run report counts them)."""
    return (*tables, retries_done() - retries0)


def snapshot_side(output: str, files: list[str], first: int, partitions: int, so: dict[str, Any]) -> Any:
    """``(content_hash, file, row)`` of ``files`` (numbered from ``first``), in ``partitions`` tables."""
    retries0 = retries_done()
    tables = []
    for i, f in enumerate(files):
        hashes = read_parquet(join(output, f), so, columns=[C.CONTENT_HASH])[C.CONTENT_HASH]
        n = len(hashes)
        tables.append(pa.table({C.CONTENT_HASH: hashes.cast(pa.binary(16)),
                                "file": pa.array([first + i] * n, pa.int32()), "row": pa.array(range(n), pa.int64())}))
    table = pa.concat_tables(tables) if tables else EMPTY_OLD.empty_table()
    return _parts(split(table, partitions), retries0)


def run_side(block: pa.Table, index: int, ropts: ReadOptions, partitions: int) -> Any:
    """``(content_hash, key, block)`` of a block's records, in ``partitions`` tables."""
    import json

    slices = block["slice"].to_pylist() if "slice" in block.column_names else [[0, 1]] * block.num_rows
    retries0 = retries_done()
    tables = []
    for piece, shards, sl in zip(block["piece"].to_pylist(), block["shards"].to_pylist(), slices):
        raw, _, _ = read_piece(json.loads(shards), ropts, *sl)
        tables.append(pa.table({C.CONTENT_HASH: content_hashes(raw[C.PAYLOAD]), C.KEY: raw[C.KEY],
                                "block": pa.array([index] * raw.num_rows, pa.int32()),
                                "piece": pa.array([piece] * raw.num_rows, pa.string())}))
    table = pa.concat_tables(tables) if tables else EMPTY_NEW.empty_table()
    return _parts(split(table, partitions), retries0)


def join_side(blocks: int, n_old: int, *tables: pa.Table) -> tuple[Any, ...]:
    """One partition: its hits cut per block, its followers cut per block, then the partition's figures."""
    old = pa.concat_tables(tables[:n_old]) if n_old else EMPTY_OLD.empty_table()
    new = pa.concat_tables(tables[n_old:]) if len(tables) > n_old else EMPTY_NEW.empty_table()
    hits, followers, dups = join_partition(new, old)
    return (*by_block(hits, blocks), *by_block(followers, blocks),
            {"hits": hits.num_rows, "held": followers.num_rows, "in_run_duplicates": dups})


def write_plan(uri: str, follow_uri: str, files: list[str], so: dict[str, Any], parts: int,
               *tables: pa.Table) -> tuple[int, int, int]:
    """A block's hits (the first ``parts`` tables) and followers (the rest) from every partition, as its plan
    files: hits (``key``, ``file`` path, ``row``) at ``uri``, followers (``key``, ``_follow``,
    ``_follow_piece``) at ``follow_uri``. Returns the rows of each written, and the storage retries needed."""
    retries0 = retries_done()
    hits = [t for t in tables[:parts] if t.num_rows]
    followers = [t for t in tables[parts:] if t.num_rows]
    n_hits = n_held = 0
    if hits:
        h = pa.concat_tables(hits)
        paths = pa.array(files, pa.string()).take(h["file"])
        plan = pa.table({C.KEY: h[C.KEY], "file": paths, "row": h["row"]})
        write_bytes(uri, write_parquet_bytes(plan), so)
        n_hits = plan.num_rows
    if followers:
        f = pa.concat_tables(followers).select([C.KEY, C.FOLLOW, C.FOLLOW_PIECE])
        write_bytes(follow_uri, write_parquet_bytes(f), so)
        n_held = f.num_rows
    return n_hits, n_held, retries_done() - retries0


def plan_reuse(cfg: EmbedConfig, blocks: list[pa.Table], base: dict[str, Any] | None,
               plan_prefix: str) -> tuple[list[pa.Table], dict[str, Any]]:
    """``blocks`` with their plan columns (``plan`` and ``reuse_dim`` when there is a snapshot to reuse from,
    ``follow``; each the block's plan file, or null when it has none), and the lookup's figures for the run
    report. ``base``: the published manifest with this run's content fingerprint, or None."""
    import ray

    t0 = time.perf_counter()
    so = dict(cfg.storage_options)
    base_rows = int(base["rows"]) if base else 0
    files = [f["path"] for f in base["files"]] if base_rows else []
    g = len(blocks)
    parts = partitions_for(base_rows, g)
    cpus = {"num_cpus": cfg.preprocess_num_cpus, "max_retries": cfg.max_task_retries}
    old_task = ray.remote(snapshot_side).options(num_returns=parts + 1, **cpus)
    new_task = ray.remote(run_side).options(num_returns=parts + 1, **cpus)
    join_task = ray.remote(join_side).options(num_returns=2 * g + 1, **cpus)
    plan_task = ray.remote(write_plan).options(num_returns=1, num_cpus=0, max_retries=cfg.max_task_retries)

    old = [list(old_task.remote(cfg.output, files[i:i + FILES_PER_TASK], i, parts, so))
           for i in range(0, len(files), FILES_PER_TASK)]
    ropts = read_options(cfg)
    new = [list(new_task.remote(b, i, ropts, parts)) for i, b in enumerate(blocks)]
    joined = [list(join_task.remote(g, len(old), *[o[p] for o in old], *[n[p] for n in new])) for p in range(parts)]
    uris = [join(plan_prefix, f"{i:06d}.parquet") for i in range(g)]
    follow_uris = [join(plan_prefix, f"{i:06d}.follow.parquet") for i in range(g)]
    written = ray.get([plan_task.remote(uris[i], follow_uris[i], files, so, parts,
                                        *[j[i] for j in joined], *[j[g + i] for j in joined]) for i in range(g)])
    stats = ray.get([j[2 * g] for j in joined])
    retries = sum(ray.get([side[parts] for side in old + new])) + sum(w[2] for w in written)
    planned = []
    for i, b in enumerate(blocks):
        if base_rows:
            b = b.append_column("plan", pa.array([uris[i] if written[i][0] else None] * b.num_rows, pa.string()))
            b = b.append_column("reuse_dim", pa.array([int(base["dim"])] * b.num_rows, pa.int32()))
        planned.append(b.append_column("follow", pa.array([follow_uris[i] if written[i][1] else None] * b.num_rows,
                                                          pa.string())))
    return planned, {"partitions": parts, "snapshot_rows": base_rows, "snapshot_files": len(files),
                     "hits": sum(s["hits"] for s in stats), "held_for_fill": sum(s["held"] for s in stats),
                     "in_run_duplicates": sum(s["in_run_duplicates"] for s in stats),
                     "blocks_with_hits": sum(1 for w in written if w[0]), "storage_retries": retries,
                     "seconds": round(time.perf_counter() - t0, 3)}


def fill_pieces(cfg: EmbedConfig, tracker: Any, sink: SinkOptions, pieces: list[str]) -> int:
    """The fill pass: each piece in ``pieces`` (every row back from the stream, some held back) gets one more
    part, its held rows with their representative's vector or error (:func:`operators.write.sink.fill_held`),
    one Ray task per piece; the tracker journals it. Returns the rows filled."""
    import ray

    failpoint("fill")  # kill tests: the stream is done, the pieces with held rows are not journalled yet
    task = ray.remote(fill_held).options(num_cpus=0, max_retries=cfg.max_task_retries)
    refs = []
    for pid in pieces:
        parts = tracker.embed_parts[pid]
        pending = [p["pending_file"] for p in parts if p.get("pending_file")]
        reps = sorted({r for p in parts for r in json.loads(p.get("held_from") or "[]")})
        sources = {rep: tracker.embedded_files(rep) for rep in reps}
        refs.append(task.remote(pid, pending, sources, int(parts[0]["piece_rows"]), sink))
    filled = 0
    for r in ray.get(refs):
        filled += r["rows"] + r["error_rows"]
        tracker.add_embedded(r)
    missing = [pid for pid in pieces if pid not in tracker.records]
    if missing:
        raise PipelineError(f"the fill pass left {len(missing)} pieces incomplete (e.g. {missing[0]}); "
                            "nothing was published. Rerun; if it repeats, rerun with reuse: none and report it.")
    return filled
