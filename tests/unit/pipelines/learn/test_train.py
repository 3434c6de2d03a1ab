"""`featx train`'s reading: the pre-pass statistics and the training rows, from real Parquet files."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.learn.heads import HeadSpec
from pipelines.config import TrainConfig
from pipelines.learn.labels import Y
from pipelines.learn.train import merge_stats, read_rows, scan_stats

DIM = 4


def _files(tmp_path: Path) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, DIM)).astype(np.float32) + 2
    labels = [["cat", "dog", "eel"][i % 3] for i in range(60)]
    split = ["val" if i % 5 == 0 else "train" for i in range(60)]
    files = []
    for part in range(3):
        rows = slice(part * 20, (part + 1) * 20)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1)), DIM)
        t = pa.table({"key": [f"k{i}" for i in range(60)][rows], "embedding": emb, "label": labels[rows],
                      "split": split[rows]})
        pq.write_table(t, tmp_path / f"part-{part}.parquet")
        files.append(str(tmp_path / f"part-{part}.parquet"))
    return files, x, labels, split


def test_scan_stats_counts_and_moments_match_numpy(tmp_path: Path) -> None:
    files, x, labels, split = _files(tmp_path)
    cfg = TrainConfig(embeddings=str(tmp_path), output="o", split_column="split")
    # what the Ray tasks of the pre-pass return, merged as the driver merges them
    stats = merge_stats([scan_stats(files[:1], cfg, DIM, labelled=True, full_cov=True),
                    scan_stats(files[1:], cfg, DIM, labelled=True, full_cov=True)])
    train = np.array([s == "train" for s in split])
    assert stats["train_counts"] == Counter(lab for lab, t in zip(labels, train) if t)
    assert stats["val_counts"] == Counter(lab for lab, t in zip(labels, train) if not t)
    mean, var = stats["moments"].mean_var()
    assert np.allclose(mean, x[train].mean(0)) and np.allclose(var, x[train].var(0))
    assert np.allclose(stats["moments"].mean_cov()[1], np.cov(x[train], rowvar=False))
    unlabelled = scan_stats(files, cfg, DIM, labelled=False, full_cov=False)["moments"]
    assert unlabelled.n == 60 and unlabelled.ss is None
    assert np.allclose(unlabelled.mean_var()[1], x.var(0), atol=1e-5)
    with pytest.raises(ValueError, match="full covariance"):
        unlabelled.mean_cov()


def test_read_rows_encodes_labels_and_flags_the_split(tmp_path: Path) -> None:
    files, x, labels, split = _files(tmp_path)
    cfg = TrainConfig(embeddings=str(tmp_path), output="o", split_column="split")
    spec = HeadSpec(kind="linear", dim=DIM, labels=["cat", "dog", "eel"])
    rows = read_rows(files[0], spec, cfg)
    assert rows[Y].to_pylist() == [["cat", "dog", "eel"].index(lab) for lab in labels[:20]]
    assert rows["_val"].to_pylist() == [s == "val" for s in split[:20]]
    assert np.array_equal(np.array(rows["embedding"].to_pylist(), np.float32), x[:20])
