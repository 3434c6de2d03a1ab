"""The inner loop without Ray: batching, padding, order, nulls for error rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from operators import columns as C
from operators.embedder import embed_table, length_buckets, pad_ids
from operators.preprocess import preprocess_text
from operators.registry import ModelOptions, load, resolve


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
    n = len(texts)
    table = pa.table({C.KEY: [str(i) for i in range(n)], C.SOURCE: ["s"] * n, C.PAYLOAD: texts,
                      C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()),
                      C.ERR_MSG: pa.nulls(n, pa.string())})
    pre = preprocess_text(table, spec.preprocessing)
    batched = embed_table(bb, pre, batch_size=2)
    single = embed_table(bb, pre, batch_size=1)
    assert batched[C.EMBEDDING].type == pa.list_(pa.float32(), 32)
    assert batched[C.EMBEDDING].null_count == 1 and batched[C.EMBEDDING][2].as_py() is None
    a = np.array([v for v in batched[C.EMBEDDING].to_pylist() if v is not None])
    b = np.array([v for v in single[C.EMBEDDING].to_pylist() if v is not None])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert batched[C.KEY].to_pylist() == [str(i) for i in range(n)]  # order kept
    assert batched[C.ERR_TYPE].to_pylist()[2] == "EmptyText"
