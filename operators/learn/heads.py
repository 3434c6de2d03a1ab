"""Task heads on embeddings (linear probe, MLP) and their safe save format.

Pure torch/numpy: no Ray. A saved head is a folder with ``head.safetensors`` (weights) and ``head.json``
(kind, dims, label map, the feature transform it expects, training summary), loadable anywhere.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from operators.errors import InputError

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


@dataclass
class HeadSpec:
    kind: str  # linear | mlp
    dim: int
    labels: list[Any]  # class index -> label value (str or int)
    hidden: int = 256
    dropout: float = 0.0
    scaler: dict[str, list[float]] = field(default_factory=dict)  # {"mean", "std"}: applied to every input
    adaptation: dict[str, Any] = field(default_factory=dict)  # CORAL map: applied to source features in training only
    model: dict[str, Any] = field(default_factory=dict)  # the embedding table's featx metadata (model, dim, ...)

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def build_head(spec: HeadSpec) -> torch.nn.Module:
    if spec.kind == "linear":
        return torch.nn.Sequential(torch.nn.Dropout(spec.dropout), torch.nn.Linear(spec.dim, spec.n_classes))
    if spec.kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(spec.dim, spec.hidden), torch.nn.GELU(), torch.nn.Dropout(spec.dropout),
            torch.nn.Linear(spec.hidden, spec.n_classes),
        )
    raise InputError(f"unknown head {spec.kind!r}; choose linear or mlp")


def save_head(folder: str | Path, module: torch.nn.Module, spec: HeadSpec, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(module).state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS))
    meta = asdict(spec)
    meta["adaptation"] = {k: v for k, v in spec.adaptation.items() if not k.startswith("_")}  # no cached arrays
    (folder / HEAD_CONFIG).write_text(json.dumps({**meta, **(extra or {})}, indent=1, default=str))
    return folder


def load_head(folder: str | Path) -> tuple[torch.nn.Module, HeadSpec, dict[str, Any]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_CONFIG).exists():
        raise InputError(f"{folder} is not a trained featx head (no {HEAD_CONFIG}); "
                         "point --model at a `featx train` output")
    meta = json.loads((folder / HEAD_CONFIG).read_text())
    names = {f for f in HeadSpec.__dataclass_fields__}
    spec = HeadSpec(**{k: v for k, v in meta.items() if k in names})
    module = build_head(spec)
    module.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return module.eval(), spec, meta


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, torch.nn.Module) else module


# ---- training steps shared by Ray Train workers, Tune trials and tests (no Ray here) ---------------

CONSTANT_VAR = 1e-12  # a feature whose variance is under this share of the mean variance is constant (float noise)
CONSTANT_STD = 1e30  # its scale: it becomes 0 for the head, where dividing by its own tiny std would make noise O(1)


def scaler_from_moments(mean: np.ndarray, var: np.ndarray) -> dict[str, list[float]]:
    """Standardisation from the training rows' moments. Constant features (some models' embeddings have
    dimensions that are 0 up to float noise, e.g. all-MiniLM-L6-v2's at 1e-33) are mapped to 0, not blown up:
    scikit-learn's StandardScaler alone would scale that noise to unit variance (drop them with
    VarianceThreshold there to compare)."""
    var = np.asarray(var, dtype=np.float64)
    const = var <= CONSTANT_VAR * max(float(var.mean()) if var.size else 0.0, 1e-300)
    std = np.where(const, CONSTANT_STD, np.sqrt(np.maximum(var, 1e-300)))
    return {"mean": np.asarray(mean, np.float64).tolist(), "std": std.tolist()}


def features(x: np.ndarray, spec: HeadSpec, train: bool) -> torch.Tensor:
    """Embeddings -> head input: the domain map (training on source features only), then the scaler."""
    from operators.learn.coral import apply_transform

    x = np.asarray(x, dtype=np.float32)
    if train and spec.adaptation:
        x = apply_transform(x, spec.adaptation)
    if spec.scaler:
        mean, std = _arrays(spec)
        x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _arrays(spec: HeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """The scaler as float32 arrays, converted once per spec (not per batch)."""
    cached = spec.__dict__.get("_scaler_arrays")
    if cached is None:
        cached = (np.asarray(spec.scaler["mean"], np.float32), np.asarray(spec.scaler["std"], np.float32))
        spec.__dict__["_scaler_arrays"] = cached
    return cached


def train_step(head: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               weights: torch.Tensor | None) -> float:
    head.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(head(x), y, weight=weights)
    loss.backward()
    opt.step()
    return float(loss.detach()) * len(y)


@torch.no_grad()
def eval_batch(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[np.ndarray, float]:
    """(confusion matrix, summed loss) of one batch: both add up across batches and workers."""
    from operators.learn.metrics import confusion

    head.eval()
    logits = head(x)
    loss = float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return confusion(y.numpy(), logits.argmax(1).numpy(), n_classes), loss


@torch.no_grad()
def predict_proba(head: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    head.eval()
    return torch.softmax(head(x), dim=1).numpy()
