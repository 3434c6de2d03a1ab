"""The training engine that train, finetune and tune share: early stopping, keep-best, checkpoints, reports.

The loop runs here as it runs in a Ray Tune trial (one process, no process group), on real heads and data;
``report`` is the engine's own interface (ray.train.report / ray.tune.report take the same arguments).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from operators.learn.heads import HeadSpec, build_head
from pipelines.config import TrainConfig
from pipelines.learn.engine import (CHECKPOINT_EVERY, EpochSums, best_epoch, epoch_line, epoch_loop, head_epoch,
                                    save_metrics)


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(embeddings="unused", output="unused", **kw)


class Reports:
    """Collects what the loop reports; reads each checkpoint while it exists."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.checkpoints: dict[int, dict[str, Any]] = {}

    def __call__(self, row: dict[str, Any], checkpoint: Any = None) -> None:
        self.rows.append(row)
        if checkpoint is not None:
            from safetensors.torch import load_file

            d = Path(checkpoint.path)
            self.checkpoints[row["epoch"]] = {
                "files": sorted(p.name for p in d.iterdir()),
                "confusion": json.loads((d / "confusion.json").read_text()),
                "weights": {p.stem: load_file(str(p)) for p in d.glob("*.safetensors")},
            }


def _scripted(accuracies: list[float]) -> Any:
    """Epochs whose validation accuracy is given: 100 rows of 2 classes, the right share on the diagonal."""
    def one_epoch(epoch: int) -> EpochSums:
        right = round(accuracies[epoch] * 100)
        cm = np.array([[right // 2, 50 - right // 2], [50 - (right - right // 2), right - right // 2]], float)
        return EpochSums(train_loss=10.0 * (epoch + 1), train_rows=10, val_loss=1.0, confusion=cm)

    return one_epoch


def test_patience_stops_early_and_the_checkpoint_holds_the_best_weights() -> None:
    reports, epoch_now = Reports(), [0]
    one_epoch = _scripted([0.5, 0.7, 0.7, 0.6, 0.9])

    def run(epoch: int) -> EpochSums:
        epoch_now[0] = epoch + 1
        return one_epoch(epoch)

    out = epoch_loop(_cfg(epochs=30, patience=2, metric="accuracy"), run, reports,
                     keep=lambda: {"head": {"epoch": torch.tensor([float(epoch_now[0])])}})
    assert [r["improved"] for r in reports.rows] == [True, True, False, False]
    assert [r["stopped_early"] for r in reports.rows] == [False, False, False, True]
    assert [r["best"] for r in reports.rows] == [0.5, 0.7, 0.7, 0.7]
    assert out["stopped_early"] and [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
    assert out["history"][0]["train_loss"] == 1.0 and out["history"][1]["val_loss"] == 0.01
    # one checkpoint, at the stop, of the best epoch's weights and confusion matrix (not the last epoch's)
    assert list(reports.checkpoints) == [4]
    ckpt = reports.checkpoints[4]
    assert ckpt["files"] == ["confusion.json", "head.safetensors"]
    assert ckpt["weights"]["head"]["epoch"].item() == 2.0
    assert np.trace(ckpt["confusion"]) == 70
    assert best_epoch(out["history"], "accuracy") == 1  # the index the checkpoint came from


def test_checkpoints_every_n_epochs_and_at_the_end_and_none_without_keep() -> None:
    epochs = CHECKPOINT_EVERY + 2
    rising = [0.5 + i / 100 for i in range(epochs)]
    reports = Reports()
    out = epoch_loop(_cfg(epochs=epochs, patience=3, metric="macro_f1"), _scripted(rising), reports,
                     keep=lambda: {"head": {"w": torch.zeros(1)}})
    assert list(reports.checkpoints) == [CHECKPOINT_EVERY, epochs]
    assert not out["stopped_early"] and all(r["improved"] for r in reports.rows)
    tune_like = Reports()  # a Tune trial keeps nothing: every epoch is reported, nothing is written
    epoch_loop(_cfg(epochs=epochs, patience=3), _scripted(rising), tune_like)
    assert len(tune_like.rows) == epochs and not tune_like.checkpoints


def test_loss_metric_lower_is_better() -> None:
    losses = iter([3.0, 2.0, 2.5, 1.0])

    def one_epoch(epoch: int) -> EpochSums:
        return EpochSums(train_loss=1.0, train_rows=1, val_loss=next(losses) * 4, confusion=np.eye(2) * 2)

    reports = Reports()
    out = epoch_loop(_cfg(epochs=4, patience=5, metric="loss"), one_epoch, reports)
    assert [r["improved"] for r in reports.rows] == [True, True, False, True]
    assert best_epoch(out["history"], "loss") == 3 and reports.rows[-1]["best"] == 1.0


def test_a_real_head_learns_through_the_engine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, 600)
    x = torch.from_numpy((centers[y] + rng.normal(size=(600, 8))).astype(np.float32))
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    spec = HeadSpec(kind="mlp", dim=8, labels=["a", "b", "c"], hidden=16)
    head = build_head(spec)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)

    def one_epoch(epoch: int) -> EpochSums:
        train = ((x[i:i + 64], yt[i:i + 64]) for i in range(0, 400, 64))
        return head_epoch(head, opt, None, spec.n_classes, train, [(x[400:], yt[400:])])

    reports = Reports()
    out = epoch_loop(_cfg(epochs=8, patience=8, metric="accuracy"), one_epoch, reports)
    hist = out["history"]
    assert hist[-1]["val_accuracy"] > 0.9 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert {"epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds"} <= set(hist[0])
    assert {"best", "improved", "stopped_early"} <= set(reports.rows[0])
    summary = {"history": hist, "best": hist[best_epoch(hist, "accuracy")]}
    save_metrics(tmp_path, summary, title="test")
    assert json.loads((tmp_path / "metrics.json").read_text())["best"]["epoch"] == summary["best"]["epoch"]
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "loss"])
def test_best_epoch_keeps_the_first_of_equals(metric: str) -> None:
    hist = [{"epoch": i + 1, "val_loss": v, "val_accuracy": v, "val_macro_f1": v} for i, v in enumerate([1.0, 1.0])]
    assert best_epoch(hist, metric) == 0


def test_an_epochs_progress_line_names_its_figures() -> None:
    row = {"epoch": 3, "train_loss": 0.41234, "val_loss": 0.4551, "val_accuracy": 0.87125, "val_macro_f1": 0.8,
           "seconds": 1.23, "improved": True}
    assert epoch_line(row, 50) == ("featx: epoch 3/50: train loss 0.4123 · val loss 0.4551 · val accuracy 0.871 · "
                                   "val macro f1 0.800 · 1.2 s (best so far)")
    assert epoch_line({**row, "improved": False}, 50).endswith("· 1.2 s")
