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
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.errors import ConfigError, InputError
from operators.io.storage import list_shards
from operators.learn.heads import HeadSpec, build_head, save_head
from operators.learn.metrics import class_weights, confusion
from operators.models.registry import FINETUNED_CARD, ImagePreprocess, ModelSpec
from operators.read.formats import FORMATS
from pipelines.config import FinetuneConfig, model_spec, read_options
from pipelines.learn.engine import (EpochSums, dataset_shards, fit_on_ray, run_epoch, save_metrics, split_datasets,
                                    worker_epochs)
from pipelines.learn.labels import VAL, Y, encode, label_map, split_flags


def _label_values(table: pa.Table, cfg: FinetuneConfig) -> list[Any]:
    if cfg.label_column == "folder":
        return [k.rsplit("/", 1)[0].rsplit("/", 1)[-1] if "/" in k else None for k in table[C.KEY].to_pylist()]
    if cfg.label_column not in table.column_names:
        raise InputError(f"label column {cfg.label_column!r} is not in the input {cfg.input!r} "
                         f"(columns: {', '.join(c for c in table.column_names if not C.is_internal(c))})")
    return table[cfg.label_column].to_pylist()


def label_stats(batch: pa.Table, cfg: FinetuneConfig) -> pa.Table:
    """Per block: (label, split, ok) counts, for the label map (the rows stay in the cluster)."""
    ok = C.ok_mask(batch).to_numpy(zero_copy_only=False)
    counts = Counter((json.dumps(lab), bool(v), bool(o))
                     for lab, v, o in zip(_label_values(batch, cfg), split_flags(batch, cfg), ok))
    return pa.table({"label": [k[0] for k in counts], "val": [k[1] for k in counts], "ok": [k[2] for k in counts],
                     "n": list(counts.values())})


def with_targets(batch: pa.Table, labels: list[Any], cfg: FinetuneConfig) -> pa.Table:
    """Decoded records -> model input, class index (Y) and validation flag (VAL); undecodable rows left out."""
    y = encode(_label_values(batch, cfg), labels)
    t = pa.table({C.INPUT: batch[C.INPUT], Y: pa.array(y), VAL: pa.array(split_flags(batch, cfg))})
    return t.filter(pc.and_(C.ok_mask(batch), pa.array(y >= 0)))


# ---- the worker ----------------------------------------------------------------------------------

class Model:
    """Backbone + head, with the freezing schedule, the per-group learning rates, a step and an evaluation."""

    def __init__(self, spec: ModelSpec, head_spec: HeadSpec, cfg: FinetuneConfig, device: str,
                 weights: list[float] | None) -> None:
        import torch

        from operators.models.backbones import layer_groups
        from operators.models.registry import load

        self.bb = load(spec, device)
        self.module = self.bb.module
        self.head = build_head(head_spec).to(self.bb.device)
        self.n_classes = head_spec.n_classes
        self.groups = layer_groups(self.module)
        params = dict(self.module.named_parameters())
        self.opt = torch.optim.AdamW(
            [{"params": [params[n] for _, names in self.groups for n in names], "lr": cfg.lr_backbone,
              "name": "backbone"},
             {"params": list(self.head.parameters()), "lr": cfg.lr_head, "name": "head"}],
            weight_decay=cfg.weight_decay,
        )
        self.weights = torch.tensor(weights, device=self.bb.device) if weights else None
        self.precision = cfg.precision if device == "cuda" else "fp32"
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and device == "cuda" else None
        self.trainable = 0
        self.open_groups = self.set_trainable(cfg.trainable_groups)

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
        self.head.train()
        for sub in self.module.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in sub.parameters(recurse=False)):
                sub.eval()  # a frozen layer keeps its running statistics too
        self.open_groups = [g for g, _ in opened]
        return self.open_groups

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

    def targets(self, batch: pa.Table) -> Any:
        import torch

        return torch.tensor(batch[Y].to_numpy()).to(self.bb.device)  # a copy: Arrow's buffer is read-only

    def step(self, batch: pa.Table) -> tuple[float, int]:
        """One optimizer step (mixed precision, gradients all-reduced by hand); (summed loss, rows)."""
        import torch

        from operators.models.backbones import autocast

        y = self.targets(batch)
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.bb.device, self.precision):
            loss = torch.nn.functional.cross_entropy(self.forward(batch).float(), y, weight=self.weights)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        _sync_grads([p for g in self.opt.param_groups for p in g["params"]])
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return float(loss.detach()) * len(y), len(y)

    def evaluate(self, batch: pa.Table) -> tuple[np.ndarray, float]:
        """(confusion matrix, summed loss) in eval mode; ``set_trainable`` puts training mode back."""
        import torch

        self.module.eval()
        self.head.eval()
        y = self.targets(batch)
        with torch.no_grad():
            logits = self.forward(batch).float()
            loss = float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        return confusion(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), self.n_classes), loss

    def states(self) -> dict[str, dict[str, Any]]:
        return {"backbone": self.module.state_dict(), "head": self.head.state_dict()}


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


