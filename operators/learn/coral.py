"""Domain adaptation by CORAL (correlation alignment) on embeddings; streaming moments, bounded memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.errors import InputError


@dataclass
class Moments:
    """Streaming first and second moments of feature rows (float64), mergeable across chunks and workers.

    ``sq`` (per-feature sums of squares) is always kept, for the scaler; ``ss`` (the full x x^T, dim^2 floats)
    only when asked, for CORAL.
    """

    n: int
    s: np.ndarray  # sum of x
    sq: np.ndarray  # sum of x * x, per feature
    ss: np.ndarray | None = None  # sum of x x^T

    @classmethod
    def empty(cls, dim: int, full: bool = True) -> Moments:
        return cls(0, np.zeros(dim), np.zeros(dim), np.zeros((dim, dim)) if full else None)

    def add(self, x: np.ndarray) -> Moments:
        x = np.asarray(x, dtype=np.float64)
        ss = None if self.ss is None else self.ss + x.T @ x
        return Moments(self.n + len(x), self.s + x.sum(0), self.sq + (x * x).sum(0), ss)

    def merge(self, other: Moments) -> Moments:
        ss = None if self.ss is None or other.ss is None else self.ss + other.ss
        return Moments(self.n + other.n, self.s + other.s, self.sq + other.sq, ss)

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and (population) variance."""
        mean = self.s / max(self.n, 1)
        return mean, self.sq / max(self.n, 1) - mean**2

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.ss is None:
            raise ValueError("these moments were gathered without the full covariance; "
                             "gather them from Moments.empty(dim, full=True)")
        mean = self.s / max(self.n, 1)
        cov = (self.ss - self.n * np.outer(mean, mean)) / max(self.n - 1, 1)
        return mean, cov


def _sym_power(c: np.ndarray, p: float) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    vals = np.clip(vals, 1e-12, None)
    return (vecs * vals**p) @ vecs.T


def fit_coral(source: Moments, target: Moments, eps: float = 1.0) -> dict[str, Any]:
    """CORAL (Sun et al., 2016): a linear map that gives source features the target's mean and covariance.

    ``x -> (x - mu_s) @ Cs^-1/2 @ Ct^1/2 + mu_t`` with ``C + eps * I`` regularised (eps relative to the mean
    variance). The head is trained on mapped source features and then applied to raw target features.
    """
    ms, cs = source.mean_cov()
    mt, ct = target.mean_cov()
    d = len(ms)
    reg_s = eps * np.trace(cs) / d
    reg_t = eps * np.trace(ct) / d
    a = _sym_power(cs + reg_s * np.eye(d), -0.5) @ _sym_power(ct + reg_t * np.eye(d), 0.5)
    return {"kind": "coral", "source_mean": ms.tolist(), "target_mean": mt.tolist(), "matrix": a.tolist(), "eps": eps,
            "source_rows": source.n, "target_rows": target.n}


def apply_transform(x: np.ndarray, transform: dict[str, Any]) -> np.ndarray:
    if not transform:
        return x
    if transform["kind"] != "coral":
        raise InputError(f"unknown feature transform {transform['kind']!r}")
    cached = transform.get("_arrays")
    if cached is None:  # converted once per transform, not per batch
        cached = (np.asarray(transform["source_mean"], np.float32), np.asarray(transform["matrix"], np.float32),
                  np.asarray(transform["target_mean"], np.float32))
        transform["_arrays"] = cached
    ms, a, mt = cached
    return ((x - ms) @ a + mt).astype(np.float32)
