"""Small real sample datasets that need no network (used by `featx demo`, tests and benchmarks).

Images: crops of the photos bundled with scikit-image, as JPEGs inside
WebDataset tars labelled by photo, or in a Parquet table split for transfer
learning. Text: sentences of Python's own documentation (``pydoc_data.topics``),
labelled by topic, as JSONL or Parquet shards. Vectors: a generated table
published as featx would publish it (search tests and benchmarks).
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse",
    "immunohistochemistry", "moon", "page", "rocket", "text", "hubble_deep_field", "retina", "cell",
)


def photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 RGB."""
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def shift(a: np.ndarray, domain: str | None) -> np.ndarray:
    """A domain shift of a photo: 'invert' (colours), 'gray', 'blur'; None leaves it."""
    if domain in (None, "", "none"):
        return a
    if domain == "invert":
        return 255 - a
    if domain == "gray":
        g = (a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
        return np.stack([g] * 3, axis=-1)
    if domain == "blur":
        from PIL import ImageFilter

        return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(4)))
    raise ValueError(f"unknown domain shift {domain!r}; use invert, gray or blur")


def crops(name: str, n: int, rng: np.random.Generator, half: str | None = None, size: int | tuple[int, int] = 160,
          domain: str | None = None) -> list[bytes]:
    """``n`` random crops (as JPEG bytes) of a photo, resized to ``size`` (square side, or (width, height):
    the crop then has that aspect); ``half`` = 'left'/'right' restricts where."""
    a = shift(photo(name), domain)
    h, w = a.shape[:2]
    out_w, out_h = (size, size) if isinstance(size, int) else size
    x0, x1 = (0, w // 2) if half == "left" else (w // 2, w) if half == "right" else (0, w)
    out = []
    for _ in range(n):
        side = int(rng.integers(min(h, x1 - x0) // 3, min(h, x1 - x0) + 1))  # the crop's longer side
        cw, ch = (side, max(1, side * out_h // out_w)) if out_w >= out_h else (max(1, side * out_w // out_h), side)
        x = int(rng.integers(x0, x1 - cw + 1))
        y = int(rng.integers(0, h - ch + 1))
        img = Image.fromarray(a[y:y + ch, x:x + cw]).resize((out_w, out_h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars
    tar.addfile(info, io.BytesIO(data))


def write_image_tars(folder: str | Path, per_photo: int = 8, shards: int = 3, photos: tuple[str, ...] = PHOTOS,
                     seed: int = 0, size: int | tuple[int, int] = 160) -> dict[str, Any]:
    """WebDataset tars of labelled crops: ``NAME_III.jpg`` + ``.cls`` (label index) + ``.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for label, name in enumerate(photos):
        for i, jpg in enumerate(crops(name, per_photo, rng, size=size)):
            samples.append((f"{name}_{i:03d}", jpg, label, name))
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for key, jpg, label, name in samples[s::shards]:
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps({"photo": name}).encode())
    return {"path": str(folder), "records": len(samples), "shards": shards, "labels": list(photos)}


def sentences(text: str, min_words: int = 4) -> list[str]:
    """The prose sentences of a documentation text: whitespace collapsed, split after . ! ?, at least
    ``min_words`` words, list items / table rows / doctest lines left out."""
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))]
    return [s for s in sents if len(s.split()) >= min_words and not s.startswith(("*", "|", ">>>"))]


def topic_sentences(min_words: int = 4, max_per_topic: int | None = None) -> list[tuple[str, str]]:
    """(topic, sentence) pairs from Python's bundled documentation, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        out.extend((topic, s) for s in sentences(topics[topic], min_words)[:max_per_topic])
    return out


def doc_sentences(limit: int, min_words: int = 4) -> list[tuple[str, str]]:
    """``limit`` (label, sentence) pairs of Python's own documentation: the bundled topics first, then the
    docstrings of the standard library's modules, classes and functions (parsed with ``ast``, never
    imported), deduplicated, in a fixed order. About 20k+ sentences on CPython 3.11."""
    import ast
    import sysconfig

    seen: set[str] = set()
    out: list[tuple[str, str]] = []

    def add(label: str, sents: list[str]) -> None:
        for sent in sents:
            if sent not in seen:
                seen.add(sent)
                out.append((label, sent))

    for topic, sent in topic_sentences(min_words=min_words):
        add(topic, [sent])
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    for f in files:
        if len(out) >= limit:
            break
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue
        label = ".".join(f.relative_to(root).with_suffix("").parts)
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    add(label, sentences(doc, min_words))
    return out[:limit]


def write_text_shards(folder: str | Path, fmt: str = "jsonl", shards: int = 4, max_per_topic: int | None = 30,
                      limit: int | None = None, corpus: str = "topics") -> dict[str, Any]:
    """Text shards with columns id, text, label (topic; module for ``corpus="docs"``, see :func:`doc_sentences`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = doc_sentences(limit or 20_000) if corpus == "docs" else topic_sentences(max_per_topic=max_per_topic)
    rows = [{"id": f"t{i:06d}", "text": s, "label": t} for i, (t, s) in enumerate(pairs)][:limit]
    for s in range(shards):
        part = rows[s::shards]
        path = folder / f"part-{s:05d}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(part), path)
    return {"path": str(folder), "records": len(rows), "shards": shards}


def write_transfer_images(folder: str | Path, train_per_class: int = 10, val_per_class: int = 10,
                          photos: tuple[str, ...] = PHOTOS, domain: str | None = None, seed: int = 0,
                          size: int = 160) -> dict[str, Any]:
    """One class per bundled photo: training crops from its left half, validation crops from its right half.

    Parquet with ``image`` (JPEG bytes), ``label`` and ``split`` columns; ``domain`` shifts every crop
    (invert, gray, blur) for a target domain. Honest transfer-learning data that needs no download.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for name in photos:
        for split, half, n in (("train", "left", train_per_class), ("val", "right", val_per_class)):
            for i, jpg in enumerate(crops(name, n, rng, half=half, size=size, domain=domain)):
                rows.append({"id": f"{name}-{split}-{i}", "image": jpg, "label": name, "split": split})
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-00000.parquet")
    return {"path": str(folder), "records": len(rows), "classes": len(photos)}


def write_vector_table(output: str, vectors: np.ndarray, columns: dict[str, Any] | None = None,
                       rows_per_file: int = 100_000, row_group_rows: int = 65_536, snapshot_of: dict[str, Any] | None = None,
                       storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish generated vectors as a featx table (data files + manifest), without a model or Ray.

    For search tests and the 1M-vector benchmark. ``columns``: extra passthrough columns (same length).
    ``snapshot_of``: the previous manifest, to publish the next snapshot. Returns the manifest.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators import columns as C
    from operators.io.storage import join, write_bytes
    from pipelines.publish.manifest import build_manifest, commit

    n, dim = vectors.shape
    snap = (snapshot_of or {}).get("snapshot", 0) + 1
    model = {"model": "generated", "modality": "text", "dim": dim, "weights_fingerprint": "generated",
             "preprocessing_fingerprint": "generated"}
    pieces = []
    for i, start in enumerate(range(0, n, rows_per_file)):
        end = min(n, start + rows_per_file)
        flat = pa.array(np.ascontiguousarray(vectors[start:end], dtype=np.float32).reshape(-1))
        t = pa.table({C.KEY: [f"row-{j:08d}" for j in range(start, end)],
                      C.SOURCE: [f"generated://{i:05d}"] * (end - start),
                      C.EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, dim),
                      **{k: pa.array(v[start:end]) for k, v in (columns or {}).items()}})
        t = t.replace_schema_metadata({b"featx": json.dumps({**model, "dim": dim}).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, row_group_size=row_group_rows)
        path = f"data/generated-s{snap}-{i:05d}.parquet"
        body = sink.getvalue().to_pybytes()
        write_bytes(join(output, path), body, storage_options)
        pieces.append({"id": f"generated-{i:05d}", "shards": [{"uri": f"generated://{i:05d}", "size": end - start}],
                       "files": [{"path": path, "rows": end - start, "bytes": len(body)}], "error_files": []})
    manifest = build_manifest(previous=snapshot_of, run_id=f"generated-{snap}", model=model, model_fingerprint="generated",
                              content_fingerprint=f"generated-{snap}", dim=dim, embedding_dtype="float32",
                              input_uri="generated://", input_format="parquet", pieces=pieces)
    commit(output, manifest, storage_options)
    return manifest
