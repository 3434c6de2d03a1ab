"""The linear probe as the convex problem it is: multinomial logistic regression with an L2 penalty, solved
full-batch by L-BFGS, data parallel, with the penalty chosen by k-fold cross-validation.

The objective is scikit-learn's ``LogisticRegression`` (lbfgs, multinomial) objective, scaled by the total
sample weight as scikit-learn scales it::

    F(W, b) = sum_i w_i * CE(W x_i + b, y_i) / sum_i w_i  +  ||W||^2 / (2 * C * sum_i w_i)

(the bias is not penalised; ``w_i`` is 1, or the class weight of ``y_i``; ``C`` the inverse strength). F is
strictly convex in W, so every correct solver reaches the same W: featx's head and scikit-learn's agree.

Data parallel: each worker holds its shard of the rows in memory (float32) and computes its part of the
loss and gradient sums; ``reduce`` sums them over the workers (an all-reduce in Ray Train), so every worker
sees the same F and gradient and takes the same L-BFGS step: the solution is the same as on one worker up to
float rounding. Pure torch/numpy, no Ray: ``reduce`` is the identity on one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: this module's constants load without it (pipelines.config)
    import torch

Reduce = Callable[[np.ndarray], np.ndarray]  # the sum of a float64 array over all workers
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 10))  # scikit-learn's LogisticRegressionCV(Cs=10) grid
CHUNK = 65536  # rows per matmul: float64 copies of a chunk stay small whatever the shard


def _identity(a: np.ndarray) -> np.ndarray:
    return a


@dataclass
class Shard:
    """One worker's rows: features (float32, already standardised), class indexes, per-row weights, CV folds."""

    x: torch.Tensor  # [n, d] float32
    y: torch.Tensor  # [n] int64
    weight: torch.Tensor  # [n] float64: class weight of each row (1 without class weighting)
    fold: np.ndarray  # [n] int: the row's cross-validation fold (by key hash); -1: not in the CV sample

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


