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

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from operators import columns as C
from operators.errors import InputError
from operators.io.parquet import arrow_filesystem, read_parquet
from operators.learn.coral import Moments, fit_coral
from operators.learn.heads import HeadSpec, build_head, features, save_head, scaler_from_moments, unwrap
from operators.learn.metrics import class_weights
from operators.search.topk import vectors_from_arrow
from pipelines.config import TrainConfig
from pipelines.learn.engine import (EpochSums, dataset_shards, fit_on_ray, head_epoch, save_metrics, split_datasets,
                                    worker_epochs)
from pipelines.learn.labels import VAL, Y, encode, label_map, split_flags
from pipelines.publish.manifest import load_manifest, published_files


def row_columns(cfg: TrainConfig, labelled: bool = True) -> list[str]:
    """The columns training reads from the embeddings table."""
    extra = ([cfg.label_column] + ([cfg.split_column] if cfg.split_column else [])) if labelled else []
    return list(dict.fromkeys([C.KEY, C.EMBEDDING] + extra))


def scan_stats(files: list[str], cfg: TrainConfig, dim: int, labelled: bool, full_cov: bool) -> dict[str, Any]:
    """One Ray task's share of the pre-pass: label counts per split and moments of the training rows."""
    train_counts: Counter = Counter()
    val_counts: Counter = Counter()
    moments = Moments.empty(dim, full=full_cov)
    for uri in files:
        t = read_parquet(uri, cfg.storage_options, row_columns(cfg, labelled))
        val = split_flags(t, cfg) if labelled else np.zeros(t.num_rows, dtype=bool)
        if labelled:
            labels = t[cfg.label_column].to_pylist()
            train_counts.update(lab for lab, v in zip(labels, val) if not v)
            val_counts.update(lab for lab, v in zip(labels, val) if v)
        moments = moments.add(vectors_from_arrow(t[C.EMBEDDING], dim)[~val])
    return {"train_counts": train_counts, "val_counts": val_counts, "moments": moments}


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = parts[0]
    for p in parts[1:]:
        out["train_counts"] += p["train_counts"]
        out["val_counts"] += p["val_counts"]
        out["moments"] = out["moments"].merge(p["moments"])
    return out


def _table_info(uri: str, storage_options: dict[str, Any], what: str) -> tuple[dict[str, Any], list[str], pa.Schema]:
    import pyarrow.parquet as pq

    manifest = load_manifest(uri, storage_options)
    if manifest is None:
        raise InputError(f"{what} {uri!r} has no published featx table (no _manifest.json); run `featx embed` first")
    files = published_files(manifest, uri)
    if not files:
        raise InputError(f"{what} {uri!r} has no rows (snapshot {manifest['snapshot']} lists no data files)")
    return manifest, files, pq.read_schema(files[0], filesystem=arrow_filesystem(files[0], storage_options))


def _scan(files: list[str], cfg: TrainConfig, dim: int, labelled: bool, full_cov: bool) -> dict[str, Any]:
    import ray

    task = ray.remote(num_cpus=0.5)(scan_stats)
    groups = [files[i::4] for i in range(min(4, len(files)))]
    return merge_stats(ray.get([task.remote(g, cfg, dim, labelled, full_cov) for g in groups]))


def prepare(cfg: TrainConfig) -> tuple[HeadSpec, dict[str, Any], list[str]]:
    """Everything decided before training: checks, label map, class weights, scaler, CORAL map."""
    manifest, files, schema = _table_info(cfg.embeddings, cfg.storage_options, "embeddings")
    dim = int(manifest["dim"])
    needed = [cfg.label_column] + ([cfg.split_column] if cfg.split_column else [])
    for col in needed:
        if col not in schema.names:
            raise InputError(
                f"column {col!r} is not in the embeddings table {cfg.embeddings!r}; "
                f"its columns: {', '.join(schema.names)}. "
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
                             f"({tman['model'].get('model')}) than {cfg.embeddings!r} "
                             f"({manifest['model'].get('model')}); embed both domains with the same model")
        target = tfiles
    from pipelines.runtime import init_ray

    init_ray(cfg.ray_address)  # after the checks above: bad input fails before any Ray work
    src = _scan(files, cfg, dim, labelled=True, full_cov=target is not None)
    labels = label_map(src["train_counts"], src["val_counts"], cfg.label_column)
    counts = np.array([src["train_counts"][lab] for lab in labels])
    adaptation: dict[str, Any] = {}
    if target is not None:
        tgt = _scan(target, cfg, dim, labelled=False, full_cov=True)
        adaptation = fit_coral(src["moments"], tgt["moments"], cfg.coral_eps)
        a = np.asarray(adaptation["matrix"])
        _, cov_s = src["moments"].mean_cov()  # the scaler sees mapped features: their mean and variance
        mean, var = np.asarray(adaptation["target_mean"]), np.einsum("ij,ik,kj->j", a, cov_s, a)
    else:
        mean, var = src["moments"].mean_var()
    scaler = scaler_from_moments(mean, var) if cfg.standardize else {}
    spec = HeadSpec(kind=cfg.head, dim=dim, labels=labels, hidden=cfg.hidden, dropout=cfg.dropout, scaler=scaler,
                    adaptation=adaptation, model=manifest.get("model", {}))
    info = {"train_rows": int(counts.sum()), "val_rows": int(sum(src["val_counts"].values())),
            "class_counts": {str(lab): int(c) for lab, c in zip(labels, counts)},
            "class_weights": class_weights(counts).tolist() if cfg.class_weighting == "balanced" else None,
            "snapshot": manifest["snapshot"], "dim": dim}
    return spec, info, files


