"""The training engine of `featx train`, `featx finetune` and `featx tune`: what every epoch and every run does.

A job gives the engine what differs (what a batch is, a step, an evaluation, the model's weights) and the
engine does the rest, the same for all three:

- ``run_epoch``: one worker's pass over its training batches (``step``), then its validation batches
  (``evaluate``), as sums that add up across workers (``EpochSums``); ``head_epoch`` for a head on embeddings.
- ``epoch_loop``: per epoch, all-reduce the sums (each worker then sees the same metrics and stops at the
  same epoch), the metrics, early stopping with patience, the best weights kept in memory and checkpointed
  every CHECKPOINT_EVERY epochs and at the end, and a report per epoch (``improved``, ``best``,
  ``stopped_early``). ``worker_epochs`` runs it inside a Ray Train worker.
- ``fit_on_ray``: the driver's TorchTrainer, its errors as featx errors, the best epoch and its checkpoint;
  ``save_metrics`` writes ``metrics.json`` and the plot ``metrics.png``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import numpy as np

from operators.errors import PipelineError
from operators.learn.heads import eval_batch, train_step
from operators.learn.metrics import scores
from pipelines.config import FinetuneConfig, TrainConfig

CHECKPOINT_EVERY = 10  # epochs between checkpoints of the best weights (and always at the end)
CONFUSION = "confusion.json"  # in a checkpoint, beside NAME.safetensors per kept state dict

Batch = TypeVar("Batch")
Schedule = TrainConfig | FinetuneConfig  # what the loop reads: epochs, metric, patience
States = dict[str, dict[str, Any]]  # name -> state dict, saved as NAME.safetensors


# ---- one epoch on one worker ---------------------------------------------------------------------

@dataclass
class EpochSums:
    """One worker's share of an epoch, as sums that add up across workers (so they all-reduce as one vector)."""

    train_loss: float  # summed over the training rows
    train_rows: int
    val_loss: float  # summed over the validation rows
    confusion: np.ndarray  # validation confusion matrix (rows: true, columns: predicted)
    extra: dict[str, Any] = field(default_factory=dict)  # reported as they are (fine-tuning: groups, learning rates)


def run_epoch(train: Iterable[Batch], step: Callable[[Batch], tuple[float, int]], val: Iterable[Batch],
              evaluate: Callable[[Batch], tuple[np.ndarray, float]], n_classes: int) -> EpochSums:
    """``step``: one optimizer step, returning (summed loss, rows); ``evaluate``: (confusion matrix, summed loss)."""
    loss_sum, rows = 0.0, 0
    for batch in train:
        loss, n = step(batch)
        loss_sum, rows = loss_sum + loss, rows + n
    cm, vloss = np.zeros((n_classes, n_classes)), 0.0
    for batch in val:
        c, v = evaluate(batch)
        cm, vloss = cm + c, vloss + v
    return EpochSums(loss_sum, rows, vloss, cm)


def head_epoch(head: Any, opt: Any, weights: Any, n_classes: int, train: Iterable[tuple[Any, Any]],
               val: Iterable[tuple[Any, Any]]) -> EpochSums:
    """An epoch of a head on embeddings; the batches are (features, class indexes) tensors."""
    return run_epoch(train, lambda xy: (train_step(head, opt, xy[0], xy[1], weights), len(xy[1])),
                     val, lambda xy: eval_batch(head, xy[0], xy[1], n_classes), n_classes)


# ---- the epoch loop --------------------------------------------------------------------------------

