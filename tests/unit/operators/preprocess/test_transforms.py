"""Preprocessing: the model's own resize/crop, and every bad record becomes an error row."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from operators import columns as C
from operators.models.registry import resolve
from operators.models.specs import ImagePreprocess
from operators.preprocess.transforms import decode_image, preprocess_images, preprocess_text
from pipelines.demo.sample_data import crops, photo

PRE = ImagePreprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


def _records(payloads: list, ptype: pa.DataType) -> pa.Table:
    n = len(payloads)
    return pa.table({C.KEY: [f"k{i}" for i in range(n)], C.SOURCE: ["s"] * n, C.PAYLOAD: pa.array(payloads, ptype),
                     C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()),
                     C.ERR_MSG: pa.nulls(n, pa.string())})


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_resizes_shorter_side_and_centre_crops() -> None:
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 140:160] = 255  # a bright band in the middle survives the centre crop
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), PRE)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out[:, 112].mean() > 200 and out[:, 0].mean() < 10
    gray_rgba = decode_image(_png(50, 40, "LA"), PRE)  # grey+alpha becomes RGB
    assert gray_rgba.shape == (224, 224, 3)


def test_bad_images_become_error_rows_and_good_ones_survive() -> None:
    good = crops("chelsea", 1, np.random.default_rng(0))[0]
    truncated = good[: len(good) // 2]
    table = _records([good, b"not an image at all", truncated, b"", _png(9000, 9000)], pa.binary())
    out = preprocess_images(table, PRE, max_pixels=50_000_000)
    stages = out[C.ERR_STAGE].to_pylist()
    assert stages == [None, "decode", "decode", "decode", "decode"]
    types = out[C.ERR_TYPE].to_pylist()
    assert types[1] == "UnidentifiedImageError" and types[3] == "EmptyImage" and types[4] == "ImageTooLarge"
    assert "k2" in out[C.ERR_MSG][2].as_py()
    assert out.num_rows == 5 and C.PAYLOAD not in out.column_names
    assert out[C.INPUT].type == pa.binary(224 * 224 * 3)
    assert out[C.INPUT].null_count == 4


def test_text_is_tokenized_unpadded_and_empty_text_is_an_error() -> None:
    pre = resolve("minilm-l6").preprocessing
    table = _records(["a short one", "", None, "word " * 1000], pa.string())
    out = preprocess_text(table, pre)
    ids = out[C.INPUT].to_pylist()
    assert out[C.ERR_TYPE].to_pylist() == [None, "EmptyText", "EmptyText", None]
    assert ids[0][0] == 101 and ids[0][-1] == 102 and len(ids[0]) == 5  # [CLS] a short one [SEP]
    assert len(ids[3]) == pre.max_length  # truncated to the model's max length
    assert ids[1] is None and ids[2] is None


def test_text_without_tokenizer_folder_fails_clearly(tmp_path) -> None:
    from operators.errors import ModelLoadError
    from operators.models.specs import TextPreprocess

    with pytest.raises(ModelLoadError, match="tokenizer"):
        preprocess_text(_records(["x"], pa.string()), TextPreprocess(tokenizer=str(tmp_path / "nothing"), max_length=8))


def test_jpeg_draft_decode_gives_the_model_size_and_about_the_full_decode() -> None:
    """A large JPEG is decoded at a reduced DCT scale: same crop size, nearly the same pixels."""
    big = np.asarray(Image.fromarray(photo("astronaut")).resize((1200, 1200)))  # 4.7x the 256 resize
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=92)
    drafted = decode_image(buf.getvalue(), PRE)
    full = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.BILINEAR))[16:240, 16:240]
    assert drafted.shape == (224, 224, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 6


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (301, 257), (120, 90)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_box_resize_matches_resizing_the_whole_image_then_cropping(size: tuple[int, int],
                                                                       interpolation: str) -> None:
    """Only the crop's source box is resampled; the pixels are those of the textbook resize-then-crop
    (the filter reaches past the box as it would in the full image): float rounding apart."""
    pre = ImagePreprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=interpolation)
    img = Image.fromarray(photo("astronaut")).resize(size)  # wide, tall, odd, smaller than the crop
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the decode adds nothing
    w, h = size
    s = 256 / min(w, h)
    nw, nh = max(224, round(w * s)), max(224, round(h * s))
    left, top = (nw - 224) // 2, (nh - 224) // 2
    full = np.asarray(img.resize((nw, nh), {"bilinear": Image.Resampling.BILINEAR,
                                            "bicubic": Image.Resampling.BICUBIC}[interpolation]))
    expected = full[top:top + 224, left:left + 224].astype(int)
    diff = np.abs(decode_image(buf.getvalue(), pre).astype(int) - expected)
    assert diff.max() <= 2 and (diff > 0).mean() < 5e-3, (diff.max(), (diff > 0).mean())


def test_read_tasks_tokenize_without_transformers_and_get_the_same_ids(tmp_path) -> None:
    """The tokenizers fast path (no transformers/torch import in read workers) == AutoTokenizer, id for id."""
    import shutil
    import subprocess
    import sys

    from operators.models.specs import TextPreprocess
    from operators.preprocess.transforms import TokenEncoder, auto_tokenizer
    from pipelines.demo.sample_data import topic_sentences

    pre = resolve("minilm-l6").preprocessing
    texts = [s for _, s in topic_sentences(max_per_topic=5)] + ["word " * 1000, "Ünïcödé  and\ttabs", "x"]
    fast = TokenEncoder(pre)
    assert fast.kind == "tokenizers"
    auto = auto_tokenizer(pre)
    for max_length in (pre.max_length, 16):
        p = TextPreprocess(tokenizer=pre.tokenizer, max_length=max_length)
        want = auto(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        assert TokenEncoder(p).encode(texts) == want
    # a folder without tokenizer.json (vocab only) takes the transformers path, same ids
    slow_dir = tmp_path / "vocab-only"
    slow_dir.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(pre.tokenizer) / name).exists():
            shutil.copy(Path(pre.tokenizer) / name, slow_dir / name)
    slow = TokenEncoder(TextPreprocess(tokenizer=str(slow_dir), max_length=pre.max_length))
    assert slow.kind == "transformers"
    assert slow.encode(texts[:20]) == fast.encode(texts[:20])
    # and a fresh process tokenizing a table never imports torch or transformers
    code = ("import sys, pyarrow as pa; from operators import columns as C; from operators.read.loading import prepare_rows; "
            "from operators.models.registry import resolve; n=2; "
            "t = pa.table({C.KEY: ['a','b'], C.SOURCE: ['s']*n, C.PAYLOAD: ['one text', 'two'], "
            "C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()), C.ERR_MSG: pa.nulls(n, pa.string())}); "
            "out = prepare_rows(t, 'p', resolve('minilm-l6').preprocessing, 0.0); "
            "print(out.num_rows, 'torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert res.stdout.split() == ["2", "False", "False"], res.stderr[-2000:]
