"""`featx finetune`: a registry backbone + a new head, trained end to end on the raw shards, with Ray Train.

- Data: the same readers and preprocessing as `featx embed` (Ray Data: read + preprocess tasks), records
  that fail to decode are left out (and counted), labels from a column (or the parent folder for image
  folders), a stable split by key hash.
- Freezing: the backbone's parameters are grouped from input to output (operators.models.backbones.layer_groups);
  only the top ``trainable_groups`` groups train at first, and ``unfreeze: {epoch: k}`` opens more of them
  as training goes on (gradual unfreezing). Frozen groups keep their weights and their BatchNorm statistics.
- Discriminative learning rates: the head at ``lr_head``, the backbone at the lower ``lr_backbone``.
- Data parallel over ``num_workers`` Ray Train workers: gradients are all-reduced by hand after each
  backward pass, so parameters unfrozen mid-training are synchronised too (DDP fixes its set at wrap time).
- Mixed precision (bf16, or fp16 with a grad scaler) on GPU.
- Output: ``backbone.safetensors`` (or a Hugging Face folder for text models) + ``model.json``, so the
  fine-tuned backbone is a registry model: ``featx embed --model finetuned:OUTPUT``; the head as for
  `featx train`; metrics (JSON, PNG) and the learning rates and trainable groups per epoch.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.errors import ConfigError, InputError, PipelineError
from operators.learn.heads import HeadSpec, build_head, save_head
from operators.learn.metrics import class_weights, confusion, scores
from operators.read.formats import FORMATS
from operators.models.registry import FINETUNED_CARD, ImagePreprocess, ModelSpec
from operators.io.storage import list_shards
from pipelines.config import FinetuneConfig
from pipelines.config import model_spec, read_options
from pipelines.learn.labels import encode, is_val_by_column, is_val_by_hash, label_map
from pipelines.learn.train import CHECKPOINT_EVERY, better, plot_history

Y, VAL = "_y", "_val"
_WHAT = "fine-tuning"


def _label_values(table: pa.Table, cfg: FinetuneConfig) -> list[Any]:
    if cfg.label_column == "folder":
        return [k.rsplit("/", 1)[0].rsplit("/", 1)[-1] if "/" in k else None for k in table[C.KEY].to_pylist()]
    if cfg.label_column not in table.column_names:
        raise InputError(f"label column {cfg.label_column!r} is not in the input {cfg.input!r} "
                         f"(columns: {', '.join(c for c in table.column_names if not C.is_internal(c))})")
    return table[cfg.label_column].to_pylist()


def _val_flags(table: pa.Table, cfg: FinetuneConfig) -> np.ndarray:
    if cfg.split_column:
        return is_val_by_column(table[cfg.split_column].to_pylist(), cfg.split_column)
    return is_val_by_hash(table[C.KEY].to_pylist(), cfg.val_fraction, cfg.seed)


def label_stats(batch: pa.Table, cfg: FinetuneConfig) -> pa.Table:
    """Per block: (label, split, ok) counts, for the label map (the rows stay in the cluster)."""
    ok = C.ok_mask(batch).to_numpy(zero_copy_only=False)
    labels = _label_values(batch, cfg)
    val = _val_flags(batch, cfg)
    counts = Counter((json.dumps(lab), bool(v), bool(o)) for lab, v, o in zip(labels, val, ok))
    return pa.table({"label": [k[0] for k in counts], "val": [k[1] for k in counts], "ok": [k[2] for k in counts],
                     "n": list(counts.values())})


def with_targets(batch: pa.Table, labels: list[Any], cfg: FinetuneConfig) -> pa.Table:
    ok = C.ok_mask(batch)
    y = encode(_label_values(batch, cfg), labels)
    val = _val_flags(batch, cfg)
    t = pa.table({C.INPUT: batch[C.INPUT], Y: pa.array(y), VAL: pa.array(val)})
    return t.filter(pc.and_(ok, pa.array(y >= 0)))


def keep_split(batch: pa.Table, val: bool) -> pa.Table:
    return batch.filter(batch[VAL] if val else pc.invert(batch[VAL])).drop_columns([VAL])


# ---- the worker ----------------------------------------------------------------------------------

class Model:
    """Backbone + head, with the freezing schedule and the per-group learning rates."""

    def __init__(self, spec: ModelSpec, head_spec: HeadSpec, cfg: FinetuneConfig, device: str) -> None:
        import torch

        from operators.models.backbones import layer_groups
        from operators.models.registry import load

        self.bb = load(spec, device)
        self.module = self.bb.module
        self.head = build_head(head_spec).to(self.bb.device)
        self.groups = layer_groups(self.module)
        params = dict(self.module.named_parameters())
        self.opt = torch.optim.AdamW(
            [{"params": [params[n] for _, names in self.groups for n in names], "lr": cfg.lr_backbone, "name": "backbone"},
             {"params": list(self.head.parameters()), "lr": cfg.lr_head, "name": "head"}],
            weight_decay=cfg.weight_decay,
        )
        self.trainable = 0
        self.set_trainable(cfg.trainable_groups)

    def set_trainable(self, k: int) -> list[str]:
        """Train the top ``k`` groups (-1: all); freeze the rest, their BatchNorm statistics included."""
        import torch

        k = len(self.groups) if k < 0 else min(k, len(self.groups))
        self.trainable = k
        opened = self.groups[len(self.groups) - k:] if k else []
        open_names = {n for _, names in opened for n in names}
        for n, p in self.module.named_parameters():
            p.requires_grad_(n in open_names)
        self.module.train()
        for sub in self.module.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in sub.parameters(recurse=False)):
                sub.eval()  # a frozen layer keeps its running statistics too
        return [g for g, _ in opened]

    def forward(self, batch: pa.Table) -> Any:
        import torch

        pre = self.bb.spec.preprocessing
        if isinstance(pre, ImagePreprocess):
            from operators.embed.embedder import image_array

            x = self.bb.image_batch(image_array(batch[C.INPUT], pre.crop))
            return self.head(self.bb.pooled(x))
        from operators.embed.embedder import pad_ids

        col = batch[C.INPUT].combine_chunks()
        offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
        ids, mask = pad_ids([values[offsets[i]:offsets[i + 1]] for i in range(len(col))])
        dev = self.bb.device
        return self.head(self.bb.pooled(torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)))

    def parameters(self) -> list[Any]:
        return [p for g in self.opt.param_groups for p in g["params"]]


def _sync_grads(params: list[Any]) -> None:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def _all_reduce(arr: np.ndarray) -> np.ndarray:
    from pipelines.learn.train import _all_reduce as reduce

    return reduce(arr)


def finetune_loop(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    import ray.train
    from ray.train import Checkpoint

    from operators.models.backbones import autocast

    spec: ModelSpec = config["spec"]
    head_spec: HeadSpec = config["head_spec"]
    cfg: FinetuneConfig = config["cfg"]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model = Model(spec, head_spec, cfg, device)
    weights = torch.tensor(config["class_weights"], device=model.bb.device) if config["class_weights"] else None
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and device == "cuda" else None
    rank = ray.train.get_context().get_world_rank()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    n = head_spec.n_classes
    history: list[dict[str, Any]] = []
    best, stale = None, 0
    best_state: tuple[Any, ...] = ()
    open_groups = model.set_trainable(cfg.trainable_groups)
    for epoch in range(cfg.epochs):
        if epoch in cfg.unfreeze:
            open_groups = model.set_trainable(cfg.unfreeze[epoch])
        t0 = time.perf_counter()
        loss_sum, rows = 0.0, 0
        model.head.train()
        for batch in train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                              local_shuffle_buffer_size=cfg.batch_size * 4,
                                              local_shuffle_seed=cfg.seed + epoch):
            y = torch.from_numpy(batch[Y].to_numpy()).to(model.bb.device)
            model.opt.zero_grad(set_to_none=True)
            with autocast(model.bb.device, cfg.precision if device == "cuda" else "fp32"):
                loss = torch.nn.functional.cross_entropy(model.forward(batch).float(), y, weight=weights)
            (scaler.scale(loss) if scaler else loss).backward()
            _sync_grads(model.parameters())
            if scaler:
                scaler.step(model.opt)
                scaler.update()
            else:
                model.opt.step()
            loss_sum += float(loss.detach()) * len(y)
            rows += len(y)
        cm, vloss = np.zeros((n, n)), 0.0
        model.module.eval()
        model.head.eval()
        with torch.no_grad():
            for batch in val_shard.iter_batches(batch_size=cfg.batch_size * 2, batch_format="pyarrow"):
                y = torch.from_numpy(batch[Y].to_numpy()).to(model.bb.device)
                logits = model.forward(batch).float()
                vloss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                cm += confusion(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), n)
        model.set_trainable(model.trainable)  # back to train mode, frozen BatchNorms stay in eval
        tot = _all_reduce(np.concatenate([[loss_sum, rows, vloss], cm.reshape(-1)]))
        cm = tot[3:].reshape(n, n)
        metrics = {"epoch": epoch + 1, "train_loss": tot[0] / max(tot[1], 1), "val_loss": tot[2] / max(cm.sum(), 1),
                   **{f"val_{k}": v for k, v in scores(cm).items()}, "seconds": time.perf_counter() - t0,
                   "trainable_groups": open_groups, "lr": {g["name"]: g["lr"] for g in model.opt.param_groups}}
        history.append(metrics)
        value = metrics["val_loss"] if cfg.metric == "loss" else metrics[f"val_{cfg.metric}"]
        improved = better(cfg.metric, value, best)
        if improved:
            best, stale = value, 0
        else:
            stale += 1
        stop = stale >= cfg.patience
        report = {**metrics, "best": best, "stopped_early": stop}
        if improved:  # the best weights so far, in memory; checkpointed at the end (and every few epochs)
            best_state = ({k: v.detach().cpu().clone().contiguous() for k, v in model.module.state_dict().items()},
                          {k: v.detach().cpu().clone().contiguous() for k, v in model.head.state_dict().items()},
                          cm.astype(int).tolist())
        last = stop or epoch == cfg.epochs - 1
        if rank == 0 and (last or (epoch + 1) % CHECKPOINT_EVERY == 0):
            with tempfile.TemporaryDirectory() as d:
                from safetensors.torch import save_file

                save_file(best_state[0], os.path.join(d, "backbone.safetensors"))
                save_file(best_state[1], os.path.join(d, "head.safetensors"))
                Path(d, "confusion.json").write_text(json.dumps(best_state[2]))
                ray.train.report(report, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
        if stop:
            break
    return {"history": history, "stopped_early": bool(history) and stale >= cfg.patience}


# ---- the driver ----------------------------------------------------------------------------------

def run_finetune(cfg: FinetuneConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from operators.read.loading import load_pieces
    from pipelines.runtime import init_ray
    from pipelines.embed.plan import plan_pieces

    t_start = time.perf_counter()
    spec = model_spec(cfg)
    shards = list_shards(cfg.input, FORMATS[cfg.format].extensions, cfg.storage_options)
    if cfg.label_column == "folder" and cfg.format != "images":
        raise ConfigError("label_column: folder reads the class from image folders (format: images) only")
    init_ray(cfg.ray_address)
    pieces = plan_pieces(shards, 64, 64 << 20)
    items = [{"piece": p.id, "shards": json.dumps([s.to_dict() for s in p.shards])} for p in pieces]
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        load_pieces, fn_args=(read_options(cfg), spec.preprocessing), batch_size=1, batch_format="pyarrow")
    rows = rows.materialize()  # decoded once, reused every epoch (it stays in the object store, not the driver)
    stats = rows.map_batches(label_stats, fn_args=(cfg,), batch_format="pyarrow", batch_size=None).take_all()
    train_c, val_c, bad = Counter(), Counter(), 0
    for r in stats:
        if not r["ok"]:
            bad += r["n"]
            continue
        (val_c if r["val"] else train_c)[json.loads(r["label"])] += r["n"]
    labels = label_map(train_c, val_c, cfg.label_column)
    counts = np.array([train_c[lab] for lab in labels])
    head_spec = HeadSpec(kind=cfg.head, dim=0, labels=labels, hidden=cfg.hidden, dropout=cfg.dropout,
                         model={"model": spec.name, "base": cfg.model})
    from operators.models.registry import load

    head_spec.dim = int(spec.dim or load(spec, "cpu").dim)
    progress(f"featx finetune: {int(counts.sum())} training and {sum(val_c.values())} validation records "
             f"({bad} undecodable left out), {len(labels)} classes, {spec.name} at {_size(spec)}")
    targets = rows.map_batches(with_targets, fn_args=(labels, cfg), batch_format="pyarrow", batch_size=None)
    # materialized before training: the workers may hold every CPU, and a lazy pipeline would then wait forever
    datasets = {"train": targets.map_batches(keep_split, fn_args=(False,), batch_format="pyarrow", batch_size=None).materialize(),
                "val": targets.map_batches(keep_split, fn_args=(True,), batch_format="pyarrow", batch_size=None).materialize()}
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        finetune_loop,
        train_loop_config={"spec": spec, "head_spec": head_spec, "cfg": cfg,
                           "class_weights": class_weights(counts).tolist() if cfg.class_weighting == "balanced" else None},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"ray-train-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", storage_path=str(out / "_ray"), checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError: the workers' error snippets are in the message
        raise PipelineError(f"{_WHAT} failed in a Ray Train worker: {str(e)[:4000]}") from e
    if result.error is not None:
        raise PipelineError(f"fine-tuning failed: {result.error}")
    if result.checkpoint is None:
        raise PipelineError("fine-tuning produced no checkpoint")
    history = result.return_value["history"]  # rank 0's: every epoch (result.metrics stop at the last checkpoint)
    with result.checkpoint.as_directory() as d:
        _save_model(out, spec, cfg, Path(d), head_spec)
        confusion_m = json.loads(Path(d, "confusion.json").read_text())
    best_i = max(range(len(history)), key=lambda i: -history[i]["val_loss"] if cfg.metric == "loss"
                 else history[i][f"val_{cfg.metric}"])
    summary = {"input": cfg.input, "model": spec.name, "registered_as": f"finetuned:{out}", "classes": len(labels),
               "labels": labels, "train_rows": int(counts.sum()), "val_rows": int(sum(val_c.values())),
               "undecodable_rows": bad, "best_epoch": history[best_i]["epoch"], "best": history[best_i],
               "epochs_run": len(history), "seconds": round(time.perf_counter() - t_start, 2), "history": history,
               "confusion": confusion_m, "config": cfg.public_dict()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_history(history, out / "metrics.png", title=f"fine-tuning {spec.name}")
    progress(f"best epoch {summary['best_epoch']}: val accuracy {summary['best']['val_accuracy']:.3f}; "
             f"embed with it: featx embed --model finetuned:{out}")
    return summary


def _size(spec: ModelSpec) -> str:
    pre = spec.preprocessing
    return f"{pre.crop}x{pre.crop}" if isinstance(pre, ImagePreprocess) else f"max_length {pre.max_length}"


def _save_model(out: Path, spec: ModelSpec, cfg: FinetuneConfig, ckpt: Path, head_spec: HeadSpec) -> None:
    """Fine-tuned backbone (registry-loadable: finetuned:OUT) + head, from the best checkpoint."""
    from safetensors.torch import load_file

    from operators.models.registry import load

    state = load_file(str(ckpt / "backbone.safetensors"))
    if spec.loader == "load_hf_text":
        bb = load(spec, "cpu")
        bb.module.load_state_dict(state)
        folder = out / "backbone"
        bb.module.save_pretrained(folder, safe_serialization=True)
        tok = spec.preprocessing.tokenizer  # type: ignore[union-attr]
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if os.path.exists(os.path.join(tok, f)):
                shutil.copy(os.path.join(tok, f), folder / f)
        weights = "backbone"
    else:
        shutil.copy(ckpt / "backbone.safetensors", out / "backbone.safetensors")
        weights = "backbone.safetensors"
    card = {"base": cfg.model, "weights": weights, "pooling": cfg.pooling,
            "image_size": cfg.image_size, "labels": head_spec.labels, "created_by": "featx finetune"}
    (out / FINETUNED_CARD).write_text(json.dumps(card, indent=1, default=str))
    head = build_head(head_spec)
    head.load_state_dict(load_file(str(ckpt / "head.safetensors")))
    save_head(out / "head", head, head_spec)
