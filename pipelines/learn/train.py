"""`featx train`: a linear probe or MLP head on a featx embeddings table, with Ray Train.

The driver reads only the label column and feature statistics (in Ray tasks that stream the Parquet
files): the label map, class counts, the split sizes, the scaler, and for ``adapt_to`` the CORAL map.
The rows themselves stream from the published Parquet files through Ray Data to the Ray Train workers
(``TorchTrainer``, data parallel), so the table never has to fit in the driver. Every epoch the workers
all-reduce their validation confusion matrices, so each worker sees the same metrics and early stopping
is decided the same everywhere. The best head is saved with safetensors, beside a JSON of its config and
label map, the per-epoch metrics (JSON) and their plot (PNG).

The linear probe is not trained by epochs: it is the convex problem scikit-learn's LogisticRegression solves,
solved full-batch by L-BFGS on the workers' rows with all-reduced sums, its L2 strength chosen by k-fold
cross-validation on the training rows, then fitted on all of them (``linear_loop``, operators/learn/convex.py).
The MLP stops early on the validation rows, then is refit on training and validation rows together for the
chosen number of epochs (``refit``).
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
from operators.learn.heads import HeadSpec, build_head, eval_batch, features, save_head, scaler_from_moments, unwrap
from operators.learn.metrics import class_weights
from operators.search.topk import vectors_from_arrow
from pipelines.config import TrainConfig
from pipelines.learn.engine import (EpochSums, all_reduce, dataset_shards, epoch_metrics, fit_on_ray, head_epoch,
                                    run_workers, save_metrics, split_datasets, worker_epochs)
from pipelines.learn.labels import HASH, VAL, Y, encode, key_hashes, label_map, split_flags
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
    labels = label_map(src["train_counts"], src["val_counts"], cfg.label_column,
                       need_val=bool(cfg.val_fraction or cfg.split_column))
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
    """Rows of the embeddings table -> embedding, class index (Y), validation flag (VAL) and, for the linear
    probe, a stable key hash (HASH: its cross-validation fold)."""
    y = encode(batch[cfg.label_column].to_pylist(), labels)
    cols = {C.EMBEDDING: batch[C.EMBEDDING], Y: pa.array(y), VAL: pa.array(split_flags(batch, cfg))}
    if cfg.head == "linear":
        cols[HASH] = pa.array(key_hashes(batch[C.KEY].to_pylist(), f"cv:{cfg.seed}"))
    return pa.table(cols)


def read_rows(uri: str, spec: HeadSpec, cfg: TrainConfig) -> pa.Table:
    """One published file's training rows (``with_targets``), both splits."""
    return with_targets(read_parquet(uri, cfg.storage_options, row_columns(cfg)), spec.labels, cfg)


def datasets(files: list[str], spec: HeadSpec, cfg: TrainConfig, refit: bool = False) -> dict[str, Any]:
    """Train and validation Ray Datasets streamed from the published files (``refit``: train holds both)."""
    import ray.data

    fs = arrow_filesystem(files[0], cfg.storage_options)
    ds = ray.data.read_parquet(files, columns=row_columns(cfg), filesystem=fs)
    return split_datasets(ds.map_batches(with_targets, fn_args=(spec.labels, cfg), batch_format="pyarrow",
                                         batch_size=None), refit)


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
        return x, torch.tensor(batch[Y].to_numpy())  # a copy: Arrow's buffer is read-only (torch would warn)

    def one_epoch(epoch: int) -> EpochSums:
        batches = train.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=max(cfg.batch_size * 8, 1024),
                                     local_shuffle_seed=cfg.seed + epoch)
        return head_epoch(head, opt, weights, spec.n_classes, (xy(b, True) for b in batches),
                          (xy(b, False) for b in val.iter_batches(batch_size=4096, batch_format="pyarrow")))

    return worker_epochs(cfg, one_epoch, keep=lambda: {"head": unwrap(head).state_dict()},
                         last=config.get("last", False))


