"""Image decoding on the embedding actor's own device: raw image bytes -> model-ready crops there.

For actors that decode their rows themselves (``image_decode: actors``) on a GPU: nvJPEG decodes and torch
resizes on the device, so no crop travels through the object store. The CPU preprocess step
(:mod:`operators.preprocess.transforms`) stays the reference: same geometry, same limits, its decoder for
every file the device decoder refuses.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

from operators.models.specs import ImagePreprocess
from operators.preprocess.transforms import DEFAULT_MAX_PIXELS, check_pixels, crop_box, decode_image


def decode_images_torch(payloads: list[bytes | None], pre: ImagePreprocess, device: str = "cuda",
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Any, list[str | None]]:
    """Decode + resize + centre-crop a batch on ``device``: (uint8 [N, crop, crop, 3] tensor there, errors).

    The GPU option of :func:`operators.preprocess.transforms.preprocess_images` for GPU actors: baseline
    RGB/greyscale JPEGs are decoded by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA), resized
    there with antialiasing (images of one size in one call) and cropped; anything else (PNG, CMYK,
    progressive files the decoder refuses) goes through :func:`operators.preprocess.transforms.decode_image`
    on the CPU. ``errors[i]`` is a message for a record that failed (its crop is zeros). The resize is
    torch's, not Pillow's: crops differ from the CPU path by a few grey levels.
    """
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    def decode_jpeg(data: Any, **kw: Any) -> Any:
        with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated (for TorchCodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            return tv_decode_jpeg(data, **kw)

    n = len(payloads)
    out = torch.zeros((n, pre.crop, pre.crop, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * n
    gpu: list[int] = []
    cpu: list[int] = []
    for i, data in enumerate(payloads):
        if not data:
            errors[i] = "no image bytes"
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only: format, mode and size
                check_pixels(*img.size, max_pixels)
                (gpu if img.format == "JPEG" and img.mode in ("RGB", "L") else cpu).append(i)
        except Exception as e:
            errors[i] = f"{type(e).__name__}: {e}"
    decoded: dict[int, torch.Tensor] = {}
    if gpu:
        datas = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in gpu]  # type: ignore[arg-type]
        try:
            decoded = dict(zip(gpu, decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)))
        except Exception:  # one bad file fails the batch call: decode one by one to find it
            for i, d in zip(gpu, datas):
                try:
                    decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                except Exception:
                    cpu.append(i)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, x in decoded.items():
        by_size.setdefault((int(x.shape[1]), int(x.shape[2])), []).append(i)
    mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
    for (h, w), idx in by_size.items():
        nw, nh, left, top = crop_box(w, h, pre)
        x = torch.stack([decoded[i] for i in idx]).float()
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
        x = x[:, :, top:top + pre.crop, left:left + pre.crop].round_().clamp_(0, 255).to(torch.uint8)
        out[torch.as_tensor(idx, device=device)] = x.permute(0, 2, 3, 1)
    for i in cpu:
        try:
            out[i] = torch.from_numpy(np.array(decode_image(payloads[i], pre, max_pixels))).to(device)  # type: ignore[arg-type]
        except Exception as e:
            errors[i] = f"{type(e).__name__}: {e}"
    return out, errors
