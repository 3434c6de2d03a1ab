"""Heads, metrics and CORAL: pure functions, checked against numpy and scikit-learn."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from operators.errors import InputError
from operators.learn.coral import Moments, apply_transform, fit_coral
from operators.learn.heads import HeadSpec, build_head, features, load_head, save_head
from operators.learn.metrics import class_weights, confusion, scores


def test_scores_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    s = scores(confusion(y, p, 5))
    assert s["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert s["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    # confusion matrices of parts add up to the whole (what the workers all-reduce)
    assert (confusion(y[:100], p[:100], 5) + confusion(y[100:], p[100:], 5) == confusion(y, p, 5)).all()


def test_class_weights_are_balanced_like_sklearn() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 80 + [1] * 15 + [2] * 5)
    ours = class_weights(np.bincount(y))
    assert np.allclose(ours, compute_class_weight("balanced", classes=np.arange(3), y=y))


def test_head_roundtrip_with_safetensors(tmp_path: Path) -> None:
    spec = HeadSpec(kind="mlp", dim=8, labels=["cat", "dog", 3], hidden=16, dropout=0.1,
                    scaler={"mean": [0.0] * 8, "std": [2.0] * 8})
    head = build_head(spec)
    save_head(tmp_path / "h", head, spec, extra={"trained": {"best_epoch": 3}})
    loaded, spec2, meta = load_head(tmp_path / "h")
    x = torch.randn(4, 8)
    head.eval()
    assert torch.allclose(head(x), loaded(x)) and spec2.labels == ["cat", "dog", 3] and meta["trained"]["best_epoch"] == 3
    assert (tmp_path / "h" / "head.safetensors").exists()
    with pytest.raises(InputError, match="not a trained featx head"):
        load_head(tmp_path)
    with pytest.raises(InputError, match="unknown head"):
        build_head(HeadSpec(kind="transformer", dim=8, labels=[0, 1]))


def test_coral_gives_source_the_target_statistics() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6)) + 3.0
    tgt = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6)) - 1.0
    s, t = Moments.empty(6), Moments.empty(6)
    for chunk in np.array_split(src, 7):  # streamed in chunks: same moments as all at once
        s = s.add(chunk)
    t = t.add(tgt)
    assert np.allclose(s.mean_cov()[1], np.cov(src, rowvar=False))
    tr = fit_coral(s, t, eps=1e-6)
    mapped = apply_transform(src.astype(np.float32), tr)
    assert np.allclose(mapped.mean(0), tgt.mean(0), atol=1e-2)
    assert np.allclose(np.cov(mapped, rowvar=False), np.cov(tgt, rowvar=False), atol=5e-2 * np.abs(np.cov(tgt, rowvar=False)).max())


def test_features_apply_adaptation_only_in_training() -> None:
    spec = HeadSpec(kind="linear", dim=2, labels=[0, 1], scaler={"mean": [1.0, 1.0], "std": [2.0, 2.0]},
                    adaptation={"kind": "coral", "source_mean": [0.0, 0.0], "target_mean": [1.0, 1.0],
                                "matrix": [[1.0, 0.0], [0.0, 1.0]]})
    x = np.array([[3.0, 5.0]], np.float32)
    assert features(x, spec, train=False).tolist() == [[1.0, 2.0]]
    assert features(x, spec, train=True).tolist() == [[1.5, 2.5]]


def test_moments_merge_like_one_stream_and_give_the_scaler_its_variance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 5)) * 3 + 1
    a = Moments.empty(5).add(x[:200])
    b = Moments.empty(5).add(x[200:])
    whole = Moments.empty(5).add(x)
    merged = a.merge(b)
    assert merged.n == 500 and np.allclose(merged.ss, whole.ss) and np.allclose(merged.sq, whole.sq)
    mean, var = merged.mean_var()
    assert np.allclose(mean, x.mean(0)) and np.allclose(var, x.var(0))
    diag_only = Moments.empty(5, full=False).add(x)
    assert diag_only.ss is None and np.allclose(diag_only.mean_var()[1], x.var(0))
