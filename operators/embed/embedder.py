"""The embedding step: preprocessed rows -> vectors, with a frozen backbone.

:func:`embed_table` is the whole inner loop (batch -> forward -> Arrow) and
needs no Ray: GPU checks and benchmarks drive it directly. :class:`EmbedActor`
is the thin Ray Data callable class: it loads the model once per actor and
calls :func:`embed_table` on each block.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.embed.autotune import BatchTuner, tune_limit
from operators.faults import ENV as FAULTS_ENV, actors_meet, crash_embed_once
from operators.models.backbones import Backbone
from operators.models.registry import load
from operators.models.specs import ImagePreprocess, ModelSpec
from operators.preprocess.transforms import preprocess_images


# oneDNN keeps one compiled primitive per distinct input shape and layer shape (1,024 by default); text
# batches come in many shapes (rows x longest), so a long-lived actor's memory grew with every new length
# until the cache filled. A small cache costs no speed (figures: benchmarks/README.md, scaling).
ONEDNN_CACHE = 16


def length_buckets(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None,
                   max_rows: int | None = None) -> Iterator[np.ndarray]:
    """Row indices in batches of similar length (sorted over the whole window), so padding stays small.

    Without ``max_tokens`` every batch has ``batch_size`` rows. With it, batches hold about the same number of
    *padded tokens* instead: as many rows as fit ``rows x longest <= max_tokens`` (at least one, at most
    ``max_rows``), so short texts travel in large batches and long ones in small batches. The model's cost
    is flat per padded token, so this keeps both padding and per-call overhead low, and memory bounded.
    """
    order = np.argsort(lengths, kind="stable")
    n = len(order)
    if max_tokens is None:
        for s in range(0, n, batch_size):
            yield order[s:s + batch_size]
        return
    cap = max(1, max_rows or n)
    widths = np.maximum(np.asarray(lengths)[order], 1)
    s = 0
    while s < n:
        lo, hi = s + 1, min(n, s + cap)  # the largest end e with (e - s) * widths[e - 1] <= max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - s) * int(widths[mid - 1]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        yield order[s:lo]
        s = lo


def pad_ids(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id arrays to the longest in the batch -> (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def gather_padded(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                  pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a list<int> column (flat ``values`` + ``offsets``) -> right-padded (ids, mask), int64.

    The same result as :func:`pad_ids` on the slices, in a few vectorised numpy calls (no loop per row).
    """
    starts = offsets[rows].astype(np.int64)
    lens = offsets[rows + 1].astype(np.int64) - starts
    width = int(lens.max()) if len(rows) else 0
    pos = np.arange(width, dtype=np.int64)
    mask = pos[None, :] < lens[:, None]
    if not len(values):
        return np.full(mask.shape, pad_id, dtype=np.int64), mask.astype(np.int64)
    ids = np.where(mask, values[np.where(mask, starts[:, None] + pos[None, :], 0)], pad_id).astype(np.int64)
    return ids, mask.astype(np.int64)


def token_budget(lengths: np.ndarray, batch_size: int) -> int:
    """Padded tokens per text batch: ``batch_size`` rows of this window's mean length (at least one long row)."""
    if not len(lengths):
        return batch_size
    return max(int(lengths.max()), int(round(batch_size * float(np.mean(lengths)))))