def loss_grad(w: torch.Tensor, b: torch.Tensor, shard: Shard, row_weight: torch.Tensor
              ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """This shard's sums: ``sum_i rw_i * CE_i`` and its gradient in W [k, d] and b [k] (float64)."""
    import torch

    k, d = w.shape
    loss, gw, gb = 0.0, torch.zeros(k, d, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for s in range(0, shard.n, CHUNK):
        rw = row_weight[s:s + CHUNK]
        if not bool((rw > 0).any()):
            continue
        x = shard.x[s:s + CHUNK].to(torch.float64)
        y = shard.y[s:s + CHUNK]
        logits = x @ w.T + b
        lse = torch.logsumexp(logits, dim=1)
        loss += float((rw * (lse - logits.gather(1, y[:, None])[:, 0])).sum())
        g = torch.softmax(logits, dim=1)
        g[torch.arange(len(y)), y] -= 1.0
        g *= rw[:, None]
        gw += g.T @ x
        gb += g.sum(0)
    return loss, gw, gb


@dataclass
class Solution:
    w: np.ndarray  # [k, d]
    b: np.ndarray  # [k]
    c: float
    iterations: int
    evaluations: int
    grad_max: float  # max |gradient of F| at the solution
    converged: bool
    objective: float


def solve(shard: Shard, n_classes: int, c: float, row_weight: torch.Tensor | None = None, reduce: Reduce = _identity,
          init: tuple[np.ndarray, np.ndarray] | None = None, tol: float = 1e-6, max_iter: int = 1000) -> Solution:
    """Minimise F (module doc) over the rows with ``row_weight > 0`` (default: all rows, by their class weight).

    L-BFGS (scipy's L-BFGS-B, unbounded, 20 correction pairs, as scikit-learn's lbfgs solver) on float64
    parameters; every function evaluation all-reduces this worker's sums, so all workers see the same values
    and take the same steps. Converged when the largest gradient component of F is under ``tol``.
    ``init``: a warm start (W, b).
    """
    import torch
    from scipy.optimize import minimize

    rw = shard.weight if row_weight is None else row_weight
    d, k = int(shard.x.shape[1]), n_classes
    total = float(reduce(np.array([float(rw.sum())]))[0])
    if total <= 0:
        raise ValueError("no training rows with a positive weight")
    lam = 1.0 / (c * total)
    evals = [0]

    def f_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        evals[0] += 1
        w = torch.from_numpy(theta[:k * d].reshape(k, d))
        b = torch.from_numpy(theta[k * d:])
        loss, gw, gb = loss_grad(w, b, shard, rw)
        tot = reduce(np.concatenate([[loss], gw.numpy().ravel(), gb.numpy()]))
        f = tot[0] / total + 0.5 * lam * float(theta[:k * d] @ theta[:k * d])
        g = tot[1:] / total
        g[:k * d] += lam * theta[:k * d]
        return f, g

    theta0 = np.zeros(k * d + k) if init is None else np.concatenate([np.ravel(init[0]), np.ravel(init[1])])
    # scipy's BLAS threads would spin beside torch's between evaluations (each evaluation ran ~50x slower on
    # 2 cores): L-BFGS-B's own linear algebra is tiny, so its BLAS runs on one thread
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(f_and_grad, theta0.astype(np.float64), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "maxfun": max_iter * 2, "gtol": tol, "maxcor": 20,
                                "ftol": 64 * np.finfo(float).eps})
    grad_max = float(np.abs(res.jac).max())
    return Solution(w=res.x[:k * d].reshape(k, d).copy(), b=res.x[k * d:].copy(), c=c, iterations=int(res.nit),
                    evaluations=evals[0], grad_max=grad_max, converged=grad_max <= tol, objective=float(res.fun))


def fold_scores(sol: Solution, shard: Shard, mask: torch.Tensor, n_classes: int) -> np.ndarray:
    """(rows, correct, summed log-loss) of the rows in ``mask`` under ``sol``, as sums to all-reduce."""
    import torch

    if not bool(mask.any()):
        return np.zeros(3)
    w, b = torch.from_numpy(sol.w), torch.from_numpy(sol.b)
    idx = torch.nonzero(mask)[:, 0]
    rows = correct = ll = 0.0
    for s in range(0, len(idx), CHUNK):
        i = idx[s:s + CHUNK]
        logits = shard.x[i].to(torch.float64) @ w.T + b
        y = shard.y[i]
        rows += len(i)
        correct += float((logits.argmax(1) == y).sum())
        ll += float((torch.logsumexp(logits, 1) - logits.gather(1, y[:, None])[:, 0]).sum())
    return np.array([rows, correct, ll])


@dataclass
class CrossValidation:
    cs: list[float]
    folds: int
    accuracy: list[float]  # per C: the mean over the folds of the held-out accuracy
    log_loss: list[float]
    best_c: float  # the chosen C: the one-standard-error rule (:func:`one_standard_error`)
    rows: int  # rows in the CV sample
    iterations: list[int] = field(default_factory=list)  # L-BFGS iterations per C, summed over the folds
    converged: bool = True
    standard_error: float = 0.0  # over the folds, of the best mean accuracy
    top_c: float = 0.0  # the C of the best mean accuracy (LogisticRegressionCV's choice on these folds)
    start: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # mean fold solution at best_c

    def report(self) -> dict:
        """The CV's figures for metrics.json (without the warm start)."""
        return {k: v for k, v in self.__dict__.items() if k != "start"}


def cross_validate(shard: Shard, n_classes: int, folds: int, cs: tuple[float, ...] | list[float] = DEFAULT_CS,
                   reduce: Reduce = _identity, tol: float = 1e-6, max_iter: int = 1000) -> CrossValidation:
    """k-fold CV over the grid ``cs`` on the rows with ``fold >= 0``: per fold, the path from the strongest
    penalty to the weakest, each fit warm-started from the previous. Scored by held-out accuracy per fold
    (scikit-learn's LogisticRegressionCV criterion); the chosen C is the strongest penalty within one standard
    error of the best mean (:func:`one_standard_error`). The mean held-out log-loss is reported beside.

    The CV runs on the sample's rows only, copied out of the shard once: at a million rows with a 50,000-row
    sample every evaluation touches 50,000 rows, not a million. ``start`` is the mean of the folds' solutions at
    the chosen C: the final fit's warm start."""
    import torch

    cs = sorted(float(c) for c in cs)
    keep = np.flatnonzero(np.asarray(shard.fold) >= 0)
    if len(keep) < shard.n:
        idx = torch.from_numpy(keep)
        shard = Shard(shard.x[idx], shard.y[idx], shard.weight[idx], np.asarray(shard.fold)[keep])
    fold = torch.from_numpy(np.asarray(shard.fold))
    solutions: list[list[Solution]] = [[] for _ in cs]
    sums = np.zeros((folds, len(cs), 3))  # per fold and C: held-out rows, correct, summed log-loss
    iters = np.zeros(len(cs), dtype=int)
    converged = True
    for k in range(folds):
        train = (fold >= 0) & (fold != k)
        held = fold == k
        rw = torch.where(train, shard.weight, torch.zeros_like(shard.weight))
        init = None
        for j, c in enumerate(cs):
            sol = solve(shard, n_classes, c, rw, reduce, init, tol, max_iter)
            init = (sol.w, sol.b)
            solutions[j].append(sol)
            sums[k, j] = reduce(fold_scores(sol, shard, held, n_classes))
            iters[j] += sol.iterations
            converged = converged and sol.converged
    per_fold = sums[:, :, 1] / np.maximum(sums[:, :, 0], 1)  # [folds, Cs] held-out accuracy
    acc = per_fold.mean(0)  # the mean over the folds, as scikit-learn averages them
    ll = (sums[:, :, 2] / np.maximum(sums[:, :, 0], 1)).mean(0)
    best, se = one_standard_error(per_fold)
    start = (np.mean([s.w for s in solutions[best]], 0), np.mean([s.b for s in solutions[best]], 0))
    return CrossValidation(cs=cs, folds=folds, accuracy=acc.tolist(), log_loss=ll.tolist(), best_c=cs[best],
                           rows=int(reduce(np.array([float((fold >= 0).sum())]))[0]), iterations=iters.tolist(),
                           converged=converged, standard_error=se, top_c=cs[int(np.argmax(acc))], start=start)


def one_standard_error(per_fold: np.ndarray) -> tuple[int, float]:
    """The one-standard-error rule over a [folds, Cs] table of held-out accuracies (C ascending): the strongest
    penalty whose mean accuracy is within one standard error (over the folds) of the best mean. Returns its
    index and that standard error. Within that band the folds cannot tell the Cs apart; the weak end of the
    grid is where near-separable data leaves the solution to the solver's tolerance, so the choice stays
    where the problem is well posed (Breiman et al. 1984; glmnet's lambda.1se)."""
    per_fold = np.asarray(per_fold, dtype=np.float64)
    mean = per_fold.mean(0)
    top = int(np.argmax(mean))
    se = float(per_fold[:, top].std(ddof=1) / np.sqrt(per_fold.shape[0])) if per_fold.shape[0] > 1 else 0.0
    return int(np.flatnonzero(mean >= mean[top] - se - 1e-12)[0]), se


def fold_of(hashes: np.ndarray, folds: int, sample: float = 1.0) -> np.ndarray:
    """CV fold per row from a stable 64-bit key hash: ``hash % folds``; -1 for rows outside the CV sample
    (the top bits of the hash under ``sample``), so a very large table cross-validates on a fixed subset."""
    h = np.asarray(hashes, dtype=np.uint64)
    fold = (h % np.uint64(folds)).astype(np.int64)
    if sample < 1.0:
        fold[(h >> np.uint64(11)).astype(np.float64) / 2.0**53 >= sample] = -1
    return fold


def to_linear_state(sol: Solution) -> dict[str, torch.Tensor]:
    """The solution as the state dict of featx's linear head (``Sequential(Dropout, Linear)``)."""
    import torch

    return {"1.weight": torch.from_numpy(sol.w.astype(np.float32)),
            "1.bias": torch.from_numpy(sol.b.astype(np.float32))}
