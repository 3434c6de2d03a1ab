"""CPU preprocessing: pure functions on record tables, run in Ray tasks.

Images: decode (JPEG draft mode at reduced size where the model allows), RGB,
resize the shorter side, centre crop -> uint8 HxWx3 in a fixed_size_binary
column. The model's mean/std normalisation is applied by the embedder on its
device: a uint8 crop is 4x smaller than float32 in the object store and on
the PCIe bus, and the arithmetic is free on a GPU.

Text: tokenize with truncation to the model's max length -> unpadded
list<int32> ids; padding happens per batch in the embedder (length buckets).

A record that fails becomes an error row (stage, type, message); never dropped.
"""
from __future__ import annotations

import io
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from operators import columns as C
from operators.errors import ModelLoadError
from operators.faults import crash_on_keys
from operators.models.specs import ImagePreprocess, TextPreprocess

DEFAULT_MAX_PIXELS = 64_000_000  # beyond this an image is treated as a decompression bomb
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageTooLarge(ValueError):
    pass


def check_pixels(w: int, h: int, max_pixels: int) -> None:
    """Refuse an image whose header promises more than ``max_pixels`` pixels (a decompression bomb?)."""
    if w * h > max_pixels:
        raise ImageTooLarge(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")


def crop_box(w: int, h: int, pre: ImagePreprocess) -> tuple[int, int, int, int]:
    """(width, height, left, top): a ``w`` x ``h`` image resized so that its shorter side is ``resize``, and
    where the centre crop of ``crop`` starts in it."""
    s = pre.resize / min(w, h)
    nw, nh = max(pre.crop, round(w * s)), max(pre.crop, round(h * s))
    return nw, nh, (nw - pre.crop) // 2, (nh - pre.crop) // 2


def decode_image(data: bytes, pre: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 [crop, crop, 3] following the model's own preprocessing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        check_pixels(w, h, max_pixels)
        if img.format == "JPEG":
            # decode at the smallest DCT scale whose shorter side still covers `resize`
            scale = min(w, h) / pre.resize
            if scale >= 2:
                img.draft("RGB", (int(np.ceil(w / scale)), int(np.ceil(h / scale))))
        if img.mode != "RGB":  # an RGB file is used as decoded (convert would copy it)
            img = img.convert("RGB")
    w, h = img.size
    nw, nh, left, top = crop_box(w, h, pre)
    # resize the shorter side to `resize`, then centre-crop `crop`: only the crop's source box is resampled
    # (the same filter and scale as resizing the whole image, the same pixels up to float rounding, and
    # faster: see benchmarks/README.md)
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + pre.crop) * sx, (top + pre.crop) * sy)
    img = img.resize((pre.crop, pre.crop), _RESAMPLE[pre.interpolation], box=box)
    arr = np.asarray(img, dtype=np.uint8)
    assert arr.shape == (pre.crop, pre.crop, 3), arr.shape
    return arr


