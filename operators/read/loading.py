"""The read + preprocess stage: piece descriptors -> preprocessed rows tagged with their piece.

Ray pickles these functions by module, so a read task imports this module and what it imports: it stays
free of torch (reading, decoding and tokenizing need pyarrow, Pillow and tokenizers only; an
import-linter contract in pyproject.toml keeps it so). A read worker that imported torch would spend
time and memory on it before its first row.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.io.storage import retries_done
from operators.models.specs import ImagePreprocess, TextPreprocess
from operators.preprocess.transforms import preprocess_images, preprocess_text
from operators.read.content import content_hashes, reuse_column
from operators.read.readers import ReadOptions, read_shard


def prepare_rows(raw: pa.Table, piece: str, pre: ImagePreprocess | TextPreprocess | None, t_read: float,
                 piece_rows: int | None = None, shard_rows: dict[str, int] | None = None,
                 retries: int = 0, reuse: pa.Array | None = None, follow: pa.Table | None = None) -> pa.Table:
    """Preprocess read records and tag them with their piece (pure; runs in a Ray task or the isolator).

    ``pre=None`` leaves the records raw (``_payload``): the embedding actor decodes them itself.
    ``piece_rows``: records in the whole piece when ``raw`` is one slice of it (default: ``raw``'s rows).
    ``shard_rows``: records read per shard URI (the count the commit checks the published rows against).
    ``retries``: storage retries the read needed (reported).
    ``reuse``: per row, the stored vector of its content (float32) or null: those rows skip preprocessing
    (``_input`` null) and the actor takes the vector as it is (:func:`operators.embed.embedder.embed_distinct`).
    ``follow``: per row (``_follow``, ``_follow_piece``), the key and piece of the row in another block of this
    run with the same content, or nulls: those rows skip preprocessing and the model too (held back; the fill
    pass copies the representative's vector: pipelines/embed/reuse.py).
    Every row gets its ``content_hash`` (null when the record could not be read).
    """
    t1 = time.perf_counter()
    n = raw.num_rows
    total = n if piece_rows is None else piece_rows
    if C.CONTENT_HASH not in raw.column_names:
        raw = raw.append_column(C.CONTENT_HASH, content_hashes(raw[C.PAYLOAD]))
    extra = {}  # columns every row gets (a whole block agrees on its columns)
    if reuse is not None:
        extra[C.REUSE] = reuse
    if follow is not None:
        extra[C.FOLLOW], extra[C.FOLLOW_PIECE] = follow[C.FOLLOW], follow[C.FOLLOW_PIECE]
    skip = None  # rows that need no preprocessing: a stored vector, or held back for their representative
    for col in (C.REUSE, C.FOLLOW):
        if col in extra:
            valid = pc.is_valid(extra[col])
            skip = valid if skip is None else pc.or_(skip, valid)

    def with_extra(t: pa.Table, idx: pa.Array | None = None) -> pa.Table:
        for name, col in extra.items():
            t = t.append_column(name, col if idx is None else col.take(idx))
        return t

    if pre is None:
        table = with_extra(raw)
    elif skip is None or not pc.any(skip).as_py():
        table = with_extra(_preprocess(raw, pre))
    else:  # preprocess the others only; the skipped rows keep their order, with no input
        miss_idx = pc.indices_nonzero(pc.invert(skip))
        hit_idx = pc.indices_nonzero(skip)
        misses = with_extra(_preprocess(raw.take(miss_idx), pre), miss_idx)
        hits = raw.take(hit_idx).drop_columns([C.PAYLOAD])
        hits = with_extra(hits.append_column(C.INPUT, pa.nulls(hits.num_rows, input_type(pre))), hit_idx)
        table = pa.concat_tables([misses, hits.select(misses.column_names)])
        table = table.take(pc.sort_indices(pa.concat_arrays([miss_idx, hit_idx])))
    table = table.append_column(C.PIECE, pa.array([piece] * n, pa.string()))
    table = table.append_column(C.PIECE_ROWS, pa.array([total] * n, pa.int64()))
    table = C.constant(table, C.SHARD_ROWS, json.dumps(shard_rows or {}, sort_keys=True))
    table = table.append_column(C.RETRIES, C.first_row_count(n, retries))
    # stage times as each row's share: a block of several pieces (or a piece in several parts) sums right
    table = table.append_column(C.T_READ, C.row_shares(t_read, n))
    table = table.append_column(C.T_PRE, C.row_shares(time.perf_counter() - t1, n))
    return C.stamp(C.tag_node(table, C.NODE_PRE), C.TS_PRE, time.time())


def _preprocess(raw: pa.Table, pre: ImagePreprocess | TextPreprocess) -> pa.Table:
    return preprocess_images(raw, pre) if isinstance(pre, ImagePreprocess) else preprocess_text(raw, pre)


def input_type(pre: ImagePreprocess | TextPreprocess) -> pa.DataType:
    """The ``_input`` column's type after ``pre`` (HxWx3 uint8 crops, or token ids)."""
    return pa.binary(pre.crop * pre.crop * 3) if isinstance(pre, ImagePreprocess) else pa.list_(pa.int32())


def read_piece(piece_shards: list[dict[str, Any]], ropts: ReadOptions, part: int = 0,
               parts: int = 1) -> tuple[pa.Table, dict[str, int], int]:
    """The records of a piece's shards to embed (slice ``part`` of ``parts``), the records read per shard URI
    and the piece's record count."""
    tables = [read_shard(s["uri"], s["rel"], ropts, s.get("size")) for s in piece_shards]
    counts = {s["uri"]: t.num_rows for s, t in zip(piece_shards, tables)}
    raw = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    n = raw.num_rows
    if parts > 1:
        lo, hi = n * part // parts, n * (part + 1) // parts
        raw = raw.slice(lo, hi - lo)
    return raw, counts, n


def load_piece(piece_shards: list[dict[str, Any]], piece: str, ropts: ReadOptions,
               pre: ImagePreprocess | TextPreprocess | None, part: int = 0, parts: int = 1,
               stored: Any = None, held: Any = None, sized: Any = None) -> pa.Table:
    """Read + preprocess the shards of one piece that need embedding: all their records, or slice ``part``
    of ``parts`` equal row ranges (a big piece is read in slices so that several actors share it; each
    slice reads the shards and keeps its own rows: reading is cheap beside embedding). ``stored`` and
    ``held``: the block's reuse plan (:func:`stored_vectors`, :func:`held_rows`). ``sized``: told the rows read
    (a watchdog's deadline grows with them)."""
    t0 = time.perf_counter()
    retries0 = retries_done()
    raw, counts, n = read_piece(piece_shards, ropts, part, parts)
    if sized is not None:
        sized(raw.num_rows)
    reuse = follow = None
    if stored is not None or held is not None:
        raw = raw.append_column(C.CONTENT_HASH, content_hashes(raw[C.PAYLOAD]))
        reuse = stored(raw[C.KEY]) if stored is not None else None
        follow = held(raw[C.KEY]) if held is not None else None
    return prepare_rows(raw, piece, pre, time.perf_counter() - t0, piece_rows=n, shard_rows=counts,
                        retries=retries_done() - retries0, reuse=reuse, follow=follow)


def held_rows(follow_uri: str | None, storage_options: dict[str, Any]) -> Any:
    """From a block's follow plan (``key``, ``_follow``, ``_follow_piece``: rows whose content another block
    of this run embeds), a function from keys to a table of ``_follow`` and ``_follow_piece`` (nulls for the
    rows this block embeds)."""
    from operators.io.parquet import read_parquet

    plan = read_parquet(follow_uri, storage_options) if follow_uri else None

    def lookup(keys: pa.ChunkedArray | pa.Array) -> pa.Table:
        if plan is None or not plan.num_rows:
            return pa.table({C.FOLLOW: pa.nulls(len(keys), pa.string()), C.FOLLOW_PIECE: pa.nulls(len(keys), pa.string())})
        keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        at = pc.index_in(keys, value_set=plan[C.KEY].combine_chunks())
        return pa.table({C.FOLLOW: plan[C.FOLLOW].combine_chunks().take(at),
                         C.FOLLOW_PIECE: plan[C.FOLLOW_PIECE].combine_chunks().take(at)})
    return lookup


def stored_vectors(plan_uri: str | None, output: str, storage_options: dict[str, Any], dim: int) -> Any:
    """From a block's reuse plan (``key``, ``file``, ``row``: see pipelines/embed/reuse.py), a function from
    keys to the stored float32 vectors of the planned ones (null for the rest; all null without a plan: every
    block of a run with a lookup has the column, so blocks that Ray Data joins into one window agree). Each
    file is read once, its ``embedding`` column only."""
    from operators.io.parquet import read_parquet
    from operators.io.storage import join

    plan = read_parquet(plan_uri, storage_options) if plan_uri else None
    if plan is None or not plan.num_rows:
        return lambda keys: pa.nulls(len(keys), pa.list_(pa.float32(), dim))
    plan = plan.sort_by([("file", "ascending"), ("row", "ascending")])
    parts = []
    for f in pc.unique(plan["file"]).to_pylist():
        rows = plan.filter(pc.equal(plan["file"], f))["row"]
        emb = read_parquet(join(output, f), storage_options, columns=[C.EMBEDDING])[C.EMBEDDING].take(rows)
        dim = emb.type.list_size
        parts.append(emb.combine_chunks().cast(pa.list_(pa.float32(), dim)))
    vectors = pa.concat_arrays(parts)
    return lambda keys: reuse_column(keys, plan[C.KEY].combine_chunks(), vectors)


def load_pieces(batch: pa.Table, ropts: ReadOptions, pre: ImagePreprocess | TextPreprocess | None,
                output: str = "", storage_options: dict[str, Any] | None = None,
                deadline: tuple[float, str | None] | None = None) -> pa.Table:
    """map_batches function over piece descriptors (one row per piece, or per slice of a piece). With a reuse
    lookup (pipelines/embed/reuse.py) the block names its plans: ``plan`` (rows whose content the snapshot
    holds take the stored vector) and ``follow`` (rows whose content another block of the run embeds).
    ``deadline``: (``task_timeout_s``, the run's block board): a block still running past its deadline kills
    this worker (:mod:`operators.watchdog`)."""
    from operators.watchdog import Watchdog, block_label, outcome

    floor, board = deadline or (0.0, None)
    pieces = batch["piece"].to_pylist()
    slices = batch["slice"].to_pylist() if "slice" in batch.column_names else [[0, 1]] * batch.num_rows
    with Watchdog("read", floor, block_label(pieces, slices[0] if slices else None), board) as wd:
        so = storage_options or {}
        stored = held = None
        if "plan" in batch.column_names:  # this run looked its records up in the published snapshot
            stored = stored_vectors(batch["plan"][0].as_py(), output, so, batch["reuse_dim"][0].as_py())
        if "follow" in batch.column_names:  # ... and across the blocks of the run
            held = held_rows(batch["follow"][0].as_py(), so)
        shards = [json.loads(s) for s in batch["shards"].to_pylist()]
        out = [load_piece(sh, p, ropts, pre, *sl, stored=stored, held=held, sized=wd.size)
               for p, sh, sl in zip(pieces, shards, slices)]
        out = [t for t in out if t.num_rows] or out[:1]  # an empty slice adds nothing (and no schema clash)
        table = pa.concat_tables(out, promote_options="permissive") if len(out) > 1 else out[0]
        # the run's progress display: what this block put out, and its share of the input bytes
        wd.put_out({**outcome(table, C.ERR_STAGE), "bytes": sum(map(slice_bytes, shards, slices))})
        return table


def slice_bytes(piece_shards: list[dict[str, Any]], piece_slice: list[int]) -> int:
    """The input bytes a block item reads, as the progress display counts them: its shards' sizes, and of a
    piece read in ``[i, k]`` slices, a k-th of them."""
    return sum(int(s.get("size") or 0) for s in piece_shards) // max(1, piece_slice[1])
