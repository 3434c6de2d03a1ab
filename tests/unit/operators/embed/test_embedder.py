"""The inner loop without Ray: batching, padding, order, nulls for error rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from operators import columns as C
from operators.embed.embedder import (
    _run_splitting,
    embed_image_bytes,
    embed_table,
    even_batches,
    gather_padded,
    length_buckets,
    pad_ids,
    token_batches,
)
from operators.models.registry import ModelOptions, load, resolve
from operators.preprocess.transforms import preprocess_text


def _text_table(texts: list[str | None]) -> pa.Table:
    n = len(texts)
    return pa.table({C.KEY: [str(i) for i in range(n)], C.SOURCE: ["s"] * n, C.PAYLOAD: texts,
                     C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()),
                     C.ERR_MSG: pa.nulls(n, pa.string())})


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def test_length_buckets_cover_each_row_once_sorted() -> None:
    lengths = np.array([5, 1, 9, 3, 7, 2])
    batches = list(length_buckets(lengths, 4))
    assert [len(b) for b in batches] == [4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    assert lengths[batches[0]].max() <= lengths[batches[1]].min()


def test_pad_ids() -> None:
    ids, mask = pad_ids([np.array([1, 2, 3]), np.array([4])])
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_bucketed_batches_give_the_same_vectors_as_one_at_a_time(tiny_bert: str) -> None:
    spec = resolve(f"hf:{tiny_bert}", ModelOptions(pooling="mean"))
    bb = load(spec)
    texts = ["one", "a much longer sentence with many more words in it", None, "two words", "x y z w"]
    table = _text_table(texts)
    pre = preprocess_text(table, spec.preprocessing)
    batched = embed_table(bb, pre, batch_size=2)
    single = embed_table(bb, pre, batch_size=1)
    assert batched[C.EMBEDDING].type == pa.list_(pa.float32(), 32)
    assert batched[C.EMBEDDING].null_count == 1 and batched[C.EMBEDDING][2].as_py() is None
    a = np.array([v for v in batched[C.EMBEDDING].to_pylist() if v is not None])
    b = np.array([v for v in single[C.EMBEDDING].to_pylist() if v is not None])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert batched[C.KEY].to_pylist() == [str(i) for i in range(len(texts))]  # order kept
    assert batched[C.ERR_TYPE].to_pylist()[2] == "EmptyText"


def test_token_budget_buckets_cover_each_row_once_with_little_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 0.6, 5000).astype(int), 3, 128)  # skewed, like real sentences
    budget = 64 * int(lengths.mean())
    batches = list(length_buckets(lengths, 64, max_tokens=budget, max_rows=512))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row exactly once
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert 1 - lengths.sum() / padded < 0.02  # sorted over the window: under 2% padding
    assert all(len(b) * lengths[b].max() <= budget or len(b) == 1 for b in batches)
    assert max(len(b) for b in batches) > 64 > min(len(b) for b in batches)  # short rows batch wider
    assert max(len(b) for b in batches) <= 512
    one_long = list(length_buckets(np.array([500, 2, 3]), 2, max_tokens=10))
    assert [b.tolist() for b in one_long] == [[1, 2], [0]]  # a row longer than the budget goes alone


def test_token_batches_cost_less_than_a_greedy_fill_within_the_same_limits() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 7, 1430, 5000):
        lengths = np.clip(rng.lognormal(3.0, 0.6, n).astype(int), 1, 128)
        budget, cost = 64 * int(lengths.mean()), 1.5 * float(lengths.mean())
        batches = list(token_batches(lengths, 64, budget))
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))  # every row exactly once
        assert all(len(b) * lengths[b].max() <= budget or len(b) == 1 for b in batches)
        assert max(len(b) for b in batches) <= 8 * 64
        greedy = list(length_buckets(lengths, 64, max_tokens=budget, max_rows=8 * 64))

        def total(bs: list[np.ndarray], lengths: np.ndarray = lengths, cost: float = cost) -> float:
            return sum(len(b) * int(lengths[b].max()) for b in bs) + cost * len(bs)

        assert total(batches) <= total(greedy)
        if n == 1430:  # a Ray block's worth of rows: the greedy fill pads ~5%, the cut here ~1-2%
            padded = sum(len(b) * lengths[b].max() for b in batches)
            padded_greedy = sum(len(b) * lengths[b].max() for b in greedy)
            assert 1 - lengths.sum() / padded < 0.5 * (1 - lengths.sum() / padded_greedy)
    assert [b.tolist() for b in token_batches(np.array([500, 2, 3]), 2, 10)] == [[1, 2], [0]]
    assert list(token_batches(np.array([], dtype=int), 4)) == []


def test_gather_padded_matches_pad_ids_on_a_sliced_column() -> None:
    col = pa.array([[9, 9], [1, 2, 3], [4], [], [5, 6]], pa.list_(pa.int32())).slice(1)
    values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
    rows = np.array([3, 0, 1])
    ids, mask = gather_padded(values, offsets, rows)
    ref_ids, ref_mask = pad_ids([np.asarray(col[int(i)].as_py(), np.int64) for i in rows])
    assert ids.tolist() == ref_ids.tolist() and mask.tolist() == ref_mask.tolist()
    assert ids.dtype == np.int64 and mask.dtype == np.int64


def test_out_of_memory_batches_are_split_and_other_failures_are_not() -> None:
    seen: list[int] = []

    def run(idx: np.ndarray) -> np.ndarray:
        seen.append(len(idx))
        if len(idx) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return idx * 10

    parts = _run_splitting(run, np.arange(6))
    assert np.concatenate([i for i, _ in parts]).tolist() == list(range(6))
    assert np.concatenate([v for _, v in parts]).tolist() == [0, 10, 20, 30, 40, 50]
    assert seen[0] == 6 and max(seen[1:]) <= 3

    def broken(idx: np.ndarray) -> np.ndarray:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        _run_splitting(broken, np.arange(4))


def test_gpu_decode_option_matches_the_cpu_path_on_cpu() -> None:
    """embed_image_bytes (decode on the model's device) gives about the vectors of preprocess + embed_table."""
    import io

    from PIL import Image

    from operators.preprocess.transforms import preprocess_images
    from pipelines.demo.sample_data import crops

    spec = resolve("resnet18", ModelOptions(weights="random"))
    bb = load(spec)
    jpgs = crops("chelsea", 3, np.random.default_rng(0), size=300)
    png = io.BytesIO()
    Image.new("RGB", (300, 260), (200, 30, 30)).save(png, format="PNG")
    payloads = jpgs + [png.getvalue(), b"not an image"]
    n = len(payloads)
    table = pa.table({C.KEY: [f"k{i}" for i in range(n)], C.SOURCE: ["s"] * n, C.PAYLOAD: pa.array(payloads, pa.binary()),
                      C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()),
                      C.ERR_MSG: pa.nulls(n, pa.string())})
    gpu_path = embed_image_bytes(bb, table, batch_size=2, torch_decode=True)  # the GPU path's code, on the CPU
    cpu_path = embed_table(bb, preprocess_images(table, spec.preprocessing), batch_size=2)
    in_cpu_actor = embed_image_bytes(bb, table, batch_size=2)  # a CPU actor decodes as the read task would
    assert in_cpu_actor[C.ERR_STAGE].to_pylist() == cpu_path[C.ERR_STAGE].to_pylist()
    assert in_cpu_actor[C.EMBEDDING].to_pylist() == cpu_path[C.EMBEDDING].to_pylist()
    assert gpu_path[C.KEY].to_pylist() == cpu_path[C.KEY].to_pylist()
    assert gpu_path[C.ERR_STAGE].to_pylist() == [None, None, None, None, "decode"]
    a = np.array(gpu_path[C.EMBEDDING].to_pylist()[:4])
    b = np.array(cpu_path[C.EMBEDDING].to_pylist()[:4])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99, cos  # torch's antialiased resize, not Pillow's: close, not identical