def with_targets(batch: pa.Table, labels: list[Any], cfg: TrainConfig) -> pa.Table:
    """Rows of the embeddings table -> embedding, class index (Y) and validation flag (VAL)."""
    y = encode(batch[cfg.label_column].to_pylist(), labels)
    return pa.table({C.EMBEDDING: batch[C.EMBEDDING], Y: pa.array(y), VAL: pa.array(split_flags(batch, cfg))})


def read_rows(uri: str, spec: HeadSpec, cfg: TrainConfig) -> pa.Table:
    """One published file's training rows (``with_targets``), both splits."""
    return with_targets(read_parquet(uri, cfg.storage_options, row_columns(cfg)), spec.labels, cfg)


def datasets(files: list[str], spec: HeadSpec, cfg: TrainConfig) -> dict[str, Any]:
    """Train and validation Ray Datasets streamed from the published files."""
    import ray.data

    fs = arrow_filesystem(files[0], cfg.storage_options)
    ds = ray.data.read_parquet(files, columns=row_columns(cfg), filesystem=fs)
    return split_datasets(ds.map_batches(with_targets, fn_args=(spec.labels, cfg), batch_format="pyarrow",
                                         batch_size=None))


# ---- the worker loop -----------------------------------------------------------------------------

def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: the head (DDP) on this worker's shard of the rows; the epochs are the engine's."""
    import ray.train.torch as rtt
    import torch

    spec: HeadSpec = config["spec"]
    cfg: TrainConfig = config["cfg"]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    head = rtt.prepare_model(build_head(spec))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = torch.tensor(config["class_weights"]) if config["class_weights"] else None
    train, val = dataset_shards()

    def xy(batch: pa.Table, training: bool) -> tuple[Any, Any]:
        x = features(vectors_from_arrow(batch[C.EMBEDDING], spec.dim), spec, train=training)
        return x, torch.from_numpy(batch[Y].to_numpy())

    def one_epoch(epoch: int) -> EpochSums:
        batches = train.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=max(cfg.batch_size * 8, 1024),
                                     local_shuffle_seed=cfg.seed + epoch)
        return head_epoch(head, opt, weights, spec.n_classes, (xy(b, True) for b in batches),
                          (xy(b, False) for b in val.iter_batches(batch_size=4096, batch_format="pyarrow")))

    return worker_epochs(cfg, one_epoch, keep=lambda: {"head": unwrap(head).state_dict()})


# ---- the driver ----------------------------------------------------------------------------------

def run_train(cfg: TrainConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a head; returns the summary also saved as ``OUTPUT/metrics.json``."""
    from safetensors.torch import load_file

    t_start = time.perf_counter()
    spec, info, files = prepare(cfg)
    progress(f"featx train: {info['train_rows']} training and {info['val_rows']} validation rows, "
             f"{spec.n_classes} classes, dim {spec.dim}, head {spec.kind}"
             + (f", CORAL-aligned to {cfg.adapt_to}" if spec.adaptation else ""))
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    head = build_head(spec)
    fit = fit_on_ray(train_loop, {"spec": spec, "cfg": cfg, "class_weights": info["class_weights"]}, cfg,
                     datasets(files, spec, cfg), out, "training",
                     use_best=lambda d: head.load_state_dict(load_file(str(d / "head.safetensors"))))
    summary = {
        "embeddings": cfg.embeddings, "head": spec.kind, "classes": len(spec.labels), **info,
        **{k: fit[k] for k in ("best_epoch", "best", "epochs_run", "stopped_early")}, "metric": cfg.metric,
        "adapted_to": cfg.adapt_to, "seconds": round(time.perf_counter() - t_start, 2), "history": fit["history"],
        "confusion": fit["confusion"], "config": cfg.public_dict(),
    }
    save_head(out, head, spec, extra={"trained": {k: summary[k] for k in ("best_epoch", "best", "epochs_run")}})
    save_metrics(out, summary, title=f"{spec.kind} head on {Path(cfg.embeddings).name}")
    progress(f"best epoch {summary['best_epoch']}: val accuracy {summary['best']['val_accuracy']:.3f}, "
             f"macro F1 {summary['best']['val_macro_f1']:.3f}; saved to {out}")
    return summary