def all_reduce(arr: np.ndarray) -> np.ndarray:
    """The sum of ``arr`` over the workers of a torch process group (``arr`` itself outside one)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    dist.all_reduce(t)
    return t.numpy()


def epoch_metrics(epoch: int, sums: EpochSums, t0: float) -> tuple[dict[str, Any], np.ndarray]:
    """All workers' sums -> the epoch's metrics (the same on every worker) and its confusion matrix; ``t0``:
    when the epoch began (time.perf_counter)."""
    n = len(sums.confusion)
    tot = all_reduce(np.concatenate([[sums.train_loss, sums.train_rows, sums.val_loss], sums.confusion.reshape(-1)]))
    cm = tot[3:].reshape(n, n)
    metrics = {"epoch": epoch + 1, "train_loss": tot[0] / max(tot[1], 1), "val_loss": tot[2] / max(cm.sum(), 1),
               **{f"val_{k}": v for k, v in scores(cm).items()}, "seconds": time.perf_counter() - t0, **sums.extra}
    return metrics, cm


def metric_value(metrics: dict[str, Any], metric: str) -> float:
    return metrics["val_loss"] if metric == "loss" else metrics[f"val_{metric}"]


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best - 1e-9 if metric == "loss" else value > best + 1e-9


def best_epoch(history: list[dict[str, Any]], metric: str) -> int:
    """Index of the best epoch, by the rule the loop keeps weights by (the first of equals)."""
    best_i, best = 0, None
    for i, h in enumerate(history):
        if better(metric, metric_value(h, metric), best):
            best_i, best = i, metric_value(h, metric)
    return best_i


def _copy(states: States) -> States:
    return {name: {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()} for name, sd in states.items()}


def _write_checkpoint(folder: str, states: States, confusion: list[list[int]]) -> None:
    from safetensors.torch import save_file

    for name, sd in states.items():
        save_file(sd, os.path.join(folder, f"{name}.safetensors"))
    Path(folder, CONFUSION).write_text(json.dumps(confusion))


def epoch_loop(cfg: Schedule, one_epoch: Callable[[int], EpochSums], report: Callable[..., None],
               keep: Callable[[], States] | None = None, last: bool = False) -> dict[str, Any]:
    """Epochs until ``cfg.epochs``, or until ``cfg.patience`` epochs in a row bring no better ``cfg.metric``.

    ``report(row)`` or ``report(row, checkpoint=...)`` every epoch (ray.train.report, ray.tune.report);
    ``keep``: the weights to keep when an epoch improves (None: keep nothing, write no checkpoints).
    ``last``: a refit for a fixed number of epochs: keep the last epoch's weights, never stop early (its
    validation rows were trained on, so they cannot choose).
    Returns ``{"history": [metrics per epoch], "stopped_early": bool}``.
    """
    history: list[dict[str, Any]] = []
    best: float | None = None
    stale = 0
    kept: States = {}
    kept_cm: list[list[int]] = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        sums = one_epoch(epoch)
        metrics, cm = epoch_metrics(epoch, sums, t0)
        history.append(metrics)
        value = metric_value(metrics, cfg.metric)
        improved = better(cfg.metric, value, best)
        best, stale = (value, 0) if improved else (best, stale + 1)
        stop = stale >= cfg.patience and not last
        if (improved or last) and keep is not None:  # the best (or, refitting, the latest) weights, in memory
            kept, kept_cm = _copy(keep()), cm.astype(int).tolist()
        row = {**metrics, "best": best, "improved": improved, "stopped_early": stop}
        if keep is not None and (stop or epoch == cfg.epochs - 1 or (epoch + 1) % CHECKPOINT_EVERY == 0):
            from ray.train import Checkpoint

            with tempfile.TemporaryDirectory() as d:
                _write_checkpoint(d, kept, kept_cm)
                report(row, checkpoint=Checkpoint.from_directory(d))
        else:
            report(row)
        if stop:
            break
    return {"history": history, "stopped_early": stale >= cfg.patience and not last}


def split_datasets(ds: Any, refit: bool = False) -> dict[str, Any]:
    """The "train" and "val" Ray Datasets of rows flagged by labels.VAL, materialized once into the object store
    (spilling to disk when large): not re-read every epoch, and ready before the workers take the CPUs (a lazy
    pipeline could then wait forever). ``refit``: "train" holds the validation rows too."""
    from pipelines.learn.labels import VAL, keep_split

    def rows(fn: Any, *args: Any) -> Any:
        return ds.map_batches(fn, fn_args=args, batch_format="pyarrow", batch_size=None).materialize()

    train = rows(lambda b: b.drop_columns([VAL])) if refit else rows(keep_split, False)
    return {"train": train, "val": rows(keep_split, True)}


def dataset_shards() -> tuple[Any, Any]:
    """This Ray Train worker's shards of the "train" and "val" datasets."""
    import ray.train

    return ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")


