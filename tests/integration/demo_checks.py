"""What the demo test checks its vectors with: nearest-neighbour agreement, and the same images through the
pipeline's own steps with randomly initialised weights (the baseline pretrained features must beat)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.featx_side import featx_vectors


def nearest_neighbour_agreement(vectors: np.ndarray, labels: list[Any]) -> float:
    """Share of rows whose nearest other row (cosine) has the same label."""
    emb = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    lab = np.array(labels)
    return float((lab[sim.argmax(1)] == lab).mean())


def random_init_vectors(images: Path, weights: Path) -> dict[str, np.ndarray]:
    """The demo's images through the same pipeline with EfficientNet-Lite0 randomly initialised (timm, seed 0)."""
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), weights)
    return featx_vectors(sorted(images.glob("*.tar")), {"input": str(images), "format": "webdataset",
                                                        "model": "efficientnet-lite0", "weights": str(weights)})
