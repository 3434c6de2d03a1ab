"""`featx train`: a linear probe or MLP head on a featx embeddings table, with Ray Train.

The driver reads only the label column and feature statistics (in Ray tasks that stream the Parquet
files): the label map, class counts, the split sizes, the scaler, and for ``adapt_to`` the CORAL map.
The rows themselves stream from the published Parquet files through Ray Data to the Ray Train workers
(``TorchTrainer``, data parallel), so the table never has to fit in the driver. Every epoch the workers
all-reduce their validation confusion matrices, so each worker sees the same metrics and early stopping
is decided the same everywhere. The best head is saved with safetensors, beside a JSON of its config and
label map, the per-epoch metrics (JSON) and their plot (PNG).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from operators import columns as C
from operators.learn.coral import Moments, fit_coral
from operators.errors import InputError, PipelineError
from operators.learn.heads import (
    HeadSpec,
    build_head,
    eval_batch,
    features,
    save_head,
    scaler_from_moments,
    train_step,
)
from operators.learn.metrics import class_weights, scores
from operators.search.topk import vectors_from_arrow
from operators.io.storage import get_fs, retry
from pipelines.config import TrainConfig
from pipelines.learn.labels import encode, is_val_by_column, is_val_by_hash, label_map
from pipelines.publish.manifest import load_manifest, published_files

Y, VAL = "_y", "_val"  # internal columns: class index, validation flag
_WHAT = "training"
CHECKPOINT_EVERY = 10  # epochs between checkpoints of the best head (and always at the end)


embedding_matrix = vectors_from_arrow  # fixed_size_list<float32|float16>[dim] -> float32 [N, dim]


def _open_table(uri: str, columns: list[str], storage_options: dict[str, Any]) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = get_fs(uri, storage_options)

    def run() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    return retry(run, f"reading {uri!r}")


def _split_flags(table: pa.Table, cfg: TrainConfig) -> np.ndarray:
    if cfg.split_column:
        return is_val_by_column(table[cfg.split_column].to_pylist(), cfg.split_column)
    return is_val_by_hash(table[C.KEY].to_pylist(), cfg.val_fraction, cfg.seed)


def scan_stats(files: list[str], cfg: TrainConfig, dim: int, labelled: bool, full_cov: bool) -> dict[str, Any]:
    """One Ray task's share of the pre-pass: label counts per split and moments of the training rows."""
    cols = list(dict.fromkeys([C.KEY, C.EMBEDDING] + ([cfg.label_column] if labelled else [])
                              + ([cfg.split_column] if labelled and cfg.split_column else [])))
    train_counts: Counter = Counter()
    val_counts: Counter = Counter()
    n, s, sq = 0, np.zeros(dim), np.zeros(dim)
    ss = np.zeros((dim, dim)) if full_cov else None
    for uri in files:
        t = _open_table(uri, cols, cfg.storage_options)
        val = _split_flags(t, cfg) if labelled else np.zeros(t.num_rows, dtype=bool)
        if labelled:
            labels = t[cfg.label_column].to_pylist()
            train_counts.update(lab for lab, v in zip(labels, val) if not v)
            val_counts.update(lab for lab, v in zip(labels, val) if v)
        x = embedding_matrix(t[C.EMBEDDING], dim)[~val].astype(np.float64)
        n += len(x)
        s += x.sum(0)
        sq += (x * x).sum(0)
        if ss is not None:
            ss += x.T @ x
    return {"train_counts": train_counts, "val_counts": val_counts, "n": n, "s": s, "sq": sq, "ss": ss}


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = parts[0]
    for p in parts[1:]:
        out["train_counts"] += p["train_counts"]
        out["val_counts"] += p["val_counts"]
        out["n"] += p["n"]
        out["s"] = out["s"] + p["s"]
        out["sq"] = out["sq"] + p["sq"]
        if out["ss"] is not None:
            out["ss"] = out["ss"] + p["ss"]
    return out


def _table_info(uri: str, storage_options: dict[str, Any], what: str) -> tuple[dict[str, Any], list[str], pa.Schema]:
    manifest = load_manifest(uri, storage_options)
    if manifest is None:
        raise InputError(f"{what} {uri!r} has no published featx table (no _manifest.json); run `featx embed` first")
    files = published_files(manifest, uri)
    if not files:
        raise InputError(f"{what} {uri!r} has no rows (snapshot {manifest['snapshot']} lists no data files)")
    import pyarrow.parquet as pq

    fs, path = get_fs(files[0], storage_options)
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    return manifest, files, schema


def _scan(files: list[str], cfg: TrainConfig, dim: int, labelled: bool, full_cov: bool) -> dict[str, Any]:
    import ray

    task = ray.remote(num_cpus=0.5)(scan_stats)
    groups = [files[i::4] for i in range(min(4, len(files)))]
    return _merge(ray.get([task.remote(g, cfg, dim, labelled, full_cov) for g in groups]))


