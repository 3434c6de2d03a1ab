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

from operators import columns as C
from operators.io.storage import retries_done
from operators.models.specs import ImagePreprocess, TextPreprocess
from operators.preprocess.transforms import preprocess_images, preprocess_text
from operators.read.readers import ReadOptions, read_shard


def prepare_rows(raw: pa.Table, piece: str, pre: ImagePreprocess | TextPreprocess | None, t_read: float,
                 piece_rows: int | None = None, shard_rows: dict[str, int] | None = None,
                 retries: int = 0) -> pa.Table:
    """Preprocess read records and tag them with their piece (pure; runs in a Ray task or the isolator).

    ``pre=None`` leaves the records raw (``_payload``): the embedding actor decodes them itself.
    ``piece_rows``: records in the whole piece when ``raw`` is one slice of it (default: ``raw``'s rows).
    ``shard_rows``: records read per shard URI (the count the commit checks the published rows against).
    ``retries``: storage retries the read needed (reported).
    """
    t1 = time.perf_counter()
    n = raw.num_rows
    total = n if piece_rows is None else piece_rows
    if pre is None:
        table = raw
    else:
        table = preprocess_images(raw, pre) if isinstance(pre, ImagePreprocess) else preprocess_text(raw, pre)
    table = table.append_column(C.PIECE, pa.array([piece] * n, pa.string()))
    table = table.append_column(C.PIECE_ROWS, pa.array([total] * n, pa.int64()))
    table = C.constant(table, C.SHARD_ROWS, json.dumps(shard_rows or {}, sort_keys=True))
    table = table.append_column(C.RETRIES, C.first_row_count(n, retries))
    # stage times as each row's share: a block of several pieces (or a piece in several parts) sums right
    table = table.append_column(C.T_READ, C.row_shares(t_read, n))
    table = table.append_column(C.T_PRE, C.row_shares(time.perf_counter() - t1, n))
    return C.stamp(C.tag_node(table, C.NODE_PRE), C.TS_PRE, time.time())


def load_piece(piece_shards: list[dict[str, Any]], piece: str, ropts: ReadOptions,
               pre: ImagePreprocess | TextPreprocess | None, part: int = 0, parts: int = 1) -> pa.Table:
    """Read + preprocess the shards of one piece that need embedding: all their records, or slice ``part``
    of ``parts`` equal row ranges (a big piece is read in slices so that several actors share it; each
    slice reads the shards and keeps its own rows: reading is cheap beside embedding)."""
    t0 = time.perf_counter()
    retries0 = retries_done()
    tables = [read_shard(s["uri"], s["rel"], ropts, s.get("size")) for s in piece_shards]
    counts = {s["uri"]: t.num_rows for s, t in zip(piece_shards, tables)}
    raw = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    n = raw.num_rows
    if parts > 1:
        lo, hi = n * part // parts, n * (part + 1) // parts
        raw = raw.slice(lo, hi - lo)
    return prepare_rows(raw, piece, pre, time.perf_counter() - t0, piece_rows=n, shard_rows=counts,
                        retries=retries_done() - retries0)


def load_pieces(batch: pa.Table, ropts: ReadOptions, pre: ImagePreprocess | TextPreprocess | None) -> pa.Table:
    """map_batches function over piece descriptors (one row per piece, or per slice of a piece)."""
    slices = batch["slice"].to_pylist() if "slice" in batch.column_names else [[0, 1]] * batch.num_rows
    out = [load_piece(json.loads(s), p, ropts, pre, *sl)
           for p, s, sl in zip(batch["piece"].to_pylist(), batch["shards"].to_pylist(), slices)]
    out = [t for t in out if t.num_rows] or out[:1]  # an empty slice adds nothing (and no schema clash)
    return pa.concat_tables(out, promote_options="permissive") if len(out) > 1 else out[0]
