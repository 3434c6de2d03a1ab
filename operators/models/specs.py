"""What a model is, as data: its preprocessing, the options a job may change, and the resolved spec.

Free of torch and of any model library: read and preprocess tasks import these types (the preprocessing
they apply) without paying for the frameworks that only the embedding actors need.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

from operators.io.storage import short_hash

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class ImagePreprocess:
    resize: int  # shorter side, before the centre crop
    crop: int  # square side fed to the model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"


@dataclass(frozen=True)
class TextPreprocess:
    tokenizer: str  # folder or hub id the tokenizer loads from
    max_length: int
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ModelOptions:
    """What a job may change about a registered model (from the job config)."""

    weights: str | None = None
    revision: str | None = None
    pooling: str = "default"
    normalize: bool | None = None
    max_length: int | None = None
    trust_remote_code: bool = False


# (spec, device) -> an operators.models.backbones.Backbone (Any here: this module stays free of torch)
Loader = Callable[["ModelSpec", str], Any]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    modality: Modality
    dim: int | None  # None where only the loaded model knows (timm:/hf: by name)
    preprocessing: ImagePreprocess | TextPreprocess
    pooling: str
    normalize: bool
    revision: str | None
    loader: Loader  # the model family's loader (operators.models.loaders)
    source: str  # package, architecture or hub id the weights come from
    pooling_choices: tuple[str, ...] = ()
    description: str = ""
    weights: str | None = None  # resolved weights: file, folder, enum name, hub id or 'random'
    trust_remote_code: bool = False
    # a leaner loader for embedding only (same vectors), tried first; it returns None where it does not apply
    inference_loader: Loader | None = None

    def fingerprint(self) -> str:
        """Identity of weights + forward settings; changes whenever the vectors would."""
        ident = {
            "name": self.name, "source": self.source, "weights": _weights_identity(self.weights),
            "revision": self.revision, "pooling": self.pooling, "normalize": self.normalize,
        }
        return short_hash(json.dumps(ident, sort_keys=True))

    def preprocessing_fingerprint(self) -> str:
        pre = asdict(self.preprocessing)
        if isinstance(self.preprocessing, TextPreprocess):
            pre["tokenizer"] = _weights_identity(self.preprocessing.tokenizer)
        return short_hash(json.dumps(pre, sort_keys=True, default=str))

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name, "modality": self.modality, "dim": self.dim, "pooling": self.pooling,
            "normalize": self.normalize, "revision": self.revision, "source": self.source,
            "weights": _display_weights(self.weights),
            "weights_fingerprint": self.fingerprint(), "preprocessing": asdict(self.preprocessing),
            "preprocessing_fingerprint": self.preprocessing_fingerprint(),
        }


def _display_weights(w: str | None) -> str | None:
    if w and os.path.exists(w):
        return os.path.basename(w.rstrip("/"))
    return w


def _weights_identity(w: str | None) -> str | None:
    """Content identity of local weights (file bytes, or the files of a folder); the id otherwise."""
    if not w or not os.path.exists(w):
        return w
    files = [w] if os.path.isfile(w) else sorted(
        os.path.join(w, f) for f in os.listdir(w)
        if f.endswith((".safetensors", ".bin", ".pth", ".pt", ".json", ".txt", ".model"))
    )
    return "sha256:" + _hash_files(tuple(files))


_FILE_HASHES: dict[tuple[str, int, float], str] = {}


def _hash_files(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        k = (f, st.st_size, st.st_mtime)
        if k not in _FILE_HASHES:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 22), b""):
                    fh.update(chunk)
            _FILE_HASHES[k] = fh.hexdigest()
        h.update(os.path.basename(f).encode() + b"\0" + _FILE_HASHES[k].encode())
    return h.hexdigest()