def finetune_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: gradual unfreezing around the engine's epochs."""
    import torch

    cfg: FinetuneConfig = config["cfg"]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model = Model(config["spec"], config["head_spec"], cfg, device, config["class_weights"])
    train, val = dataset_shards()

    def one_epoch(epoch: int) -> EpochSums:
        if epoch in cfg.unfreeze:
            model.set_trainable(cfg.unfreeze[epoch])
        batches = train.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=cfg.batch_size * 4, local_shuffle_seed=cfg.seed + epoch)
        val_batches = val.iter_batches(batch_size=cfg.batch_size * 2, batch_format="pyarrow")
        sums = run_epoch(batches, model.step, val_batches, model.evaluate, model.n_classes)
        sums.extra = {"trainable_groups": model.open_groups, "lr": {g["name"]: g["lr"] for g in model.opt.param_groups}}
        model.set_trainable(model.trainable)  # back to train mode, frozen BatchNorms stay in eval
        return sums

    return worker_epochs(cfg, one_epoch, keep=model.states)


# ---- the driver ----------------------------------------------------------------------------------

def prepare(cfg: FinetuneConfig, spec: ModelSpec,
            progress: Callable[[str], None]) -> tuple[HeadSpec, dict[str, Any], dict[str, Any]]:
    """Decode the records once (Ray Data), count labels per split: the head's spec, the counts, the datasets."""
    import ray.data

    from operators.models.registry import load
    from operators.read.loading import load_pieces
    from pipelines.embed.plan import plan_pieces
    from pipelines.runtime import init_ray

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
    head_spec = HeadSpec(kind=cfg.head, dim=int(spec.dim or load(spec, "cpu").dim), labels=labels, hidden=cfg.hidden,
                         dropout=cfg.dropout, model={"model": spec.name, "base": cfg.model})
    info = {"train_rows": int(counts.sum()), "val_rows": int(sum(val_c.values())), "undecodable_rows": bad,
            "class_weights": class_weights(counts).tolist() if cfg.class_weighting == "balanced" else None}
    progress(f"featx finetune: {info['train_rows']} training and {info['val_rows']} validation records "
             f"({bad} undecodable left out), {len(labels)} classes, {spec.name} at {_size(spec)}")
    targets = rows.map_batches(with_targets, fn_args=(labels, cfg), batch_format="pyarrow", batch_size=None)
    return head_spec, info, split_datasets(targets)


def run_finetune(cfg: FinetuneConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune; returns the summary also saved as ``OUTPUT/metrics.json``."""
    t_start = time.perf_counter()
    spec = model_spec(cfg)
    head_spec, info, datasets = prepare(cfg, spec, progress)
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    loop_config = {"spec": spec, "head_spec": head_spec, "cfg": cfg, "class_weights": info["class_weights"]}
    fit = fit_on_ray(finetune_loop, loop_config, cfg, datasets, out, "fine-tuning",
                     use_best=lambda d: _save_model(out, spec, cfg, d, head_spec), num_to_keep=1)
    summary = {"input": cfg.input, "model": spec.name, "registered_as": f"finetuned:{out}",
               "classes": head_spec.n_classes, "labels": head_spec.labels,
               **{k: info[k] for k in ("train_rows", "val_rows", "undecodable_rows")},
               **{k: fit[k] for k in ("best_epoch", "best", "epochs_run")},
               "seconds": round(time.perf_counter() - t_start, 2), "history": fit["history"],
               "confusion": fit["confusion"], "config": cfg.public_dict()}
    save_metrics(out, summary, title=f"fine-tuning {spec.name}")
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
    if spec.modality == "text":  # a Hugging Face model: saved as a folder, with its tokenizer
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
