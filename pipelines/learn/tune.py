"""`featx tune`: a Ray Tune grid search over head hyperparameters (lr, weight decay, hidden size, dropout...).

Each trial is a light trial on the embeddings: the training and validation rows are read once, by a Ray
task, into the object store (not through the driver), and every trial trains its head on them with the
same training engine as `featx train` (pipelines.learn.engine), reporting validation metrics each epoch and
stopping early on its own. The grid's best trial (by the validation metric) and a table of all trials are saved, with
the best config as a YAML that `featx train --config` takes as it is.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import yaml

from operators import columns as C
from operators.errors import PipelineError
from operators.learn.heads import HeadSpec, build_head, features
from operators.search.topk import vectors_from_arrow
from pipelines.config import TrainConfig, TuneConfig
from pipelines.learn.engine import EpochSums, epoch_loop, head_epoch
from pipelines.learn.labels import Y, keep_split
from pipelines.learn.train import prepare, read_rows


def load_arrays(files: list[str], spec: HeadSpec, cfg: TrainConfig) -> dict[str, np.ndarray]:
    """Ray task: the train/val features (before the scaler) and class indexes, as numpy arrays."""
    rows = [read_rows(uri, spec, cfg) for uri in files]
    out = {}
    for val, name in ((False, "train"), (True, "val")):
        t = pa.concat_tables([keep_split(r, val) for r in rows])
        out[f"x_{name}"] = vectors_from_arrow(t[C.EMBEDDING], spec.dim)
        out[f"y_{name}"] = t[Y].to_numpy()
    return out


def trial(config: dict[str, Any], data_ref: list[Any], base: TrainConfig, base_spec: HeadSpec,
          class_weights: list[float] | None) -> None:
    """One grid point: a head on the arrays in the object store; the epochs (and the reports) are the engine's."""
    import ray
    import torch
    from ray import tune

    cfg = base.model_copy(update=config)
    spec = dataclasses.replace(base_spec, kind=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout,
                               scaler=base_spec.scaler if cfg.standardize else {})
    data = ray.get(data_ref[0])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    head = build_head(spec)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = torch.tensor(class_weights) if class_weights and cfg.class_weighting == "balanced" else None
    xt, yt = features(data["x_train"], spec, train=True), torch.from_numpy(data["y_train"])
    val = [(features(data["x_val"], spec, train=False), torch.from_numpy(data["y_val"]))]
    rng = np.random.default_rng(cfg.seed)

    def one_epoch(epoch: int) -> EpochSums:
        order = torch.from_numpy(rng.permutation(len(yt)))
        batches = (order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size))
        return head_epoch(head, opt, weights, spec.n_classes, ((xt[i], yt[i]) for i in batches), val)

    epoch_loop(cfg, one_epoch, tune.report)


def run_tune(cfg: TuneConfig, output: str, progress: Callable[[str], None] = print) -> dict[str, Any]:
    import ray
    from ray import tune

    from pipelines.runtime import init_ray

    t_start = time.perf_counter()
    base = cfg.train
    init_ray(base.ray_address)
    spec, info, files = prepare(base)
    data_ref = ray.remote(num_cpus=0.5)(load_arrays).remote(files, spec, base)
    n_trials = int(np.prod([len(v) for v in cfg.grid.values()]))
    progress(f"featx tune: {n_trials} trials over {', '.join(cfg.grid)} on {info['train_rows']} training rows")
    out = Path(output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    mode = "min" if base.metric == "loss" else "max"
    trainable = tune.with_resources(
        tune.with_parameters(trial, data_ref=[data_ref], base=base, base_spec=spec,
                             class_weights=info["class_weights"]),
        {"cpu": cfg.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in cfg.grid.items()},
        tune_config=tune.TuneConfig(metric="best", mode=mode, max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(name="ray-tune", storage_path=str(out / "_ray"), verbose=0),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise PipelineError(f"{len(errors)} of {len(results)} trials failed; first: {errors[0]}")
    rows = []
    for r in results:
        rows.append({**{k: r.config[k] for k in cfg.grid}, "best": r.metrics["best"], "epochs": r.metrics["epoch"],
                     "val_accuracy_last": r.metrics["val_accuracy"], "val_macro_f1_last": r.metrics["val_macro_f1"]})
    rows.sort(key=lambda row: row["best"], reverse=(mode == "max"))
    best = results.get_best_result(metric="best", mode=mode)
    best_cfg = base.model_copy(update={k: best.config[k] for k in cfg.grid})
    summary = {"metric": base.metric, "mode": mode, "best_value": best.metrics["best"],
               "best_params": {k: best.config[k] for k in cfg.grid}, "trials": rows, "n_trials": len(rows),
               "seconds": round(time.perf_counter() - t_start, 2), **info}
    (out / "trials.json").write_text(json.dumps(summary, indent=1, default=str))
    _write_csv(out / "trials.csv", rows)
    (out / "best.yaml").write_text(yaml.safe_dump(best_cfg.public_dict() | {"output": str(out / "best-head")},
                                                  sort_keys=False))
    progress(f"best {base.metric} {summary['best_value']:.4f} with {summary['best_params']}; "
             f"train it: featx train --config {out / 'best.yaml'}")
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
