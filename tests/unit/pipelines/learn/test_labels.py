"""Stable splits and label checks: the same split on every machine; data a classifier cannot use is refused."""
from __future__ import annotations

from collections import Counter

import pytest

from operators.errors import InputError
from pipelines.learn.labels import encode, is_val_by_column, is_val_by_hash, label_map


def test_hash_split_is_stable_and_sized() -> None:
    keys = [f"shard-{i // 10}.tar/{i}" for i in range(20000)]
    a = is_val_by_hash(keys, 0.2)
    assert (a == is_val_by_hash(list(reversed(keys)), 0.2)[::-1]).all()  # order does not matter
    assert abs(a.mean() - 0.2) < 0.01
    assert (a[:1000] == is_val_by_hash(keys[:1000], 0.2)).all()  # a growing table keeps each row's split
    assert not (a == is_val_by_hash(keys, 0.2, seed=1)).all()


def test_split_column_words() -> None:
    assert is_val_by_column(["train", "VAL", "validation", "test", "Training"], "split").tolist() == [False, True, True, True, False]
    with pytest.raises(InputError, match="split column 'split' holds 'holdout'"):
        is_val_by_column(["holdout"], "split")


def test_label_map_refuses_what_cannot_be_trained() -> None:
    assert label_map(Counter({"b": 3, "a": 2}), Counter({"a": 1}), "y") == ["a", "b"]
    assert label_map(Counter({2: 3, 10: 2}), Counter({2: 1}), "y") == [2, 10]
    with pytest.raises(InputError, match="needs at least 2"):
        label_map(Counter({"a": 5}), Counter({"a": 1}), "y")
    with pytest.raises(InputError, match=r"\['c'\] occur in the validation split but never in training"):
        label_map(Counter({"a": 5, "b": 1}), Counter({"c": 1}), "y")
    with pytest.raises(InputError, match="no value in label column 'y'"):
        label_map(Counter({"a": 5, None: 2}), Counter({"a": 1}), "y")
    with pytest.raises(InputError, match="validation split is empty"):
        label_map(Counter({"a": 5, "b": 1}), Counter(), "y")
    assert encode(["b", "a", "z"], ["a", "b"]).tolist() == [1, 0, -1]


def test_split_flags_by_column_or_hash_and_keep_split() -> None:
    import pyarrow as pa

    from pipelines.config import TrainConfig
    from pipelines.learn.labels import VAL, keep_split, split_flags

    keys = [f"k{i}" for i in range(200)]
    t = pa.table({"key": keys, "split": ["val" if i % 4 == 0 else "train" for i in range(200)], "x": range(200)})
    by_col = TrainConfig(embeddings="e", output="o", split_column="split")
    by_hash = TrainConfig(embeddings="e", output="o", val_fraction=0.3, seed=2)
    assert split_flags(t, by_col).tolist() == [i % 4 == 0 for i in range(200)]
    assert (split_flags(t, by_hash) == is_val_by_hash(keys, 0.3, seed=2)).all()
    flagged = t.append_column(VAL, pa.array(split_flags(t, by_col)))
    assert keep_split(flagged, True)["x"].to_pylist() == list(range(0, 200, 4))
    assert keep_split(flagged, False).num_rows == 150 and VAL not in keep_split(flagged, False).column_names