def prepare(cfg: TrainConfig) -> tuple[HeadSpec, dict[str, Any], list[str]]:
    """Everything decided before training: checks, label map, class weights, scaler, CORAL map."""
    manifest, files, schema = _table_info(cfg.embeddings, cfg.storage_options, "embeddings")
    dim = int(manifest["dim"])
    needed = [cfg.label_column] + ([cfg.split_column] if cfg.split_column else [])
    for col in needed:
        if col not in schema.names:
            raise InputError(
                f"column {col!r} is not in the embeddings table {cfg.embeddings!r}; its columns: {', '.join(schema.names)}. "
                "Embed with --set passthrough=[...] to carry the label column, or set label_column"
            )
    target = None
    if cfg.adapt_to:
        tman, tfiles, _ = _table_info(cfg.adapt_to, cfg.storage_options, "adapt_to target")
        if int(tman["dim"]) != dim:
            raise InputError(f"adapt_to {cfg.adapt_to!r} has dim {tman['dim']} but the source embeddings have {dim}; "
                             "embed both domains with the same model")
        if tman.get("model_fingerprint") != manifest.get("model_fingerprint"):
            raise InputError(f"adapt_to {cfg.adapt_to!r} was embedded with another model "
                             f"({tman['model'].get('model')}) than {cfg.embeddings!r} ({manifest['model'].get('model')})")
        target = tfiles
    from pipelines.runtime import init_ray

    init_ray(cfg.ray_address)  # after the checks above: bad input fails before any Ray work
    src = _scan(files, cfg, dim, labelled=True, full_cov=target is not None)
    labels = label_map(src["train_counts"], src["val_counts"], cfg.label_column)
    counts = np.array([src["train_counts"][lab] for lab in labels])
    adaptation: dict[str, Any] = {}
    if target is not None:
        tgt = _scan(target, cfg, dim, labelled=False, full_cov=True)
        s_m = Moments(src["n"], src["s"], src["ss"])
        t_m = Moments(tgt["n"], tgt["s"], tgt["ss"])
        adaptation = fit_coral(s_m, t_m, cfg.coral_eps)
        a = np.asarray(adaptation["matrix"])
        _, cov_s = s_m.mean_cov()
        mean, var = np.asarray(adaptation["target_mean"]), np.einsum("ij,ik,kj->j", a, cov_s, a)
    else:
        mean = src["s"] / src["n"]
        var = src["sq"] / src["n"] - mean**2
    scaler = scaler_from_moments(mean, var) if cfg.standardize else {}
    spec = HeadSpec(kind=cfg.head, dim=dim, labels=labels, hidden=cfg.hidden, dropout=cfg.dropout, scaler=scaler,
                    adaptation=adaptation, model=manifest.get("model", {}))
    info = {"train_rows": int(counts.sum()), "val_rows": int(sum(src["val_counts"].values())),
            "class_counts": {str(lab): int(c) for lab, c in zip(labels, counts)},
            "class_weights": class_weights(counts).tolist() if cfg.class_weighting == "balanced" else None,
            "snapshot": manifest["snapshot"], "dim": dim}
    return spec, info, files


def _targets(batch: pa.Table, labels: list[Any], cfg: TrainConfig) -> pa.Table:
    y = encode(batch[cfg.label_column].to_pylist(), labels)
    val = _split_flags(batch, cfg)
    return pa.table({C.EMBEDDING: batch[C.EMBEDDING], Y: pa.array(y), VAL: pa.array(val)})


def _keep(batch: pa.Table, val: bool) -> pa.Table:
    import pyarrow.compute as pc

    mask = batch[VAL] if val else pc.invert(batch[VAL])
    return batch.filter(mask).drop_columns([VAL])


def datasets(files: list[str], spec: HeadSpec, cfg: TrainConfig) -> dict[str, Any]:
    """Train and validation Ray Datasets streamed from the published files."""
    import ray.data

    cols = list(dict.fromkeys([C.KEY, C.EMBEDDING, cfg.label_column] + ([cfg.split_column] if cfg.split_column else [])))
    ds = ray.data.read_parquet(files, columns=cols, filesystem=_arrow_fs(files[0], cfg.storage_options))
    ds = ds.map_batches(_targets, fn_args=(spec.labels, cfg), batch_format="pyarrow", batch_size=None)
    # materialized once into the object store (spilling to disk when large), not re-read every epoch
    return {"train": ds.map_batches(_keep, fn_args=(False,), batch_format="pyarrow", batch_size=None).materialize(),
            "val": ds.map_batches(_keep, fn_args=(True,), batch_format="pyarrow", batch_size=None).materialize()}


def _arrow_fs(uri: str, storage_options: dict[str, Any]) -> Any:
    if "://" not in uri or uri.startswith("file://"):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = get_fs(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs))


# ---- the worker loop -----------------------------------------------------------------------------

