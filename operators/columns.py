"""Column names shared by the operators. Internal columns start with '_' and never reach the output."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

KEY = "key"
SOURCE = "source_uri"
EMBEDDING = "embedding"
CONTENT_HASH = "content_hash"  # BLAKE2b-128 of the record's input bytes as read (operators/read/content.py)

PAYLOAD = "_payload"  # raw record: image bytes (binary) or text (string)
INPUT = "_input"  # preprocessed: uint8 HxWx3 crop (fixed_size_binary) or token ids (list<int32>)
PIECE = "_piece"  # id of the piece (group of shards -> one output file) the row belongs to
PIECE_ROWS = "_piece_rows"  # how many records the piece's shards held when read (to know when all parts are in)
# JSON {shard uri: records read}: the read stage's own count per shard, the first of the three counts the
# commit checks (read = published + error rows); one dictionary-encoded value per block
SHARD_ROWS = "_shard_rows"
RETRIES = "_retries"  # storage retries the read stage needed (on the block's first row; the sink adds its own)
REUSE = "_reuse"  # the stored vector of a record whose content the published snapshot holds (float32), else null
HOW = "_how"  # how the row got its vector: 0 embedded, 1 reused from the snapshot, 2 copied from the same content
HOW_EMBEDDED, HOW_REUSED, HOW_DEDUPED = 0, 1, 2
# 3: held back: the same content sits in another block of this run (its representative, FOLLOW in piece
# FOLLOW_PIECE), which embeds it; the sink stages the row and the fill pass copies the vector afterwards
HOW_HELD = 3
FOLLOW = "_follow"  # the representative's key (another block of this run, same content_hash), else null
FOLLOW_PIECE = "_follow_piece"  # the representative's piece
ERR_STAGE = "_err_stage"  # read | decode | preprocess | embed; null when the row is fine
ERR_TYPE = "_err_type"
ERR_MSG = "_err_msg"
T_READ = "_t_read"  # this row's share of the seconds its stage took (read, preprocess, embed): sums add up
T_PRE = "_t_preprocess"
T_EMBED = "_t_embed"
NODE_PRE = "_node_preprocess"  # Ray node id where the row was read and preprocessed
NODE_EMBED = "_node_embed"  # Ray node id of the actor that embedded the row
BATCH = "_batch_size"  # the batch size the row's block ran at (autotuning changes it; the report counts rows per size)
ACTOR = "_actor"  # Ray actor id of the embedding actor (``local`` outside Ray): how work spread over the pool
# wall-clock times (time.time()) for the run report's start-up timeline: when this row's block was
# preprocessed / embedded, and when the actor that embedded it had finished loading its model
TS_PRE = "_ts_preprocessed"
TS_EMBED = "_ts_embedded"
TS_ACTOR_READY = "_ts_actor_ready"

ERROR_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(CONTENT_HASH, pa.binary(16)),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
    ]
)


def current_node_id() -> str:
    """The Ray node id of this process (``local-<host>`` outside Ray: the inner loop also runs standalone)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        pass
    return f"local-{os.uname().nodename}"


def current_actor_id() -> str:
    """The Ray actor id of this process, ``local`` outside a Ray actor."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_actor_id() or "local"
    except Exception:  # outside Ray
        pass
    return "local"


def constant(table: pa.Table, column: str, value: str) -> pa.Table:
    """One string value on every row, dictionary-encoded (it costs a few bytes per block)."""
    values = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)), pa.array([value], pa.string()))
    return table.append_column(column, values)


def tag_node(table: pa.Table, column: str, node_id: str | None = None) -> pa.Table:
    """Record where a stage ran: one node id per row."""
    return constant(table, column, node_id or current_node_id())


def first_row_count(n: int, count: int) -> pa.Array:
    """``count`` on the first of ``n`` rows, 0 on the rest (a block's count that sums right over any rows)."""
    values = np.zeros(n, np.int64)
    if n:
        values[0] = count
    return pa.array(values)


def node_counts(table: pa.Table, column: str) -> dict[str, int]:
    """Rows per node id in ``column`` (empty when the column is absent)."""
    if column not in table.column_names or not table.num_rows:
        return {}
    import pyarrow.compute as pc

    counts = pc.value_counts(table[column].cast(pa.string()))
    return {v["values"].as_py(): v["counts"].as_py() for v in counts}


def stamp(table: pa.Table, column: str, value: float) -> pa.Table:
    """One float64 value on every row (a block's timing, read back by the sink from its first row)."""
    return table.append_column(column, pa.array(np.full(table.num_rows, value, dtype=np.float64)))


def row_shares(seconds: float, n: int) -> pa.Array:
    """A stage's ``seconds`` spread evenly over its ``n`` rows (the T_* columns): the sums of any rows add up."""
    return pa.array(np.full(n, seconds / max(n, 1)))


def is_internal(name: str) -> bool:
    return name.startswith("_")


def ok_mask(table: pa.Table) -> pa.ChunkedArray:
    """True where the row has no error so far."""
    import pyarrow.compute as pc

    return pc.is_null(table[ERR_STAGE])


def read_errors(table: pa.Table) -> tuple[list[Any], list[Any], list[Any]]:
    """The error columns as Python lists (stage, type, message), for a step to fill in."""
    return table[ERR_STAGE].to_pylist(), table[ERR_TYPE].to_pylist(), table[ERR_MSG].to_pylist()


def write_errors(table: pa.Table, stages: list[Any], types: list[Any], msgs: list[Any]) -> pa.Table:
    """Put the (updated) error columns back in place."""
    idx = {n: i for i, n in enumerate(table.column_names)}
    for name, values in ((ERR_STAGE, stages), (ERR_TYPE, types), (ERR_MSG, msgs)):
        table = table.set_column(idx[name], name, pa.array(values, pa.string()))
    return table