@pytest.mark.parametrize("n,batch,streams", [(252, 32, 2), (7, 32, 2), (1, 4, 3), (100, 10, 4), (33, 8, 1)])
def test_even_batches_end_together(n: int, batch: int, streams: int) -> None:
    rows = np.arange(n) * 3
    batches = even_batches(rows, batch, streams)
    assert np.concatenate(batches).tolist() == rows.tolist()  # every row once, in order
    sizes = [len(b) for b in batches]
    assert max(sizes) <= batch and max(sizes) - min(sizes) <= 1
    assert len(batches) % streams == 0 or len(batches) == n  # a multiple of the streams, unless rows run out
    assert even_batches(np.arange(0), batch, streams) == []


def _image_table(n: int) -> pa.Table:
    from pipelines.demo.sample_data import crops

    payloads = crops("chelsea", n, np.random.default_rng(1), size=160)
    return pa.table({C.KEY: [f"k{i}" for i in range(n)], C.SOURCE: ["s"] * n, C.PAYLOAD: pa.array(payloads, pa.binary()),
                     C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()),
                     C.ERR_MSG: pa.nulls(n, pa.string())})


def test_streams_give_the_vectors_of_one_batch_at_a_time(tiny_bert: str) -> None:
    """Batches side by side on a pool (CPU streams) change nothing but the speed: same rows, same vectors."""
    from operators.embed.embedder import Streams
    from operators.preprocess.transforms import preprocess_images

    img = resolve("resnet18", ModelOptions(weights="random"))
    ibb = load(img, for_inference=True)
    images = preprocess_images(_image_table(11), img.preprocessing)
    txt = resolve(f"hf:{tiny_bert}", ModelOptions(pooling="mean"))
    tbb = load(txt)
    tokens = preprocess_text(_text_table([" ".join(WORDS[: 1 + i % 11]) for i in range(40)]), txt.preprocessing)
    pool = Streams(2)
    for bb, t, bs in ((ibb, images, 3), (tbb, tokens, 4)):
        one = embed_table(bb, t, bs)
        side_by_side = embed_table(bb, t, bs, pool=pool)
        assert side_by_side[C.KEY].to_pylist() == one[C.KEY].to_pylist()
        np.testing.assert_allclose(np.array(side_by_side[C.EMBEDDING].to_pylist()),
                                   np.array(one[C.EMBEDDING].to_pylist()), atol=1e-5)
    pool.shutdown()


