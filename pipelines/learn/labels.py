"""Labels and splits for training: a stable train/validation split by key hash, label maps, checks.

The split depends on the key alone (blake2b of the key, then a threshold), so it is the same on every
worker, every run and every machine, and a record never moves between splits when the table grows.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.errors import InputError
from pipelines.config import FinetuneConfig, TrainConfig

Y, VAL, HASH = "_y", "_val", "_h"  # internal columns of the training rows: class index, validation flag, key hash

TRAIN_WORDS = {"train", "training"}
VAL_WORDS = {"val", "valid", "validation", "dev", "test"}


def key_hashes(keys: Iterable[str], salt: str) -> np.ndarray:
    """A stable 64-bit hash per key (blake2b of salt + key): the same on every worker, run and machine (the
    validation split, CV folds)."""
    b = salt.encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(b + k.encode(), digest_size=8).digest(), "big") for k in keys),
                       dtype=np.uint64)


def is_val_by_hash(keys: Iterable[str], val_fraction: float, seed: int = 0) -> np.ndarray:
    """True for keys in the validation split: hash(seed, key) / 2^64 < val_fraction."""
    h = key_hashes(keys, str(seed))
    cut = int(val_fraction * 2**64)
    return h < np.uint64(cut) if cut < 2**64 else np.ones(len(h), dtype=bool)


def is_val_by_column(values: Iterable[Any], column: str) -> np.ndarray:
    out = []
    for v in values:
        s = str(v).strip().lower() if v is not None else ""
        if s in VAL_WORDS:
            out.append(True)
        elif s in TRAIN_WORDS:
            out.append(False)
        else:
            raise InputError(f"split column {column!r} holds {v!r}; use 'train' or 'val' (also: validation, test)")
    return np.array(out, dtype=bool)


def label_map(train_counts: Counter, val_counts: Counter, column: str, need_val: bool = True) -> list[Any]:
    """Sorted class labels; refuses data a classifier cannot be trained or judged on."""
    if None in train_counts or None in val_counts:
        n = train_counts.get(None, 0) + val_counts.get(None, 0)
        raise InputError(f"{n} rows have no value in label column {column!r}; fill them or drop those rows")
    labels = sorted(train_counts, key=lambda x: (str(type(x)), x))
    if len(labels) < 2:
        raise InputError(
            f"label column {column!r} has {len(labels)} class{'es' if len(labels) != 1 else ''} in the training split "
            f"({labels}); a classifier needs at least 2"
        )
    unseen = sorted(set(val_counts) - set(train_counts), key=str)
    if unseen:
        raise InputError(
            f"labels {unseen[:10]} occur in the validation split but never in training; add training examples of "
            "them, or change the split (val_fraction / split_column)"
        )
    missing = [lab for lab in labels if val_counts.get(lab, 0) == 0]
    if need_val and len(missing) == len(labels):
        raise InputError("the validation split is empty; lower val_fraction or check split_column")
    return labels


def encode(values: Iterable[Any], labels: list[Any]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    return np.fromiter((index.get(v, -1) for v in values), dtype=np.int64)


def split_flags(table: pa.Table, cfg: TrainConfig | FinetuneConfig) -> np.ndarray:
    """True for the rows of the validation split: by ``split_column`` when set, else by key hash."""
    if cfg.split_column:
        return is_val_by_column(table[cfg.split_column].to_pylist(), cfg.split_column)
    return is_val_by_hash(table[C.KEY].to_pylist(), cfg.val_fraction, cfg.seed)


def keep_split(batch: pa.Table, val: bool) -> pa.Table:
    """The rows of one split (by the VAL column), without that column."""
    return batch.filter(batch[VAL] if val else pc.invert(batch[VAL])).drop_columns([VAL])
