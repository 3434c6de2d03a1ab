"""Decoding on the embedding actor's device: the CPU preprocess step's crops, within a few grey levels."""
from __future__ import annotations

import numpy as np

from operators.embed.decode import decode_images_torch
from operators.models.specs import ImagePreprocess
from operators.preprocess.transforms import decode_image
from pipelines.demo.sample_data import crops

PRE = ImagePreprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_torch_decode_matches_pillow_within_a_few_grey_levels() -> None:
    jpgs = crops("coffee", 2, np.random.default_rng(1), size=320)
    out, errors = decode_images_torch(jpgs + [b"", b"junk"], PRE, device="cpu")
    assert tuple(out.shape) == (4, 224, 224, 3) and str(out.dtype) == "torch.uint8"
    assert errors[:2] == [None, None] and errors[2] and errors[3]
    for i, j in enumerate(jpgs):
        diff = np.abs(out[i].numpy().astype(int) - decode_image(j, PRE).astype(int))
        assert diff.mean() < 4, diff.mean()
