"""Inference-only graph rewrites for frozen backbones: batch norm folded into the convolution before it.

A frozen CNN in eval mode runs every BatchNorm as a separate pass over its activations: the scale and
shift are constants, so they can go into the preceding convolution's weights and bias instead
(``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``), and the norm
layer becomes its activation alone (or nothing). The forward pass gets faster (figures in
benchmarks/README.md); the vectors move by float rounding only.

The pairs are found by tracing the module with ``torch.fx`` (convolutions and norms as leaves), so a
conv -> norm pair is folded only where the norm's one input is that conv's output and nothing else reads
that output. The module tree is then edited in place, so the model keeps its own ``forward`` and helper
methods. A model that cannot be traced is left as it is. Never used for training: folded norms do not
learn.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("featx")


def _trace(root: nn.Module, fn: Callable[[torch.Tensor], Any]) -> Any:
    """The fx graph of ``fn(x)`` (which calls ``root``'s modules), stopping at convolutions and norms."""
    import torch.fx as fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)

    class Entry(nn.Module):  # module names in the graph: "inner.<name in root>"
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Any:
            return fn(x)

    return Tracer().trace(Entry(root))


def _activation_only(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a norm layer once its affine map is folded away, or None where it is not known."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    # timm's BatchNormAct2d (and look-alikes): norm, then dropout, then activation
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module) and type(bn).__name__ == "BatchNormAct2d":
        return nn.Sequential(drop, act)
    return None


def _plain_conv(conv: nn.Module) -> bool:
    """A convolution whose forward uses its ``weight`` and ``bias`` as stored (so folding into them holds).

    Not: weight-standardising convs (timm's StdConv2d: the folded scale would be normalised away),
    parametrised weights (weight_norm and the like recompute ``weight``), modules with hooks.
    timm's Conv2dSame only pads its input first, which folding does not touch.
    """
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return False
    if type(conv).forward is not nn.Conv2d.forward and type(conv).__name__ != "Conv2dSame":
        return False
    return not nn.utils.parametrize.is_parametrized(conv) and not _hooked(conv)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Put ``bn``'s eval-mode affine map into ``conv``'s weight and bias (in place)."""
    with torch.no_grad():
        assert bn.running_mean is not None and bn.running_var is not None
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        b = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(b.to(conv.bias.dtype))


def _set(root: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)


def fold_batchnorm(root: nn.Module, fn: Callable[[torch.Tensor], Any] | None = None) -> int:
    """Fold every eval-mode conv -> BatchNorm2d pair that ``fn(x)`` (default ``root(x)``) runs; returns
    how many were folded (0 where the model cannot be traced: it then runs as it is)."""
    if root.training:
        raise ValueError("fold_batchnorm is for frozen models in eval mode; call .eval() first")
    try:
        graph = _trace(root, fn or root)
    except Exception as e:  # data-dependent control flow and the like
        log.debug("batch-norm folding skipped: %s cannot be traced (%s)", type(root).__name__, e)
        return 0
    base = "inner."
    mods = dict(root.named_modules())
    calls: dict[str, int] = {}
    read: set[str] = set()  # modules whose tensors the graph reads directly (tied or shared weights)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(str(node.target).rpartition(".")[0])
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = mods.get(node.target.removeprefix(base))
        src = node.args[0]
        if not isinstance(bn, nn.BatchNorm2d) or not hasattr(src, "op") or src.op != "call_module":
            continue
        conv = mods.get(src.target.removeprefix(base))
        if conv is None or not _plain_conv(conv) or len(src.users) != 1:
            continue
        if bn.training or bn.running_var is None or bn.running_mean is None or _hooked(bn):
            continue
        if calls[node.target] != 1 or calls[src.target] != 1 or conv.out_channels != bn.num_features:
            continue
        if node.target in read or src.target in read:
            continue
        rest = _activation_only(bn)
        if rest is None:
            continue
        fold_into_conv(conv, bn)
        _set(root, node.target.removeprefix(base), rest)
        folded += 1
    log.debug("folded %d batch norms of %s into their convolutions", folded, type(root).__name__)
    return folded