def worker_epochs(cfg: Schedule, one_epoch: Callable[[int], EpochSums], keep: Callable[[], States],
                  last: bool = False) -> dict[str, Any]:
    """``epoch_loop`` in a Ray Train worker: every worker reports; rank 0 keeps the best weights and checkpoints."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()

    def report(row: dict[str, Any], **kw: Any) -> None:
        if rank == 0:  # Ray forwards a worker's prints to the driver; the featx console shows lines like this one
            print(epoch_line(row, cfg.epochs), flush=True)
        ray.train.report(row, **kw)

    return epoch_loop(cfg, one_epoch, report, keep if rank == 0 else None, last)


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """An epoch's progress line, as a worker prints it: ``featx: epoch 3/50: train loss 0.412 · val loss 0.455 ·
    val accuracy 0.871 · 1.2 s (best so far)``."""
    words = [f"train loss {row['train_loss']:.4g}", f"val loss {row['val_loss']:.4g}"]
    words += [f"val {k[4:].replace('_', ' ')} {v:.3f}" for k, v in row.items()
              if k.startswith("val_") and k != "val_loss" and isinstance(v, (int, float))]
    return (f"featx: epoch {row['epoch']}/{epochs}: " + " · ".join(words) + f" · {row.get('seconds', 0.0):.1f} s"
            + (" (best so far)" if row.get("improved") else ""))


# ---- the driver ------------------------------------------------------------------------------------

def run_workers(loop: Callable[[dict[str, Any]], dict[str, Any]], loop_config: dict[str, Any], cfg: Schedule,
                datasets: dict[str, Any], out: Path, what: str, num_to_keep: int = 2) -> Any:
    """``cfg.num_workers`` Ray Train workers running ``loop`` (DDP process group, dataset shards); the
    ``ray.train.Result`` with its last checkpoint, the workers' errors raised as featx errors."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"ray-train-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
                             storage_path=str(out / "_ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep)),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError: the workers' error snippets are in the message
        raise PipelineError(f"{what} failed in a Ray Train worker: {str(e)[:4000]}") from e
    if result.error is not None:
        raise PipelineError(f"{what} failed: {result.error}")
    if result.checkpoint is None:
        raise PipelineError(f"{what} produced no checkpoint; see the Ray Train logs under {out / '_ray'}")
    return result


def fit_on_ray(loop: Callable[[dict[str, Any]], dict[str, Any]], loop_config: dict[str, Any], cfg: Schedule,
               datasets: dict[str, Any], out: Path, what: str, use_best: Callable[[Path], None],
               num_to_keep: int = 2) -> dict[str, Any]:
    """Train with ``cfg.num_workers`` Ray Train workers running ``loop``; ``use_best(folder)`` reads the best
    checkpoint. Returns best_epoch, best (its metrics), epochs_run, stopped_early, history, confusion."""
    result = run_workers(loop, loop_config, cfg, datasets, out, what, num_to_keep)
    history = result.return_value["history"]  # rank 0's: every epoch (result.metrics stop at the last checkpoint)
    with result.checkpoint.as_directory() as d:
        use_best(Path(d))
        confusion = json.loads(Path(d, CONFUSION).read_text())
    i = best_epoch(history, cfg.metric)
    return {"best_epoch": history[i]["epoch"], "best": history[i], "epochs_run": len(history),
            "stopped_early": result.return_value["stopped_early"], "history": history, "confusion": confusion}


def save_metrics(out: Path, summary: dict[str, Any], title: str) -> None:
    """``metrics.json`` (the run's summary) and ``metrics.png`` (its history per epoch, or for the linear probe
    its cross-validation curve) in ``out``."""
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str))
    if summary.get("history"):
        plot_history(summary["history"], out / "metrics.png", title=title)
    else:
        plot_cv(summary.get("cv"), summary.get("solver", {}), out / "metrics.png", title=title)


def plot_cv(cv: dict[str, Any] | None, solver: dict[str, Any], path: Path, title: str) -> None:
    """The linear probe's cross-validation curve (held-out accuracy and log-loss per C) and the chosen C, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, a = plt.subplots(figsize=(6, 4))
    if cv:
        a.semilogx(cv["cs"], cv["accuracy"], marker="o", label=f"CV accuracy ({cv['folds']} folds)")
        b = a.twinx()
        b.semilogx(cv["cs"], cv["log_loss"], color="tab:orange", marker=".", label="CV log-loss")
        b.set_ylabel("log-loss")
        a.axvline(cv["best_c"], color="grey", linestyle="--", label=f"chosen C = {cv['best_c']:.3g}")
        a.set_ylim(0, 1)
    else:
        a.text(0.5, 0.5, f"C = {solver.get('c')} given (no cross-validation)", ha="center", transform=a.transAxes)
    a.set_xlabel("C (inverse L2 strength)")
    a.set_ylabel("accuracy")
    a.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and validation metrics per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    a.set_xlabel("epoch")
    a.legend()
    b.plot(epochs, [h["val_accuracy"] for h in history], label="validation accuracy")
    b.plot(epochs, [h["val_macro_f1"] for h in history], label="validation macro F1")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
