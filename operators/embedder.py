"""The embedding step: preprocessed rows -> vectors, with a frozen backbone.

:func:`embed_table` is the whole inner loop (batch -> forward -> Arrow) and
needs no Ray: GPU checks and benchmarks drive it directly. :class:`EmbedActor`
is the thin Ray Data callable class: it loads the model once per actor and
calls :func:`embed_table` on each block.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from operators import columns as C
from operators.backbones import Backbone
from operators.faults import ENV as FAULTS_ENV, crash_embed_once
from operators.registry import ImagePreprocess, ModelSpec, load


def length_buckets(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices in batches of similar length (sorted), so padding stays small."""
    order = np.argsort(lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def pad_ids(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id arrays to the longest in the batch -> (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def image_array(col: pa.ChunkedArray | pa.Array, crop: int) -> np.ndarray:
    """fixed_size_binary crops -> uint8 [N, crop, crop, 3], zero-copy where the column is one chunk."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    size = crop * crop * 3
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + len(arr)) * size)
    return data[arr.offset * size:].reshape(len(arr), crop, crop, 3)


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    """float32 [N, dim] (rows where ``valid`` is False are null) -> fixed_size_list<float32>[dim]."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def embed_table(bb: Backbone, table: pa.Table, batch_size: int, precision: str = "fp32") -> pa.Table:
    """Add the ``embedding`` column; rows already in error (or failing here) get null and keep their error."""
    t0 = time.perf_counter()
    n = table.num_rows
    ok = np.asarray(C.ok_mask(table).to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros((n, bb.dim), dtype=np.float32)
    stages, types, msgs = C.read_errors(table)
    rows = np.flatnonzero(ok)
    if len(rows):
        pre = bb.spec.preprocessing
        if isinstance(pre, ImagePreprocess):
            pixels = image_array(table[C.INPUT], pre.crop)
            batches = (rows[s:s + batch_size] for s in range(0, len(rows), batch_size))
            run = lambda idx: bb.embed_images(pixels[idx], precision)  # noqa: E731
        else:
            ids_col = table[C.INPUT].combine_chunks()
            offsets = ids_col.offsets.to_numpy()
            values = ids_col.values.to_numpy()
            lengths = (offsets[1:] - offsets[:-1])[rows]
            batches = (rows[b] for b in length_buckets(lengths, batch_size))

            def run(idx: np.ndarray) -> np.ndarray:
                ids, mask = pad_ids([values[offsets[i]:offsets[i + 1]] for i in idx])
                return bb.embed_tokens(ids, mask, precision)
        for idx in batches:
            try:
                out[idx] = run(idx)
            except Exception as e:  # a batch that fails is recorded, never dropped
                if "out of memory" in str(e).lower():
                    raise  # not the rows' fault: let Ray retry with the actor restarted
                for i in idx:
                    ok[i] = False
                    stages[i], types[i] = "embed", type(e).__name__
                    msgs[i] = f"forward pass failed for the batch holding {table[C.KEY][int(i)].as_py()!r}: {e}"[:2000]
    emb = vectors_to_arrow(out, ok, bb.dim)
    table = table.drop_columns([C.INPUT]).append_column(C.EMBEDDING, emb)
    table = C.write_errors(table, stages, types, msgs)
    return table.append_column(C.T_EMBED, pa.array(np.full(n, time.perf_counter() - t0)))


def pick_device(num_gpus: float) -> str:
    """CUDA when this actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES) and CUDA works; else CPU."""
    import torch

    if num_gpus > 0 and torch.cuda.is_available():
        return "cuda"
    if num_gpus > 0:
        logging.getLogger("featx").warning(
            "this embedding actor was given num_gpus=%s but CUDA is not available in it; running on CPU", num_gpus)
    return "cpu"


class EmbedActor:
    """Ray Data callable class: the model is loaded once per actor, in the actor."""

    def __init__(self, spec: ModelSpec, batch_size: int, precision: str, num_gpus: float, torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        device = pick_device(num_gpus)
        if precision == "fp16" and device != "cuda":
            raise RuntimeError("precision 'fp16' needs CUDA but this actor has no usable GPU; use fp32 or bf16")
        self.backbone = load(spec, device)
        self.batch_size = batch_size
        self.precision = precision
        self.node_id = C.current_node_id()  # recorded on each row: the run report says where embedding ran

    def __call__(self, table: pa.Table) -> pa.Table:
        if os.environ.get(FAULTS_ENV):  # kill tests only; one lookup otherwise
            crash_embed_once(table[C.KEY].to_pylist())
        return C.tag_node(embed_table(self.backbone, table, self.batch_size, self.precision), C.NODE_EMBED, self.node_id)
