"""The reuse lookup before the streaming pass: which records of this run's blocks have a content the
published snapshot already embedded (same content fingerprint), and where its vector is stored.

A partitioned hash join in plain Ray tasks (no row reaches the driver, which holds object refs and counts):

1. snapshot side, one task per group of data files: ``(content_hash, file, row)`` from the files'
   ``content_hash`` column only (16 bytes a row), cut into ``P`` partitions by hash;
2. run side, one task per 16 blocks of the streaming pass: the blocks' records read and hashed
   ``(content_hash, key, block, piece)``, cut the same way;
3. one join task per partition: the hits (each new record whose hash the snapshot holds, with the first
   stored row of it), cut per block; among the rest, each content's representative (lowest block, then key)
   and the followers, the rows of that content in other blocks; and the count of in-run duplicates;
4. one task per 16 blocks: their hits and followers from every partition, written as each block's plans
   (``_staging/<run>/reuse/<block>.parquet``: ``key``, ``file``, ``row``; ``<block>.follow.parquet``: ``key``,
   ``_follow``, ``_follow_piece``), read by the block's read task
   (:func:`operators.read.loading.stored_vectors`, :func:`operators.read.loading.held_rows`).

Followers go through the stream without preprocessing or the model; the sink stages them
(``_pending/``) and, after the stream and any isolation, the fill pass (:func:`fill_pieces`, tasks of 8
pieces) copies their representative's vector (or error) from this run's staged parts into one more part of
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
import pyarrow.compute as pc

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
BLOCKS_PER_TASK = 16  # blocks one run-side task reads, and one plan task writes (tasks, not blocks, cost)


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


def run_side(blocks: list[pa.Table], first: int, ropts: ReadOptions, partitions: int) -> Any:
    """``(content_hash, key, block, piece)`` of the records of ``blocks`` (numbered from ``first``), in
    ``partitions`` tables."""
    import json

    retries0 = retries_done()
    tables = []
    for index, block in enumerate(blocks, start=first):
        slices = block["slice"].to_pylist() if "slice" in block.column_names else [[0, 1]] * block.num_rows
        for piece, shards, sl in zip(block["piece"].to_pylist(), block["shards"].to_pylist(), slices):
            raw, _, _ = read_piece(json.loads(shards), ropts, *sl)
            tables.append(pa.table({C.CONTENT_HASH: content_hashes(raw[C.PAYLOAD]), C.KEY: raw[C.KEY],
                                    "block": pa.array([index] * raw.num_rows, pa.int32()),
                                    "piece": pa.array([piece] * raw.num_rows, pa.string())}))
    table = pa.concat_tables(tables) if tables else EMPTY_NEW.empty_table()
    return _parts(split(table, partitions), retries0)


def join_side(groups: int, n_old: int, *tables: pa.Table) -> tuple[Any, ...]:
    """One partition: its hits cut per group of blocks, its followers cut the same way, then the partition's
    figures."""
    old = pa.concat_tables(tables[:n_old]) if n_old else EMPTY_OLD.empty_table()
    new = pa.concat_tables(tables[n_old:]) if len(tables) > n_old else EMPTY_NEW.empty_table()
    hits, followers, dups = join_partition(new, old)
    return (*by_block(_group_of(hits), groups), *by_block(_group_of(followers), groups),
            {"hits": hits.num_rows, "held": followers.num_rows, "in_run_duplicates": dups})


def _group_of(table: pa.Table) -> pa.Table:
    """``table`` with its ``block`` numbers replaced by their group's (``BLOCKS_PER_TASK`` blocks a group), the
    block kept as ``_block``."""
    group = pc.divide(table["block"], pa.scalar(BLOCKS_PER_TASK, pa.int32()))
    return table.rename_columns([c if c != "block" else "_block" for c in table.column_names]).append_column("block", group)


def write_plans(prefix: str, first: int, count: int, files: list[str], so: dict[str, Any], parts: int,
                *tables: pa.Table) -> tuple[list[tuple[int, int]], int]:
    """The plan files of blocks ``first`` .. ``first + count - 1`` from their hits (the first ``parts`` tables,
    one per partition) and followers (the rest): per block, hits (``key``, ``file`` path, ``row``) at
    ``<block>.parquet`` and followers (``key``, ``_follow``, ``_follow_piece``) at ``<block>.follow.parquet``.
    Returns the rows of each written per block, and the storage retries needed."""
    retries0 = retries_done()
    hits = [t for t in tables[:parts] if t.num_rows]
    followers = [t for t in tables[parts:] if t.num_rows]
    h_all = by_block(_rebase(pa.concat_tables(hits), first), count) if hits else [None] * count
    f_all = by_block(_rebase(pa.concat_tables(followers), first), count) if followers else [None] * count
    written = []
    for i in range(count):
        n_hits = n_held = 0
        h, f = h_all[i], f_all[i]
        if h is not None and h.num_rows:
            paths = pa.array(files, pa.string()).take(h["file"])
            write_bytes(plan_uri(prefix, first + i), write_parquet_bytes(
                pa.table({C.KEY: h[C.KEY], "file": paths, "row": h["row"]})), so)
            n_hits = h.num_rows
        if f is not None and f.num_rows:
            write_bytes(plan_uri(prefix, first + i, follow=True),
                        write_parquet_bytes(f.select([C.KEY, C.FOLLOW, C.FOLLOW_PIECE])), so)
            n_held = f.num_rows
        written.append((n_hits, n_held))
    return written, retries_done() - retries0


def _rebase(table: pa.Table, first: int) -> pa.Table:
    """Back from group numbers to the block numbers within the group (0 = block ``first``)."""
    block = pc.subtract(table["_block"], pa.scalar(first, pa.int32()))
    return table.drop_columns(["block", "_block"]).append_column("block", block)


def plan_uri(prefix: str, block: int, follow: bool = False) -> str:
    return join(prefix, f"{block:06d}{'.follow' if follow else ''}.parquet")


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
    groups = -(-g // BLOCKS_PER_TASK)
    cpus = {"num_cpus": cfg.preprocess_num_cpus, "max_retries": cfg.max_task_retries}
    old_task = ray.remote(snapshot_side).options(num_returns=parts + 1, **cpus)
    new_task = ray.remote(run_side).options(num_returns=parts + 1, **cpus)
    join_task = ray.remote(join_side).options(num_returns=2 * groups + 1, **cpus)
    plan_task = ray.remote(write_plans).options(num_returns=2, num_cpus=0, max_retries=cfg.max_task_retries)

    old = [list(old_task.remote(cfg.output, files[i:i + FILES_PER_TASK], i, parts, so))
           for i in range(0, len(files), FILES_PER_TASK)]
    ropts = read_options(cfg)
    new = [list(new_task.remote(blocks[i:i + BLOCKS_PER_TASK], i, ropts, parts)) for i in range(0, g, BLOCKS_PER_TASK)]
    joined = [list(join_task.remote(groups, len(old), *[o[p] for o in old], *[n[p] for n in new])) for p in range(parts)]
    plans = [plan_task.remote(plan_prefix, k * BLOCKS_PER_TASK, min(BLOCKS_PER_TASK, g - k * BLOCKS_PER_TASK), files,
                              so, parts, *[j[k] for j in joined], *[j[groups + k] for j in joined])
             for k in range(groups)]
    written = [w for ws in ray.get([p[0] for p in plans]) for w in ws]
    stats = ray.get([j[2 * groups] for j in joined])
    retries = sum(ray.get([side[parts] for side in old + new])) + sum(ray.get([p[1] for p in plans]))
    planned = []
    for i, b in enumerate(blocks):
        if base_rows:
            b = b.append_column("plan", pa.array([plan_uri(plan_prefix, i) if written[i][0] else None] * b.num_rows,
                                                 pa.string()))
            b = b.append_column("reuse_dim", pa.array([int(base["dim"])] * b.num_rows, pa.int32()))
        planned.append(b.append_column("follow", pa.array(
            [plan_uri(plan_prefix, i, follow=True) if written[i][1] else None] * b.num_rows, pa.string())))
    return planned, {"partitions": parts, "snapshot_rows": base_rows, "snapshot_files": len(files),
                     "hits": sum(s["hits"] for s in stats), "held_for_fill": sum(s["held"] for s in stats),
                     "in_run_duplicates": sum(s["in_run_duplicates"] for s in stats),
                     "blocks_with_hits": sum(1 for w in written if w[0]), "storage_retries": retries,
                     "seconds": round(time.perf_counter() - t0, 3)}


PIECES_PER_FILL = 8  # pieces one fill task writes


def fill_group(items: list[tuple[str, list[str], dict[str, dict[str, list[str]]], int]],
               sink: SinkOptions) -> list[dict[str, Any]]:
    """:func:`operators.write.sink.fill_held` for each piece of ``items`` (one Ray task for several pieces)."""
    return [fill_held(pid, pending, sources, piece_rows, sink) for pid, pending, sources, piece_rows in items]


def fill_pieces(cfg: EmbedConfig, tracker: Any, sink: SinkOptions, pieces: list[str]) -> int:
    """The fill pass: each piece in ``pieces`` (every row back from the stream, some held back) gets one more
    part, its held rows with their representative's vector or error (:func:`operators.write.sink.fill_held`),
    in Ray tasks of a few pieces each; the tracker journals each piece. Returns the rows filled."""
    import ray

    failpoint("fill")  # kill tests: the stream is done, the pieces with held rows are not journalled yet
    task = ray.remote(fill_group).options(num_cpus=0, max_retries=cfg.max_task_retries)
    items = []
    for pid in pieces:
        parts = tracker.embed_parts[pid]
        pending = [p["pending_file"] for p in parts if p.get("pending_file")]
        reps = sorted({r for p in parts for r in json.loads(p.get("held_from") or "[]")})
        items.append((pid, pending, {rep: tracker.embedded_files(rep) for rep in reps}, int(parts[0]["piece_rows"])))
    refs = [task.remote(items[i:i + PIECES_PER_FILL], sink) for i in range(0, len(items), PIECES_PER_FILL)]
    filled = 0
    for rs in ray.get(refs):
        for r in rs:
            filled += r["rows"] + r["error_rows"]
            tracker.add_embedded(r)
    missing = [pid for pid in pieces if pid not in tracker.records]
    if missing:
        raise PipelineError(f"the fill pass left {len(missing)} pieces incomplete (e.g. {missing[0]}); "
                            "nothing was published. Rerun; if it repeats, rerun with reuse: none and report it.")
    return filled