def linear_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker, linear probe: this worker's training rows in memory, the L2 strength chosen by k-fold CV
    and the final fit on all training rows, both full-batch L-BFGS whose loss and gradient sums are all-reduced
    (operators/learn/convex.py); then the held-out rows' metrics. Every worker takes the same steps."""
    import tempfile

    import ray.train
    import torch
    from safetensors.torch import save_file

    from operators.learn.convex import Shard, cross_validate, fold_of, fold_scores, solve, to_linear_state

    spec: HeadSpec = config["spec"]
    cfg: TrainConfig = config["cfg"]
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    train, val = dataset_shards()
    xs, ys, hs = [], [], []
    for b in train.iter_batches(batch_size=65536, batch_format="pyarrow"):
        xs.append(features(vectors_from_arrow(b[C.EMBEDDING], spec.dim), spec, train=True))
        ys.append(b[Y].to_numpy())
        hs.append(b[HASH].to_numpy())
    x = torch.cat(xs) if xs else torch.zeros(0, spec.dim)
    y = np.concatenate(ys).astype(np.int64) if ys else np.zeros(0, np.int64)
    cw = config["class_weights"]
    weight = np.asarray(cw, np.float64)[y] if cw else np.ones(len(y))
    sample = min(1.0, cfg.cv_max_rows / max(config["train_rows"], 1))
    h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    shard = Shard(x, torch.from_numpy(y), torch.from_numpy(weight), fold_of(h, cfg.cv_folds, sample))
    t0 = time.perf_counter()
    cv, c, start = None, cfg.l2_c, None
    if c is None:
        cv = cross_validate(shard, spec.n_classes, cfg.cv_folds, cfg.cv_grid, all_reduce, cfg.solver_tol, cfg.max_iter)
        c, start = cv.best_c, cv.start
    t1 = time.perf_counter()
    sol = solve(shard, spec.n_classes, c, None, all_reduce, start, cfg.solver_tol, cfg.max_iter)
    t2 = time.perf_counter()
    head = build_head(spec)
    head.load_state_dict(to_linear_state(sol))
    train_scores = all_reduce(fold_scores(sol, shard, torch.ones(shard.n, dtype=torch.bool), spec.n_classes))
    cm, vloss = np.zeros((spec.n_classes, spec.n_classes)), 0.0
    for b in val.iter_batches(batch_size=4096, batch_format="pyarrow"):
        bc, bl = eval_batch(head, features(vectors_from_arrow(b[C.EMBEDDING], spec.dim), spec, train=False),
                            torch.tensor(b[Y].to_numpy()), spec.n_classes)
        cm, vloss = cm + bc, vloss + bl
    held, cm = epoch_metrics(0, EpochSums(0.0, 0, vloss, cm), t2)  # all-reduced: every worker's held-out rows
    solver = {"c": c, "iterations": sol.iterations, "evaluations": sol.evaluations, "grad_max": sol.grad_max,
              "converged": sol.converged, "tol": cfg.solver_tol, "objective": sol.objective,
              "train_rows": int(train_scores[0]), "train_accuracy": float(train_scores[1] / max(train_scores[0], 1)),
              "workers": ray.train.get_context().get_world_size(), "cv_seconds": round(t1 - t0, 3),
              "fit_seconds": round(t2 - t1, 3)}
    result = {"solver": solver, "cv": None if cv is None else cv.report(),
              "held_out": None if cm.sum() == 0 else {k: v for k, v in held.items() if k.startswith("val_")},
              "confusion": cm.astype(int).tolist(), "w": sol.w.tolist(), "b": sol.b.tolist()}
    metrics = {"c": c, "iterations": sol.iterations, "converged": sol.converged}
    if ray.train.get_context().get_world_rank() == 0:
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(Path(d) / "head.safetensors"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)
    return result


# ---- the driver ----------------------------------------------------------------------------------

