"""Batch-norm folding (operators.models.fold): the same outputs, fewer layers, and only where it is safe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from operators.models.fold import fold_batchnorm
from operators.models.registry import load, resolve


def _random_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("ctor, pairs", [(torchvision.models.resnet18, 20), (torchvision.models.mobilenet_v3_small, 34)])
def test_torchvision_cnns_fold_every_norm_with_the_same_outputs(ctor, pairs):
    torch.manual_seed(0)
    model = _random_stats(ctor())
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ref = model(x)
    assert fold_batchnorm(model) == pairs
    assert _norms(model) == 0
    with torch.inference_mode():
        out = model(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_featx_inference_load_folds_timm_norm_act_layers_and_keeps_the_vectors():
    spec = resolve("efficientnet-lite0")
    stock, folded = load(spec, "cpu"), load(spec, "cpu", for_inference=True)
    assert stock.folded == 0 and _norms(stock.module) == 49
    assert folded.folded == 49 and _norms(folded.module) == 0  # timm's BatchNormAct2d keeps only its ReLU6
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    a, b = stock.embed_images(pixels), folded.embed_images(pixels)
    assert np.abs(a - b).max() < 1e-4
    assert np.all(np.sum(a * b, axis=1) > 0.99999)


class _StdConv(nn.Conv2d):
    """Weight-standardising conv (as timm's StdConv2d): a folded scale would be normalised away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_convs_that_rework_their_weight_are_not_folded():
    torch.manual_seed(0)
    std = _random_stats(nn.Sequential(_StdConv(3, 4, 3), nn.BatchNorm2d(4)))
    normed = _random_stats(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    hooked = _random_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    hooked[0].register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(2, 3, 12, 12)
    for model in (std, normed, hooked):
        with torch.inference_mode():
            ref = model(x)
        assert fold_batchnorm(model) == 0
        assert isinstance(model[1], nn.BatchNorm2d)
        with torch.inference_mode():
            assert torch.equal(model(x), ref)


class _Branchy(nn.Module):
    """conv1's output feeds its norm AND a second path: folding would change that second path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(h))) + h


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # fx cannot trace a branch on a value
            return self.bn(self.conv(x))
        return self.conv(x)


def test_a_conv_read_elsewhere_is_not_folded():
    torch.manual_seed(0)
    model = _random_stats(_Branchy())
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = model(x)
    assert fold_batchnorm(model) == 1  # conv2 -> bn2 only
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    with torch.inference_mode():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_untraceable_models_run_as_they_are():
    model = _random_stats(_DataDependent())
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        ref = model(x)
    assert fold_batchnorm(model) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.inference_mode():
        assert torch.equal(model(x), ref)


def test_training_models_are_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(torchvision.models.resnet18().train())