def preprocess_images(table: pa.Table, pre: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Replace the raw payload by the model-ready crop; failures become error rows."""
    n = table.num_rows
    size = pre.crop * pre.crop * 3
    out = np.zeros((n, size), dtype=np.uint8)
    valid = np.zeros(n, dtype=bool)
    stages, types, msgs = C.read_errors(table)
    payloads = table[C.PAYLOAD].to_pylist()
    keys = table[C.KEY].to_pylist()
    crash_on_keys(keys)
    for i, data in enumerate(payloads):
        if stages[i] is not None:
            continue
        if not data:
            stages[i], types[i], msgs[i] = "decode", "EmptyImage", f"record {keys[i]!r} has no image bytes"
            continue
        try:
            out[i] = decode_image(data, pre, max_pixels).reshape(-1)
            valid[i] = True
        except Exception as e:  # corrupt, truncated, not an image, too large
            stages[i], types[i] = "decode", type(e).__name__
            msgs[i] = f"record {keys[i]!r} could not be decoded as an image: {e}"[:2000]
    buf = pa.py_buffer(out)  # zero-copy: the Arrow column shares the numpy buffer
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), n, [_validity(valid), buf])
    table = table.drop_columns([C.PAYLOAD]).append_column(C.INPUT, arr)
    return C.write_errors(table, stages, types, msgs)


def _validity(valid: np.ndarray) -> pa.Buffer:
    """An Arrow validity bitmap (bit-packed booleans) for the rows that decoded."""
    return pa.array(valid).buffers()[1]


class TokenEncoder:
    """Texts -> token ids, truncated to ``max_length``, unpadded (special tokens included).

    The model's ``tokenizer.json`` runs in the Rust ``tokenizers`` library directly when there is one (a
    local folder, or the hub cache): a read task then imports neither transformers nor torch, which would
    cost every fresh worker seconds and memory. Tokenizers without that file (or with code of their own)
    go through ``transformers.AutoTokenizer`` (:func:`auto_tokenizer`). Both give the same ids (checked in
    the tests).
    """

    def __init__(self, pre: TextPreprocess) -> None:
        self.pre = pre
        self.fast: Any = None
        self.auto: Any = None
        path = None if pre.trust_remote_code else _tokenizer_json(pre)
        if path is not None:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(path)
            except Exception:  # an older or unusual file: the transformers path below decides
                tok = None
            if tok is not None and tok.post_processor is not None:  # adds [CLS]/[SEP] itself
                tok.no_padding()
                tok.enable_truncation(pre.max_length)
                self.fast = tok
        if self.fast is None:
            self.auto = auto_tokenizer(pre)

    @property
    def kind(self) -> str:
        return "tokenizers" if self.fast is not None else "transformers"

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return [e.ids for e in self.fast.encode_batch(texts)]
        return self.auto(texts, truncation=True, max_length=self.pre.max_length, padding=False)["input_ids"]


def auto_tokenizer(pre: TextPreprocess) -> Any:
    """``transformers.AutoTokenizer`` for the model: the fallback for tokenizers without a ``tokenizer.json``.

    The one place a read task may import transformers (never torch): only when such a tokenizer is met.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(pre.tokenizer, revision=pre.revision, trust_remote_code=pre.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"loading the tokenizer {pre.tokenizer!r} failed ({type(e).__name__}: {e})") from e


def _tokenizer_json(pre: TextPreprocess) -> str | None:
    """The tokenizer's ``tokenizer.json`` on this machine: in its folder, or in the hub cache; else None."""
    import os

    if os.path.isdir(pre.tokenizer):
        path = os.path.join(pre.tokenizer, "tokenizer.json")
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(pre.tokenizer, "tokenizer.json", revision=pre.revision)
    except Exception:  # not a hub id, or no hub library
        return None
    return found if isinstance(found, str) else None


@lru_cache(maxsize=4)
def tokenizer_for(pre: TextPreprocess) -> TokenEncoder:
    """One tokenizer per worker process and model."""
    return TokenEncoder(pre)


def preprocess_text(table: pa.Table, pre: TextPreprocess) -> pa.Table:
    """Tokenize with truncation; empty or null text becomes an error row."""
    stages, types, msgs = C.read_errors(table)
    texts = table[C.PAYLOAD].to_pylist()
    keys = table[C.KEY].to_pylist()
    crash_on_keys(keys)
    todo: list[int] = []
    for i, t in enumerate(texts):
        if stages[i] is not None:
            continue
        if t is None or not str(t).strip():
            stages[i], types[i] = "preprocess", "EmptyText"
            msgs[i] = f"record {keys[i]!r} has {'no' if t is None else 'empty'} text; check text_column"
            continue
        todo.append(i)
    ids: list[Any] = [None] * len(texts)
    if todo:
        enc = tokenizer_for(pre).encode([texts[i] for i in todo])
        for i, e in zip(todo, enc):
            ids[i] = e
    table = table.drop_columns([C.PAYLOAD]).append_column(C.INPUT, pa.array(ids, pa.list_(pa.int32())))
    return C.write_errors(table, stages, types, msgs)


def count_errors(table: pa.Table) -> int:
    return int(pc.sum(pc.is_valid(table[C.ERR_STAGE])).as_py() or 0)