def test_a_failing_batch_on_a_stream_marks_its_rows_and_the_others_embed() -> None:
    """A forward pass that fails on one stream records that batch's rows as errors; the rest are embedded."""
    import dataclasses

    import torch

    from operators.embed.embedder import Streams
    from operators.preprocess.transforms import preprocess_images

    spec = resolve("resnet18", ModelOptions(weights="random"))
    bb = load(spec, for_inference=True)
    real = bb.features

    def refuses_a_black_image(x: torch.Tensor) -> torch.Tensor:  # the real model, but one input it cannot take
        if bool((x.flatten(2).std(2).amax(1) == 0).any()):  # a flat (one-colour) image
            raise ValueError("blank input")
        return real(x)

    bb = dataclasses.replace(bb, features=refuses_a_black_image)
    table = _image_table(8)
    black = preprocess_images(table, spec.preprocessing)
    crops_col = black[C.INPUT].combine_chunks()
    size = spec.preprocessing.crop ** 2 * 3
    data = bytearray(crops_col.buffers()[1].to_pybytes())
    data[5 * size:6 * size] = bytes(size)  # row 5 is all black
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), len(crops_col), [None, pa.py_buffer(bytes(data))])
    black = black.set_column(black.schema.get_field_index(C.INPUT), C.INPUT, col)
    pool = Streams(2)
    out = embed_table(bb, black, 2, pool=pool)
    pool.shutdown()
    stages = out[C.ERR_STAGE].to_pylist()
    assert stages == [None] * 4 + ["embed", "embed"] + [None] * 2  # batch [4, 5] failed; order kept
    assert out[C.ERR_TYPE].to_pylist()[5] == "ValueError" and "'k4'" in out[C.ERR_MSG].to_pylist()[4]
    assert out[C.EMBEDDING].null_count == 2 and out.num_rows == 8


