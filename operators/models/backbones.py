"""A loaded frozen backbone and the machinery its family loaders share.

:class:`Backbone` is a module in eval mode plus its pooled forward, and runs batches on its device;
the loaders of :mod:`operators.models.loaders` build one. Also here: safe state-dict loading
(safetensors, or ``torch.load(..., weights_only=True)``), the pooling of text encoders, autocast, and
the layer groups that fine-tuning freezes and unfreezes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from operators.errors import ModelLoadError
from operators.models.specs import ImagePreprocess, ModelSpec


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
        Off by default: on CPU it gains little for its compile time; on a GPU, where fusing kernels pays
        more, measure with ``benchmarks/gpu_check.py``."""
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


def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise ModelLoadError(f"weights {source!r} do not fit the architecture: {msg}") from e


def frozen(spec: ModelSpec, module: torch.nn.Module, features: Callable[..., torch.Tensor], dim: int, device: str,
           mask_optional: bool = False) -> Backbone:
    """The backbone of a loaded model: eval mode, no gradients, on ``device`` (channels-last on CUDA).

    ``features`` may be ``module`` itself or call it: the module is moved in place.
    """
    dev = torch.device(device)
    module.eval().requires_grad_(False)
    module = module.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else module.to(dev)
    return Backbone(spec, module, features, dim=dim, device=dev, mask_optional=mask_optional)


def text_backbone(spec: ModelSpec, module: torch.nn.Module, hidden_states: Callable[..., torch.Tensor], dim: int,
                  device: str, mask_optional: bool = False) -> Backbone:
    """A text encoder's backbone: (ids, mask) -> last hidden state, pooled as the spec says (mean over real
    tokens, or CLS)."""
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

    return frozen(spec, module, feats, dim, device, mask_optional=mask_optional)


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
