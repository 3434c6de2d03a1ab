"""The model registry: names, clear errors, safe loading, and the two real-weight models."""
from __future__ import annotations

import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from operators.errors import ModelLoadError, UnknownModelError
from operators.models.registry import ModelOptions, known_models, load, resolve
from operators.preprocess.transforms import decode_image, preprocess_text


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as e:
        resolve("efficientnet-lite9")
    msg = str(e.value)
    for name in ("efficientnet-lite0", "minilm-l6", "resnet18", "resnet50", "vgg16", "vit-b-16", "timm:<name>", "hf:<name>"):
        assert name in msg
    assert set(known_models()) >= {"efficientnet-lite0", "minilm-l6", "vgg16"}


def test_bad_pooling_names_the_choices() -> None:
    with pytest.raises(UnknownModelError, match="choose one of: mean, cls"):
        resolve("minilm-l6", ModelOptions(pooling="avg"))


def test_fingerprint_follows_weights_and_settings(tiny_resnet_weights: str, tmp_path: Path) -> None:
    a = resolve("resnet18", ModelOptions(weights=tiny_resnet_weights))
    assert a.fingerprint() == resolve("resnet18", ModelOptions(weights=tiny_resnet_weights)).fingerprint()
    other = tmp_path / "other.safetensors"
    data = bytearray(Path(tiny_resnet_weights).read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    assert resolve("resnet18", ModelOptions(weights=str(other))).fingerprint() != a.fingerprint()
    m = resolve("minilm-l6")
    assert resolve("minilm-l6", ModelOptions(pooling="cls")).fingerprint() != m.fingerprint()
    assert resolve("minilm-l6", ModelOptions(max_length=64)).preprocessing_fingerprint() != m.preprocessing_fingerprint()


def test_torch_load_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run code under a plain torch.load
            return (print, ("owned",))

    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load(resolve("resnet18", ModelOptions(weights=str(p))))


def test_torchvision_weights_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="IMAGENET1K_V1, DEFAULT"):
        load(resolve("resnet18", ModelOptions(weights="NOT_AN_ENUM")))
    # a download that cannot happen, deterministically and without leaving the machine: an empty weights cache
    # and every HTTPS request sent to a closed port on loopback; the error says how to go on
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        with pytest.raises(ModelLoadError) as e:
            load(resolve("resnet18"))
    finally:
        # urllib keeps the opener (with these proxies) that the download built: drop it, or later requests in
        # this process (a test's Ray dashboard on loopback) would go to the closed port too
        urllib.request.install_opener(None)
    assert "weights=/path/to" in str(e.value) and "IMAGENET1K_V1" in str(e.value)


def test_hf_hub_id_without_network_fails_clearly() -> None:
    with pytest.raises(ModelLoadError, match="local folder"):
        load(resolve("hf:sentence-transformers/some-model-that-is-not-cached"))


def test_trust_remote_code_is_off_by_default(tiny_bert: str) -> None:
    spec = resolve(f"hf:{tiny_bert}")
    assert spec.trust_remote_code is False and spec.preprocessing.trust_remote_code is False
    assert resolve(f"hf:{tiny_bert}", ModelOptions(trust_remote_code=True)).trust_remote_code is True


def test_resnet18_local_safetensors_features(tiny_resnet_weights: str) -> None:
    spec = resolve("resnet18", ModelOptions(weights=tiny_resnet_weights))
    bb = load(spec)
    x = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    out = bb.embed_images(x)
    assert out.shape == (2, 512) and bb.dim == spec.dim == 512
    # the same weights give the same vectors on a second load
    np.testing.assert_allclose(load(spec).embed_images(x), out, rtol=1e-5, atol=1e-5)


def test_timm_by_name_random_weights() -> None:
    spec = resolve("timm:resnet10t", ModelOptions(weights="random"))
    bb = load(spec)
    pre = spec.preprocessing
    out = bb.embed_images(np.zeros((1, pre.crop, pre.crop, 3), np.uint8))
    assert out.shape == (1, bb.dim) and bb.dim == 512


@pytest.mark.slow
def test_vgg16_has_no_classifier_top_and_vit_class_token() -> None:
    vgg = load(resolve("vgg16", ModelOptions(weights="random")))
    assert not any(isinstance(m, torch.nn.Linear) for m in vgg.module.modules())  # include_top=False
    x = np.zeros((1, 224, 224, 3), np.uint8)
    assert vgg.embed_images(x).shape == (1, 512)
    vit = load(resolve("vit-b-16", ModelOptions(weights="random")))
    assert vit.embed_images(x).shape == (1, 768)


@pytest.mark.slow
def test_efficientnet_lite0_real_weights_see_a_cat() -> None:
    """The packaged ImageNet weights, through the pipeline's loading and preprocessing code."""
    import io

    import skimage.data
    from PIL import Image

    spec = resolve("efficientnet-lite0")
    bb = load(spec)
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format="PNG")
    crop = decode_image(buf.getvalue(), spec.preprocessing)
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        top5 = bb.module(x).topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286), top5  # ImageNet's cat classes
    assert sum(c in range(281, 288) for c in top5) >= 3
    assert bb.embed_images(crop[None]).shape == (1, 1280)


@pytest.mark.slow
def test_minilm_real_weights_paraphrase_beats_unrelated() -> None:
    import pyarrow as pa

    from operators import columns as C
    from operators.embed.embedder import embed_table

    spec = resolve("minilm-l6")
    bb = load(spec)
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    n = len(texts)
    t = pa.table({C.KEY: ["a", "b", "c"], C.SOURCE: ["s"] * n, C.PAYLOAD: texts, C.ERR_STAGE: pa.nulls(n, pa.string()),
                  C.ERR_TYPE: pa.nulls(n, pa.string()), C.ERR_MSG: pa.nulls(n, pa.string())})
    emb = np.array(embed_table(bb, preprocess_text(t, spec.preprocessing), 8)[C.EMBEDDING].to_pylist())
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    para, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert para > 0.6 and unrelated < 0.2 and para - unrelated > 0.5