def run_train(cfg: TrainConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a head; returns the summary also saved as ``OUTPUT/metrics.json``."""
    t_start = time.perf_counter()
    spec, info, files = prepare(cfg)
    progress(f"featx train: {info['train_rows']} training and {info['val_rows']} held-out rows, "
             f"{spec.n_classes} classes, dim {spec.dim}, head {spec.kind}"
             + (f", CORAL-aligned to {cfg.adapt_to}" if spec.adaptation else ""))
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    head = build_head(spec)
    base = {"embeddings": cfg.embeddings, "head": spec.kind, "classes": len(spec.labels), **info,
            "adapted_to": cfg.adapt_to}
    if spec.kind == "linear":
        summary = {**base, **_train_linear(cfg, spec, info, files, out, head)}
        trained = {k: summary[k] for k in ("solver", "cv", "held_out")}
    else:
        summary = {**base, **_train_mlp(cfg, spec, info, files, out, head, progress)}
        trained = {k: summary[k] for k in ("best_epoch", "best", "epochs_run", "refit")}
    summary.update({"seconds": round(time.perf_counter() - t_start, 2), "config": cfg.public_dict()})
    save_head(out, head, spec, extra={"trained": trained})
    save_metrics(out, summary, title=f"{spec.kind} head on {Path(cfg.embeddings).name}")
    b = summary["best"]
    where = "held-out" if spec.kind == "mlp" or summary["held_out"] else f"{cfg.cv_folds}-fold CV"
    progress(f"{summary['choice']}: {where} accuracy {b['val_accuracy']:.3f}, macro F1 {b['val_macro_f1']:.3f}; "
             f"saved to {out}")
    return summary


def _train_linear(cfg: TrainConfig, spec: HeadSpec, info: dict[str, Any], files: list[str], out: Path,
                  head: Any) -> dict[str, Any]:
    """The linear probe: CV over ``cv_grid`` then the final fit on every training row (``linear_loop``)."""
    from safetensors.torch import load_file

    result = run_workers(linear_loop, {"spec": spec, "cfg": cfg, "class_weights": info["class_weights"],
                                       "train_rows": info["train_rows"]}, cfg, datasets(files, spec, cfg), out,
                         "training")
    with result.checkpoint.as_directory() as d:
        head.load_state_dict(load_file(str(Path(d) / "head.safetensors")))
    rv = result.return_value
    cv, solver, held = rv["cv"], rv["solver"], rv["held_out"]
    if held:
        best = held
    elif cv:  # no held-out rows: the CV estimate of the chosen C
        i = cv["cs"].index(cv["best_c"])
        best = {"val_accuracy": cv["accuracy"][i], "val_loss": cv["log_loss"][i], "val_macro_f1": float("nan")}
    else:
        best = {"val_accuracy": float("nan"), "val_macro_f1": float("nan")}
    choice = (f"C = {solver['c']:.3g}" + (f" (chosen by {cfg.cv_folds}-fold CV, one-standard-error rule)" if cv else " (given)")
              + f", L-BFGS {solver['iterations']} iterations, max |gradient| {solver['grad_max']:.1e}"
              + ("" if solver["converged"] else " (NOT converged: raise max_iter)"))
    return {"solver": solver, "cv": cv, "held_out": held, "best": best, "history": [], "choice": choice,
            "confusion": rv["confusion"]}


def _train_mlp(cfg: TrainConfig, spec: HeadSpec, info: dict[str, Any], files: list[str], out: Path, head: Any,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """The MLP: mini-batch epochs with early stopping on the validation rows; then (``refit``) the same number of
    epochs from scratch on the training and validation rows together."""
    from safetensors.torch import load_file

    def load(d: Path) -> None:
        head.load_state_dict(load_file(str(d / "head.safetensors")))

    loop_cfg = {"spec": spec, "cfg": cfg, "class_weights": info["class_weights"]}
    fit = fit_on_ray(train_loop, loop_cfg, cfg, datasets(files, spec, cfg), out, "training", use_best=load)
    refit = None
    if cfg.refit:
        epochs = int(fit["best_epoch"])
        progress(f"refit: {epochs} epochs (the best of early stopping) on all {info['train_rows'] + info['val_rows']} "
                 "training and validation rows")
        again = fit_on_ray(train_loop, {**loop_cfg, "last": True}, cfg.model_copy(update={"epochs": epochs}),
                           datasets(files, spec, cfg, refit=True), out, "refitting", use_best=load)
        refit = {"epochs": epochs, "rows": info["train_rows"] + info["val_rows"],
                 "train_loss": again["history"][-1]["train_loss"],
                 "note": "the saved head is the refit one; the validation metrics are the early-stopping run's "
                         "(the refit head trained on those rows)"}
    return {**{k: fit[k] for k in ("best_epoch", "best", "epochs_run", "stopped_early", "history", "confusion")},
            "metric": cfg.metric, "refit": refit,
            "choice": f"best epoch {fit['best_epoch']}" + (f", refit on all rows for {refit['epochs']}" if refit
                                                            else "")}