@pytest.mark.slow
def test_a_compiled_actor_runs_one_stream_and_gives_the_eager_vectors(tiny_bert: str) -> None:
    """torch_compile: the actor's forward goes through torch.compile (inductor, dynamic text shapes); the
    token buckets' many shapes give the eager model's vectors, and the actor runs a single stream."""
    from operators.embed.embedder import EmbedActor

    spec = resolve(f"hf:{tiny_bert}", ModelOptions(pooling="mean"))
    tokens = preprocess_text(_text_table([" ".join(WORDS[: 1 + i % 11]) for i in range(30)] + [None]),
                             spec.preprocessing)
    actor = EmbedActor(spec, 4, "fp32", 0.0, 2, streams=2, torch_compile=True)
    assert actor.pool is None and getattr(actor.backbone.features, "_torchdynamo_orig_callable", None) is not None
    compiled = actor(tokens)
    eager = embed_table(load(spec, for_inference=True), tokens, 4)
    assert compiled[C.KEY].to_pylist() == eager[C.KEY].to_pylist() and compiled[C.EMBEDDING].null_count == 1
    np.testing.assert_allclose(np.array(compiled[C.EMBEDDING].to_pylist()[:-1]),
                               np.array(eager[C.EMBEDDING].to_pylist()[:-1]), atol=1e-5)


def test_embed_distinct_embeds_each_content_once_and_takes_stored_vectors_bit_for_bit(tiny_bert: str) -> None:
    from operators.embed.embedder import embed_distinct
    from operators.read.content import content_hashes

    spec = resolve(f"hf:{tiny_bert}", ModelOptions(pooling="mean"))
    bb = load(spec)
    texts = ["same words", "other words", "same words", None, "stored one", "same words"]
    raw = _text_table(texts)
    raw = raw.append_column(C.CONTENT_HASH, content_hashes(raw[C.PAYLOAD]))
    table = preprocess_text(raw, spec.preprocessing)
    stored = np.arange(bb.dim, dtype=np.float32) / 7  # a vector the snapshot holds for row 4's content
    reuse = pa.FixedSizeListArray.from_arrays(pa.array(np.tile(stored, 6)), bb.dim,
                                              mask=pa.array([True, True, True, True, False, True]))
    calls: list[int] = []

    def embed(t: pa.Table) -> pa.Table:
        calls.append(t.num_rows)
        return embed_table(bb, t, 8)

    out = embed_distinct(table.append_column(C.REUSE, reuse), embed, bb.dim)
    assert calls == [2]  # "same words" once, "other words" once; the stored row and the null row not at all
    assert out[C.HOW].to_pylist() == [C.HOW_EMBEDDED, C.HOW_EMBEDDED, C.HOW_DEDUPED, C.HOW_EMBEDDED, C.HOW_REUSED,
                                      C.HOW_DEDUPED]
    vecs = out[C.EMBEDDING].to_pylist()
    assert np.array_equal(np.asarray(vecs[4], np.float32), stored)  # bit for bit
    ref = embed_table(bb, table, 8)[C.EMBEDDING].to_pylist()  # every row through the model, no reuse
    for i in (0, 1, 2, 5):
        np.testing.assert_allclose(vecs[i], ref[i], atol=1e-6)
    assert vecs[3] is None and out[C.ERR_STAGE][3].as_py() is not None  # the unreadable row keeps its error
