"""The linear probe's solver against scikit-learn: the same objective, so the same weights and the same CV choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from operators.learn.convex import Shard, cross_validate, fold_of, solve


def _data(n: int = 500, d: int = 24, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(n_samples=n, n_features=d, n_informative=12, n_classes=k, n_clusters_per_class=1,
                               class_sep=0.8, weights=[0.4, 0.3, 0.2, 0.1][:k], random_state=seed)
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32), y


def _shard(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None, folds: int = 5) -> Shard:
    w = np.ones(len(y)) if weight is None else weight
    return Shard(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(w.astype(np.float64)),
                 np.arange(len(y)) % folds)


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_solution_equals_sklearn_logistic_regression(c: float) -> None:
    x, y = _data()
    sol = solve(_shard(x, y), 4, c, tol=1e-7)
    # newton-cg: scikit-learn's lbfgs stops early at large C (at C=10 its gradient is still 0.05, featx's 1e-7),
    # so the reference is the second-order solver, which converges to the optimum; multinomial, the same objective
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=20000, solver="newton-cg").fit(x, y)
    assert sol.converged and sol.grad_max <= 1e-7
    np.testing.assert_allclose(sol.w, ref.coef_, atol=2e-4 * max(1.0, np.abs(ref.coef_).max()))
    # the multinomial intercepts are unpenalised, so they are defined up to a shared constant: compare them centred
    b, ref_b = sol.b - sol.b.mean(), ref.intercept_ - ref.intercept_.mean()
    np.testing.assert_allclose(b, ref_b, atol=2e-4 * max(1.0, np.abs(ref_b).max()))
    assert (np.argmax(x @ sol.w.T + sol.b, 1) == ref.predict(x)).mean() == 1.0


def test_class_weights_equal_sklearn_balanced() -> None:
    x, y = _data(seed=1)
    counts = np.bincount(y)
    cw = len(y) / (len(counts) * counts)  # scikit-learn's "balanced"
    sol = solve(_shard(x, y, cw[y]), 4, 1.0, tol=1e-7)
    ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=20000, solver="newton-cg").fit(x, y)
    np.testing.assert_allclose(sol.w, ref.coef_, atol=5e-4 * max(1.0, np.abs(ref.coef_).max()))


def test_cross_validation_picks_what_sklearn_picks_on_the_same_folds() -> None:
    x, y = _data(n=400, seed=2)
    cs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    shard = _shard(x, y, folds=4)
    cv = cross_validate(shard, 4, 4, cs, tol=1e-7)
    table = np.zeros((4, len(cs)))  # scikit-learn on the very folds featx used (fold = row index % 4)
    for j, c in enumerate(cs):
        for k in range(4):
            held = np.arange(len(y)) % 4 == k
            table[k, j] = (LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(x[~held], y[~held])
                           .predict(x[held]) == y[held]).mean()
    acc = table.mean(0)
    np.testing.assert_allclose(cv.accuracy, acc, atol=1.5 / len(y))  # at most one borderline row apart
    # the one-standard-error rule, written out: the strongest C within one SE (over the folds) of the best mean
    top = int(np.argmax(acc))
    se = table[:, top].std(ddof=1) / np.sqrt(4)
    assert cv.best_c == cs[int(np.flatnonzero(acc >= acc[top] - se)[0])] and cv.top_c == cs[top]
    assert cv.standard_error == pytest.approx(se, abs=1e-9) and cv.converged and cv.rows == len(y)


def test_fold_sample_keeps_a_stable_share() -> None:
    h = np.random.default_rng(0).integers(0, 2**63, size=100_000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    f = fold_of(h, 5, sample=0.1)
    assert abs((f >= 0).mean() - 0.1) < 0.01
    assert set(np.unique(f[f >= 0])) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(f, fold_of(h, 5, sample=0.1))  # the same rows every time
    assert (fold_of(h, 5)[f >= 0] == f[f >= 0]).all()  # sampling drops rows, never moves them between folds