def token_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None,
                  batch_cost: float | None = None) -> Iterator[np.ndarray]:
    """featx's text batching: positions sorted by token count, cut where it costs least.

    A forward pass costs about one unit per padded token plus a fixed ``batch_cost`` per call (kernel
    launches, Python; default 1.5 x the window's mean length). The cut minimises ``padded tokens +
    batch_cost x batches`` exactly over segments that start and end on a change of length (a dynamic
    programme over the distinct lengths, at most ``max_length`` of them), under the limits of
    :func:`length_buckets`: at most ``max_tokens`` padded tokens (default :func:`token_budget`) and 8 x
    ``batch_size`` rows per batch. A segment over those limits is cut into near-equal batches. It pads
    less than a greedy fill (``benchmarks/embed_throughput.py``; figures in benchmarks/README.md).
    """
    lengths = np.asarray(lengths)
    if not len(lengths):
        return iter(())
    budget = max_tokens or token_budget(lengths, batch_size)
    cap = 8 * batch_size
    cost = float(batch_cost if batch_cost is not None else 1.5 * float(np.mean(lengths)))
    order = np.argsort(lengths, kind="stable")
    width, count = np.unique(np.maximum(lengths[order], 1).astype(np.int64), return_counts=True)
    ends = np.concatenate([[0], np.cumsum(count)])  # rows before each distinct length
    per_batch = np.minimum(cap, np.maximum(1, budget // width))  # rows a batch padded to each length may hold
    best = np.zeros(len(width) + 1)
    start = np.zeros(len(width) + 1, dtype=np.int64)
    for g in range(1, len(width) + 1):  # best[g]: all rows of the g shortest lengths batched
        rows = ends[g] - ends[:g]  # a segment from each earlier length change up to this one
        total = best[:g] + rows * width[g - 1] + np.ceil(rows / per_batch[g - 1]) * cost
        start[g] = int(np.argmin(total))
        best[g] = total[start[g]]
    segments, g = [], len(width)
    while g > 0:  # (first row, end row, rows per batch) of each segment, last first
        segments.append((int(ends[start[g]]), int(ends[g]), int(per_batch[g - 1])))
        g = int(start[g])
    return (part for a, b, k in reversed(segments) for part in np.array_split(order[a:b], -(-(b - a) // k)))


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


def distinct_rows(hashes: pa.Array | pa.ChunkedArray, todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Among the rows ``todo`` (indices), the first row of each content (null hashes are each their own), and
    for every row of ``todo`` the position in that first-row list of the row it copies."""
    values = hashes.to_pylist() if len(todo) else []
    first: dict[bytes, int] = {}
    reps: list[int] = []
    source = np.empty(len(todo), np.int64)
    for j, i in enumerate(todo):
        h = values[i]
        if h is None or h not in first:
            if h is not None:
                first[h] = len(reps)
            source[j] = len(reps)
            reps.append(int(i))
        else:
            source[j] = first[h]
    return np.asarray(reps, np.int64), source


def fixed_values(arr: pa.FixedSizeListArray, dim: int) -> np.ndarray:
    """[len, dim] float32 view of a fixed_size_list array's slots (null rows: whatever their slots hold)."""
    values = arr.values.to_numpy(zero_copy_only=False)
    return np.asarray(values[arr.offset * dim:(arr.offset + len(arr)) * dim], np.float32).reshape(len(arr), dim)


def embed_distinct(table: pa.Table, embed: Callable[[pa.Table], pa.Table], dim: int, dedupe: bool = True) -> pa.Table:
    """``embed`` run on the rows that need the model only: not the rows that carry a stored vector (``_reuse``,
    from the published snapshot: taken bit for bit), not the rows held back for a representative in another
    block (``_follow``: a zero placeholder, ``_how`` 3; the sink stages them for the fill pass) and, with
    ``dedupe``, not the second and later rows of the same ``content_hash`` (they copy the first one's vector,
    or its error). Every row comes back, in order,
    with ``embedding``, the error columns, ``_batch_size``, ``_t_embed`` and ``_how`` (how it got its vector).
    """
    n = table.num_rows
    reuse = table[C.REUSE].combine_chunks() if C.REUSE in table.column_names else None
    follow = table[C.FOLLOW].combine_chunks() if C.FOLLOW in table.column_names else None
    if reuse is None and follow is None and (not dedupe or C.CONTENT_HASH not in table.column_names):
        out = embed(table)
        return out.append_column(C.HOW, pa.array(np.full(n, C.HOW_EMBEDDED, np.int8)))
    t0 = time.perf_counter()
    ok = np.asarray(C.ok_mask(table).to_numpy(zero_copy_only=False), dtype=bool)

    def valid(col: pa.Array | None) -> np.ndarray:
        return ok & np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool) if col is not None else np.zeros(n, bool)

    reused = valid(reuse)
    held = valid(follow) & ~reused  # another block embeds this content: a zero placeholder, the fill pass copies
    todo = np.flatnonzero(ok & ~reused & ~held)
    if dedupe and C.CONTENT_HASH in table.column_names:
        reps, source = distinct_rows(table[C.CONTENT_HASH], todo)
    else:
        reps, source = todo, np.arange(len(todo))
    base = table.drop_columns([c for c in (C.REUSE,) if c in table.column_names])
    vectors = np.zeros((n, dim), np.float32)
    stages, types, msgs = C.read_errors(table)
    how = np.full(n, C.HOW_EMBEDDED, np.int8)
    batch = np.zeros(n, np.int32)
    if len(reps):
        sub = embed(base.take(pa.array(reps)))
        sub_ok = np.asarray(C.ok_mask(sub).to_numpy(zero_copy_only=False), dtype=bool)
        sub_vec = fixed_values(sub[C.EMBEDDING].combine_chunks(), dim)
        s_stages, s_types, s_msgs = C.read_errors(sub)
        s_batch = sub[C.BATCH].to_numpy() if C.BATCH in sub.column_names else np.zeros(len(reps), np.int32)
        for j, i in enumerate(todo):
            r = int(source[j])
            vectors[i] = sub_vec[r]
            ok[i] = bool(sub_ok[r])
            batch[i] = s_batch[r]
            if i != reps[r]:
                how[i] = C.HOW_DEDUPED
                if not sub_ok[r]:
                    key = table[C.KEY][int(reps[r])].as_py()
                    stages[i], types[i] = s_stages[r], s_types[r]
                    msgs[i] = f"the same content as {key!r}, which failed: {s_msgs[r]}"[:2000]
            else:
                stages[i], types[i], msgs[i] = s_stages[r], s_types[r], s_msgs[r]
    if reused.any():
        rows = np.flatnonzero(reused)
        vectors[rows] = fixed_values(reuse, dim)[rows]
        how[rows] = C.HOW_REUSED
    how[held] = C.HOW_HELD
    drop = [c for c in (C.INPUT, C.PAYLOAD) if c in base.column_names]
    out = base.drop_columns(drop).append_column(C.EMBEDDING, vectors_to_arrow(vectors, ok, dim))
    out = C.write_errors(out, stages, types, msgs)
    out = out.append_column(C.BATCH, pa.array(batch))
    out = out.append_column(C.T_EMBED, C.row_shares(time.perf_counter() - t0, n))
    return out.append_column(C.HOW, pa.array(how))


def embed_table(bb: Backbone, table: pa.Table, batch_size: int, precision: str = "fp32",
                max_tokens: int | None = None, pool: Streams | None = None,
                tuner: BatchTuner | None = None) -> pa.Table:
    """Add the ``embedding`` column; rows already in error (or failing here) get null and keep their error.

    Text rows are sorted by token count over the whole table and cut into batches of about ``max_tokens``
    padded tokens (default: ``batch_size`` rows of the table's mean length; at most 8 x ``batch_size`` rows);
    vectors go back to their rows, so the output keeps the input order. Image batches are zero-copy views of
    the Arrow crops where the rows are contiguous. Results stay on the device until the table is done (one
    copy back, no sync per batch on a GPU). A batch that runs out of GPU memory is split in halves and
    retried; a batch that fails otherwise marks its rows as errors.

    ``pool``: batches run side by side on its threads (CPU streams: see :class:`EmbedActor`); image rows
    are then cut into a multiple of the pool's width of near-equal batches, so no stream idles at the end.

    ``tuner``: the batch size comes from it (in place of ``batch_size``) and each batch's cost goes back to it
    (see :class:`operators.embed.autotune.BatchTuner`); the size used is recorded on every row (``_batch_size``).
    """
    t0 = time.perf_counter()
    batch_size = tuner.size if tuner is not None else batch_size
    ok = np.asarray(C.ok_mask(table).to_numpy(zero_copy_only=False), dtype=bool)
    stages, types, msgs = C.read_errors(table)
    rows = np.flatnonzero(ok)
    done: list[tuple[np.ndarray, Any]] = []  # (row indices, float32 vectors on the device)
    if len(rows):
        pre = bb.spec.preprocessing
        if isinstance(pre, ImagePreprocess):
            pixels = image_array(table[C.INPUT], pre.crop)
            batches: Iterator[np.ndarray] = iter(even_batches(rows, batch_size, _width(pool)))

            def run(idx: np.ndarray) -> Any:
                contiguous = int(idx[-1]) - int(idx[0]) + 1 == len(idx)
                return bb.image_vectors(pixels[idx[0]:idx[-1] + 1] if contiguous else pixels[idx], precision)

            def units(idx: np.ndarray) -> float:  # rows: an image batch's cost
                return float(len(idx))
        else:
            ids_col = table[C.INPUT].combine_chunks()
            offsets = ids_col.offsets.to_numpy()
            values = ids_col.values.to_numpy()  # unsliced; a sliced column's offsets index into it as they are
            widths = offsets[1:] - offsets[:-1]  # token count of every row
            lengths = widths[rows]
            batches = (rows[b] for b in token_batches(lengths, batch_size, max_tokens))

            def run(idx: np.ndarray) -> Any:
                return bb.token_vectors(*gather_padded(values, offsets, idx), precision)

            def units(idx: np.ndarray) -> float:  # padded tokens: a text batch's cost
                return float(len(idx) * int(widths[idx].max()))
        run = timed(run, tuner, batch_size, units, bb.device)
        for idx, result in run_batches(run, batches, pool):
            if not isinstance(result, Exception):
                done.extend(result)
                continue
            if _is_oom(result):
                raise result  # not the rows' fault: let Ray retry with the actor restarted
            for i in idx:  # a batch that fails is recorded, never dropped
                ok[i] = False
                stages[i], types[i] = "embed", type(result).__name__
                msgs[i] = f"forward pass failed for the batch holding {table[C.KEY][int(i)].as_py()!r}: {result}"[:2000]
    return _with_vectors(table, C.INPUT, done, ok, bb.dim, (stages, types, msgs), batch_size, t0)


def _with_vectors(table: pa.Table, consumed: str, done: list[tuple[np.ndarray, Any]], ok: np.ndarray, dim: int,
                  errors: tuple[list[Any], list[Any], list[Any]], batch_size: int, t0: float) -> pa.Table:
    """The output block: the ``consumed`` input column replaced by ``embedding`` (the device results
    scattered by row; null where ``ok`` is False), the errors, the batch size and the embedding time."""
    n = table.num_rows
    out = np.zeros((n, dim), dtype=np.float32)
    if done:
        _gather_vectors(done, out)
    table = table.drop_columns([consumed]).append_column(C.EMBEDDING, vectors_to_arrow(out, ok, dim))
    table = C.write_errors(table, *errors)
    table = table.append_column(C.BATCH, pa.array(np.full(n, batch_size, dtype=np.int32)))
    return table.append_column(C.T_EMBED, C.row_shares(time.perf_counter() - t0, n))


def timed(run: Callable[[np.ndarray], Any], tuner: BatchTuner | None, size: int,
          units: Callable[[np.ndarray], float], device: Any) -> Callable[[np.ndarray], Any]:
    """``run``, reporting each batch's cost to ``tuner`` while it still searches (on a GPU the batch is then
    synchronised, so its time is the forward pass's, not the launch's) and any out-of-memory at once."""
    if tuner is None:
        return run

    def one(idx: np.ndarray) -> Any:
        searching = not tuner.settled
        t = time.perf_counter()
        try:
            out = run(idx)
            if searching and device.type == "cuda":
                import torch

                torch.cuda.synchronize(device)
        except Exception as e:
            if _is_oom(e):
                tuner.out_of_memory(len(idx))
            raise
        if searching:
            tuner.observe(size, len(idx), units(idx), time.perf_counter() - t)
        return out
    return one


def embed_image_bytes(bb: Backbone, table: pa.Table, batch_size: int, precision: str = "fp32",
                      pool: Streams | None = None, torch_decode: bool | None = None,
                      tuner: BatchTuner | None = None) -> pa.Table:
    """Raw image bytes (the ``payload`` column) -> ``embedding``, decoding in the actor.

    On a GPU, :func:`operators.embed.decode.decode_images_torch` replaces the CPU preprocess task (nvJPEG on
    CUDA); on a CPU, :func:`operators.preprocess.transforms.preprocess_images` runs here instead of in a task
    (``torch_decode`` overrides the choice). Records that fail to decode become error rows with stage
    ``decode``.
    """
    import torch

    from operators.embed.decode import decode_images_torch

    pre = bb.spec.preprocessing
    assert isinstance(pre, ImagePreprocess), "embed_image_bytes is for image models"
    if not (bb.device.type == "cuda" if torch_decode is None else torch_decode):
        # a CPU actor decodes with the preprocess task's own function (the same crops, the same error rows):
        # one single-thread actor per core then decodes and embeds its rows with no crops in the object store
        t0 = time.perf_counter()
        table = preprocess_images(table, pre)
        if C.T_PRE in table.column_names:  # each row's share of the decode is its preprocessing time
            decode = C.row_shares(time.perf_counter() - t0, table.num_rows)
            table = table.set_column(table.schema.get_field_index(C.T_PRE), C.T_PRE, decode)
        return embed_table(bb, table, batch_size, precision, pool=pool, tuner=tuner)
    t0 = time.perf_counter()
    batch_size = tuner.size if tuner is not None else batch_size
    ok = np.asarray(C.ok_mask(table).to_numpy(zero_copy_only=False), dtype=bool)
    stages, types, msgs = C.read_errors(table)
    payloads = table[C.PAYLOAD]
    done: list[tuple[np.ndarray, Any]] = []
    rows = np.flatnonzero(ok)
    for s in range(0, len(rows), batch_size):
        idx = rows[s:s + batch_size]
        pixels, errors = decode_images_torch(payloads.take(pa.array(idx)).to_pylist(), pre, str(bb.device))
        good = np.array([e is None for e in errors], dtype=bool)
        for i, e in zip(idx[~good], (e for e in errors if e is not None)):
            ok[i] = False
            stages[i], types[i] = "decode", "DecodeError"
            msgs[i] = f"record {table[C.KEY][int(i)].as_py()!r} could not be decoded as an image: {e}"[:2000]
        if good.any():
            base = idx[good]
            x = pixels if good.all() else pixels[torch.as_tensor(np.flatnonzero(good), device=pixels.device)]
            # positions into x: the halves of an out-of-memory retry are contiguous slices
            forward = timed(lambda p: bb.image_vectors(x[p[0]:p[-1] + 1], precision),  # noqa: B023
                            tuner, batch_size, len, bb.device)
            for pos, vecs in _run_splitting(forward, np.arange(len(base))):
                done.append((base[pos], vecs))
    return _with_vectors(table, C.PAYLOAD, done, ok, bb.dim, (stages, types, msgs), batch_size, t0)


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


class Streams:
    """``width`` threads that run batches side by side (a CPU actor's streams; see :class:`EmbedActor`)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.executor = ThreadPoolExecutor(width, thread_name_prefix="featx-stream")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.executor.submit(fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def _width(pool: Streams | None) -> int:
    return pool.width if pool is not None else 1


def even_batches(rows: np.ndarray, batch_size: int, streams: int = 1) -> list[np.ndarray]:
    """``rows`` in batches of at most ``batch_size``, their count a multiple of ``streams`` (when there are
    rows enough) and their sizes within one row of each other: streams running side by side end together."""
    n = len(rows)
    if n == 0:
        return []
    count = -(-n // batch_size)
    count = min(n, -(-count // streams) * streams)
    return [b for b in np.array_split(rows, count) if len(b)]


def run_batches(run: Callable[[np.ndarray], Any], batches: Iterator[np.ndarray],
                pool: Streams | None = None) -> Iterator[tuple[np.ndarray, list[tuple[np.ndarray, Any]] | Exception]]:
    """(batch, its ``_run_splitting`` results or the exception it raised), one batch at a time or, with a
    ``pool``, side by side on its threads (at most two batches queued per thread: inputs are cut lazily)."""
    def one(idx: np.ndarray) -> list[tuple[np.ndarray, Any]] | Exception:
        try:
            return _run_splitting(run, idx)
        except Exception as e:
            return e

    if pool is None:
        for idx in batches:
            yield idx, one(idx)
        return
    window = 2 * _width(pool)
    pending: collections.deque[tuple[np.ndarray, Future]] = collections.deque()
    for idx in batches:
        pending.append((idx, pool.submit(one, idx)))
        if len(pending) >= window:
            first, fut = pending.popleft()
            yield first, fut.result()
    while pending:
        first, fut = pending.popleft()
        yield first, fut.result()


def _run_splitting(run: Callable[[np.ndarray], Any], idx: np.ndarray) -> list[tuple[np.ndarray, Any]]:
    """Run one batch; on out-of-memory, free the cache and run it again in halves (down to one row)."""
    try:
        return [(idx, run(idx))]
    except Exception as e:
        if not _is_oom(e) or len(idx) < 2:
            raise
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logging.getLogger("featx").warning("out of memory on a batch of %d rows; retrying it in halves", len(idx))
    half = len(idx) // 2
    return _run_splitting(run, idx[:half]) + _run_splitting(run, idx[half:])


def _gather_vectors(done: list[tuple[np.ndarray, Any]], out: np.ndarray) -> None:
    """Scatter device results into ``out`` by row, with one device->host copy for the whole table."""
    import torch

    idx = np.concatenate([i for i, _ in done])
    vecs = torch.cat([v for _, v in done]) if len(done) > 1 else done[0][1]
    out[idx] = vecs.cpu().numpy()


def make_tuner(batch_size: int, max_batch_size: int | None, device: Any) -> BatchTuner:
    """The actor's :class:`BatchTuner`: from ``batch_size`` up to :func:`operators.embed.autotune.tune_limit`; on a
    GPU it also watches the peak of the memory the allocator holds, against the device's total."""
    limit = tune_limit(batch_size, max_batch_size)
    if device.type != "cuda":
        return BatchTuner(batch_size, limit)
    import torch

    total = float(torch.cuda.get_device_properties(device).total_memory)
    return BatchTuner(batch_size, limit, base_memory=torch.cuda.memory_reserved(device) / total,
                      memory=lambda: torch.cuda.max_memory_reserved(device) / total,
                      reset_memory=lambda: torch.cuda.reset_peak_memory_stats(device))


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere). Text batches come in many sizes; glibc keeps the freed
    buffers of each in its heaps, so without a trim an actor holds its biggest block's peak for good."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


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
    """Ray Data callable class: the model is loaded once per actor, in the actor.

    ``torch_compile``: the forward runs through ``torch.compile`` (one stream then; see
    :meth:`operators.models.backbones.Backbone.compiled`). ``autotune``: the batch size comes from a
    :class:`operators.embed.autotune.BatchTuner` that lives as long as the actor.

    ``streams`` (CPU only): batches run side by side on that many threads, the actor's ``torch_threads``
    split among them. Two single-thread batches on a 2-core actor do not wait for each other at every
    operator as two threads of one batch do (nor stall together when anything else on the machine runs):
    the speed of two single-thread processes, with one model in memory and one start-up (figures in
    benchmarks/README.md).
    """

    def __init__(self, spec: ModelSpec, batch_size: int, precision: str, num_gpus: float, torch_threads: int,
                 decode_images: bool = False, streams: int = 1, autotune: bool = False,
                 max_batch_size: int | None = None, onednn_cache: int | None = ONEDNN_CACHE,
                 torch_compile: bool = False, dedupe: bool = True, task_timeout_s: float = 0.0,
                 board: str | None = None) -> None:
        if onednn_cache is not None:  # read by oneDNN at its first primitive: before the model's first forward
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(onednn_cache))
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        device = pick_device(num_gpus)
        # one stream with torch.compile: graphs compile on first use, never on two threads at once
        streams = streams if device == "cpu" and not torch_compile else 1
        torch.set_num_threads(max(1, torch_threads // streams))
        if precision == "fp16" and device != "cuda":
            raise RuntimeError("precision 'fp16' needs CUDA but this actor has no usable GPU; use fp32 or bf16")
        self.backbone = load(spec, device, for_inference=True)
        if torch_compile:
            self.backbone = self.backbone.compiled()
        self.batch_size = batch_size
        self.precision = precision
        self.pool = Streams(streams) if streams > 1 else None
        self.tuner = make_tuner(batch_size, max_batch_size, self.backbone.device) if autotune else None
        # raw image bytes arrive (image_decode: actors): decode on this actor's device (nvJPEG on a GPU)
        self.decode_images = decode_images and isinstance(spec.preprocessing, ImagePreprocess)
        self.node_id = C.current_node_id()  # recorded on each row: the run report says where embedding ran
        self.actor_id = C.current_actor_id()  # ... and how the rows spread over the actors
        self.ready_at = time.time()  # model loaded: the report's start-up timeline
        self._trim = malloc_trim()
        self.dedupe = dedupe  # identical contents in a block: embedded once (reuse: content)
        self.deadline = (task_timeout_s, board)  # a call still running past its deadline kills this actor

    def __call__(self, table: pa.Table) -> pa.Table:
        from operators.watchdog import Watchdog, block_label, outcome

        pieces = pc.unique(table[C.PIECE]).to_pylist() if C.PIECE in table.column_names and table.num_rows else []
        first = str(table[C.KEY][0]) if C.KEY in table.column_names and table.num_rows else ""
        # keyed by its first row too: a GPU actor gets a block in several windows, each its own entry
        with Watchdog("embed", self.deadline[0], block_label(pieces), self.deadline[1],
                      key=f"{block_label(pieces)}#{first}") as wd:
            wd.size(table.num_rows)
            out = self._call(table)
            wd.put_out(outcome(out, C.ERR_STAGE, C.HOW))
            return out

    def _call(self, table: pa.Table) -> pa.Table:
        if os.environ.get(FAULTS_ENV):  # kill tests only; one lookup otherwise
            crash_embed_once(table[C.KEY].to_pylist())
            actors_meet(self.actor_id)

        def embed(t: pa.Table) -> pa.Table:
            if self.decode_images and C.PAYLOAD in t.column_names:
                return embed_image_bytes(self.backbone, t, self.batch_size, self.precision, self.pool, tuner=self.tuner)
            return embed_table(self.backbone, t, self.batch_size, self.precision, pool=self.pool, tuner=self.tuner)

        out = embed_distinct(table, embed, self.backbone.dim, self.dedupe)
        out = C.tag_node(out, C.NODE_EMBED, self.node_id)
        out = C.tag_node(out, C.ACTOR, self.actor_id)
        out = C.stamp(C.stamp(out, C.TS_ACTOR_READY, self.ready_at), C.TS_EMBED, time.time())
        if self._trim is not None:  # hand the block's freed batch buffers back: the next block starts lean
            self._trim(0)
        return out