def _all_reduce(arr: np.ndarray) -> np.ndarray:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    dist.all_reduce(t)
    return t.numpy()


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best - 1e-9 if metric == "loss" else value > best + 1e-9


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: stream batches, step, all-reduce validation metrics, report, stop early together."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    spec: HeadSpec = config["spec"]
    cfg: TrainConfig = config["cfg"]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    head = build_head(spec)
    import ray.train.torch as rtt

    head = rtt.prepare_model(head)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = torch.tensor(config["class_weights"]) if config["class_weights"] else None
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    history: list[dict[str, float]] = []
    best: float | None = None
    best_state: dict[str, Any] = {}
    best_cm: list[list[int]] = []
    stale = 0
    n = spec.n_classes
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, rows = 0.0, 0
        for batch in train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                              local_shuffle_buffer_size=max(cfg.batch_size * 8, 1024),
                                              local_shuffle_seed=cfg.seed + epoch):
            x = features(embedding_matrix(batch[C.EMBEDDING], spec.dim), spec, train=True)
            y = torch.from_numpy(batch[Y].to_numpy())
            loss_sum += train_step(head, opt, x, y, weights)
            rows += len(y)
        cm, vloss = np.zeros((n, n)), 0.0
        for batch in val_shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
            x = features(embedding_matrix(batch[C.EMBEDDING], spec.dim), spec, train=False)
            c, v = eval_batch(head, x, torch.from_numpy(batch[Y].to_numpy()), n)
            cm, vloss = cm + c, vloss + v
        tot = _all_reduce(np.concatenate([[loss_sum, rows, vloss], cm.reshape(-1)]))
        cm = tot[3:].reshape(n, n)
        metrics = {"epoch": epoch + 1, "train_loss": tot[0] / max(tot[1], 1), "val_loss": tot[2] / max(cm.sum(), 1),
                   **{f"val_{k}": v for k, v in scores(cm).items()}, "seconds": time.perf_counter() - t0}
        history.append(metrics)
        value = metrics["val_loss"] if cfg.metric == "loss" else metrics[f"val_{cfg.metric}"]
        improved = better(cfg.metric, value, best)
        stop = False
        if improved:
            best, stale = value, 0
        else:
            stale += 1
            stop = stale >= cfg.patience
        report = {**metrics, "best": best, "improved": improved, "stopped_early": stop}
        if improved:  # the best head so far, kept in memory; checkpointed every few epochs and at the end
            inner = head.module if hasattr(head, "module") else head
            best_state = {k: v.detach().cpu().clone().contiguous() for k, v in inner.state_dict().items()}
            best_cm = cm.astype(int).tolist()
        last = stop or epoch == cfg.epochs - 1
        if rank == 0 and (last or (epoch + 1) % CHECKPOINT_EVERY == 0):
            with tempfile.TemporaryDirectory() as d:
                from safetensors.torch import save_file

                save_file(best_state, os.path.join(d, "head.safetensors"))
                (Path(d) / "confusion.json").write_text(json.dumps(best_cm))
                ray.train.report(report, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
        if stop:
            break
    return {"history": history, "stopped_early": bool(history) and stale >= cfg.patience}


# ---- the driver ----------------------------------------------------------------------------------

def run_train(cfg: TrainConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a head; returns the summary also saved as ``OUTPUT/metrics.json``."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t_start = time.perf_counter()
    spec, info, files = prepare(cfg)
    progress(f"featx train: {info['train_rows']} training and {info['val_rows']} validation rows, "
             f"{spec.n_classes} classes, dim {spec.dim}, head {spec.kind}"
             + (f", CORAL-aligned to {cfg.adapt_to}" if spec.adaptation else ""))
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "cfg": cfg, "class_weights": info["class_weights"]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"ray-train-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", storage_path=str(out / "_ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets(files, spec, cfg),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError: the workers' error snippets are in the message
        raise PipelineError(f"{_WHAT} failed in a Ray Train worker: {str(e)[:4000]}") from e
    if result.error is not None:
        raise PipelineError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise PipelineError("training produced no checkpoint")
    history = result.return_value["history"]  # rank 0's: every epoch (result.metrics stop at the last checkpoint)
    with result.checkpoint.as_directory() as d:
        from safetensors.torch import load_file

        head = build_head(spec)
        head.load_state_dict(load_file(os.path.join(d, "head.safetensors")))
        confusion = json.loads(Path(d, "confusion.json").read_text())
    best_epoch = max(range(len(history)), key=lambda i: -history[i]["val_loss"] if cfg.metric == "loss"
                     else history[i][f"val_{cfg.metric}"])
    summary = {
        "embeddings": cfg.embeddings, "head": spec.kind, "classes": len(spec.labels), **info,
        "best_epoch": history[best_epoch]["epoch"], "best": history[best_epoch], "epochs_run": len(history),
        "stopped_early": result.return_value["stopped_early"], "metric": cfg.metric,
        "adapted_to": cfg.adapt_to, "seconds": round(time.perf_counter() - t_start, 2), "history": history,
        "confusion": confusion, "config": cfg.public_dict(),
    }
    save_head(out, head, spec, extra={"trained": {k: summary[k] for k in ("best_epoch", "best", "epochs_run")}})
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_history(history, out / "metrics.png", title=f"{spec.kind} head on {Path(cfg.embeddings).name}")
    progress(f"best epoch {summary['best_epoch']}: val accuracy {summary['best']['val_accuracy']:.3f}, "
             f"macro F1 {summary['best']['val_macro_f1']:.3f}; saved to {out}")
    return summary


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
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
