"""One config object per job. Defaults live here and nowhere else.

YAML files under ``pipelines/configs/`` only override these defaults; the CLI's
``--set key=value`` overrides both. Unknown keys and bad values fail here,
before any Ray work starts, with a message naming the key and what is allowed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operators.errors import ConfigError
from operators.io.storage import redact
from operators.models.registry import ModelOptions, ModelSpec, resolve, with_image_size
from operators.read.formats import FORMATS, IMAGE_FORMATS, TEXT_FORMATS
from operators.read.readers import ReadOptions

InputFormat = Literal[tuple(FORMATS)]  # the names in operators.read.formats

CONFIG_DIR: Path = Path(__file__).parent / "configs"
C = TypeVar("C", bound=BaseModel)


class EmbedConfig(BaseModel):
    """Everything one `featx embed` job needs. Every field has its default here."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- what to read
    input: str = Field(description="Input URI: a folder/prefix, a glob, or one file (s3://, gs://, az://, file://, path)")
    format: InputFormat = Field(description="Input format")
    text_column: str = "text"
    image_column: str = "image"
    key_column: str | None = Field(None, description="Column holding a stable record id (Parquet/JSONL); default: shard path + row number")
    passthrough: list[str] = Field(default_factory=list, description="Input columns copied to the output (Parquet/JSONL)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (endpoint, credentials); never logged")

    # -- where to write
    output: str
    embedding_dtype: Literal["float32", "float16"] = "float32"
    max_error_fraction: float = Field(0.01, ge=0, le=1, description="Fail (publish nothing) when more records than this fraction fail")
    piece_max_shards: int = Field(256, ge=1, description="Most input shards grouped into one output file")
    piece_target_mb: float = Field(64.0, gt=0, description="Input megabytes after which a group of small shards is closed")
    shard_fingerprint: Literal["auto", "content"] = Field(
        "auto", description="How a changed shard is detected: auto = ETag/generation/mtime from the listing "
        "(content hash where the store has none); content = always hash the bytes")
    keep_snapshots: int = Field(5, ge=1, description="Files of the newest N snapshots are kept (time travel); older unreferenced files are deleted")

    # -- fault tolerance
    lease_ttl_s: float = Field(600.0, gt=0, description="A run's lease on the output lasts this long unless renewed (it renews every ttl/4)")
    max_task_retries: int = Field(3, ge=0, description="Retries of a read/embed/write task whose worker died, before its piece is isolated")
    journal_interval_s: float = Field(5.0, ge=0, description="Finished pieces are journalled (and survive a crash) at least this often")
    max_record_attempts: int = Field(2, ge=1, description="Tries of one record alone before it is quarantined to _errors as WorkerCrashed")

    # -- the model
    model: str = "minilm-l6"
    weights: str | None = Field(None, description="Local weights file/folder, hub id, or torchvision weights enum name")
    revision: str | None = None
    pooling: Literal["default", "mean", "cls", "avg", "token"] = "default"
    normalize: bool | None = Field(None, description="L2-normalise embeddings (default: the model's own choice)")
    max_length: int | None = Field(None, ge=1, description="Tokenizer truncation length (default: the model's)")
    trust_remote_code: bool = False

    # -- declared resources (never detected)
    batch_size: int = Field(64, ge=1, description="Rows per forward pass (text: on average; batches hold about batch_size x mean tokens, short texts in wider batches)")
    batch_autotune: bool | None = Field(None, description="Each actor doubles batch_size while rows/s rise by 5%+ "
                                        "(and, on a GPU, while a doubled batch fits in 85% of its memory), up to "
                                        "max_batch_size, and halves it after an out-of-memory error (default: on for "
                                        "GPU actors; off on CPU, where batches past ~32 rows gain nothing)")
    max_batch_size: int | None = Field(None, ge=1, description="The largest batch autotuning tries (default 8 x batch_size)")
    torch_compile: bool = Field(False, description="Run the forward through torch.compile in each actor (compiled at the "
                                "first batch; CPU actors then run one stream). Off by default: on 2 CPU cores it "
                                "gained 2% for 25-40 s of compiling; measure on your GPUs with benchmarks/gpu_check.py")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor; fractions allowed")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor; fractions allowed")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    image_decode: Literal["tasks", "actors"] = Field(
        "tasks", description="Where images are decoded, resized and cropped: tasks = CPU read tasks (Pillow); "
        "actors = the embedding actors, on their own device (on a GPU: nvJPEG via torchvision.io.decode_jpeg, "
        "for GPU pools whose CPUs cannot decode fast enough)")
    preprocess_num_cpus: float = Field(1.0, gt=0, description="CPUs per read/preprocess task")
    preprocess_memory_mb: int = Field(1024, ge=64, description="Memory reserved per read/preprocess task")
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads per actor (default: on a local CPU-only Ray the CPUs shared among the actors, else ceil(num_cpus))")
    cpu_streams: int | None = Field(None, ge=1, description="Batches a CPU actor runs side by side, its torch_threads split among them (default: one single-thread batch per thread, at most 4; 1 = one batch on all threads). GPU actors run one")
    embed_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per embedding actor (pins actors to nodes that offer them)")
    preprocess_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per read/preprocess task")

    # -- where to run
    ray_address: str | None = Field(None, description="Ray address; default: start a local Ray")

    @field_validator("input", "output")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("must be a non-empty URI or path")
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "EmbedConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        if self.max_batch_size is not None and self.max_batch_size < self.batch_size:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be >= batch_size ({self.batch_size}): "
                             "autotuning starts at batch_size and only grows it")
        if self.precision == "fp16" and self.num_gpus == 0:
            raise ValueError("precision 'fp16' needs a GPU (num_gpus > 0); use 'fp32' or 'bf16' on CPU")
        if self.image_decode == "actors" and self.format not in IMAGE_FORMATS:
            raise ValueError(f"image_decode 'actors' is for image formats ({', '.join(sorted(IMAGE_FORMATS))}); "
                             f"format {self.format!r} holds text: leave image_decode at 'tasks'")
        return self

    @property
    def is_text(self) -> bool:
        return self.format in TEXT_FORMATS

    def public_dict(self) -> dict[str, Any]:
        """The resolved config with secrets redacted: safe to log and save."""
        data = self.model_dump()
        data["storage_options"] = redact(data["storage_options"])
        return data


class TrainConfig(BaseModel):
    """`featx train` (a head on an embeddings table) and the head part of `featx tune`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    embeddings: str = Field(description="Output URI of a `featx embed` table (its published snapshot is read)")
    label_column: str = Field("label", description="Passthrough column holding the class (string or int)")
    output: str = Field(description="Folder for the trained head, metrics and plots")
    head: Literal["linear", "mlp"] = "linear"
    hidden: int = Field(256, ge=1, description="MLP hidden size")
    dropout: float = Field(0.0, ge=0, lt=1)
    standardize: bool = Field(True, description="Scale each feature to zero mean, unit variance (train split statistics)")
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1, description="Rows per step per worker")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    class_weighting: Literal["none", "balanced"] = Field("balanced", description="balanced: inverse class frequency in the loss")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of keys (by a stable hash) held out for validation")
    split_column: str | None = Field(None, description="Column with train/val (or validation/test) per row; overrides val_fraction")
    metric: Literal["accuracy", "macro_f1", "loss"] = Field("macro_f1", description="Validation metric for early stopping and the best checkpoint")
    patience: int = Field(8, ge=1, description="Stop after this many epochs without a better validation metric")
    adapt_to: str | None = Field(None, description="Target-domain embeddings table (unlabelled): CORAL-align the source features to it")
    coral_eps: float = Field(1.0, gt=0, description="CORAL covariance regularisation, relative to the mean variance")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data parallel)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    seed: int = 0
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the embeddings; never logged")
    ray_address: str | None = None

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        data["storage_options"] = redact(data["storage_options"])
        return data


class FinetuneConfig(BaseModel):
    """`featx finetune`: a registry backbone + a new head, trained end to end on the raw shards."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input: str = Field(description="Raw shards, as for `featx embed`")
    format: InputFormat
    label_column: str = Field("label", description="Column with the class; for format images, 'folder' = parent folder name")
    text_column: str = "text"
    image_column: str = "image"
    key_column: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    output: str = Field(description="Folder for the fine-tuned backbone + head, metrics and plots")
    model: str = "efficientnet-lite0"
    weights: str | None = None
    pooling: Literal["default", "mean", "cls", "avg", "token"] = "default"
    max_length: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=32, description="Train (and later embed) at this crop size instead of the model's")
    trust_remote_code: bool = False
    head: Literal["linear", "mlp"] = "linear"
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1, description="Rows per step per worker")
    lr_head: float = Field(1e-3, gt=0, description="Learning rate of the new head")
    lr_backbone: float = Field(1e-4, gt=0, description="Learning rate of the unfrozen backbone layers (discriminative: lower)")
    weight_decay: float = Field(1e-4, ge=0)
    trainable_groups: int = Field(0, ge=-1, description="Backbone layer groups (counted from the top) trainable from the start; -1 = all")
    unfreeze: dict[int, int] = Field(default_factory=lambda: {2: 2}, description="Gradual unfreezing: {epoch: trainable groups from then on}")
    class_weighting: Literal["none", "balanced"] = "balanced"
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_column: str | None = None
    metric: Literal["accuracy", "macro_f1", "loss"] = "macro_f1"
    patience: int = Field(3, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast; fp16 needs a GPU (with a grad scaler)")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int | None = Field(None, ge=1)
    seed: int = 0
    ray_address: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneConfig":
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision 'fp16' needs a GPU (use_gpu: true); use fp32 or bf16 on CPU")
        return self

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        data["storage_options"] = redact(data["storage_options"])
        return data


class TuneConfig(BaseModel):
    """`featx tune`: a grid search over head hyperparameters; each trial trains a head on the embeddings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    train: TrainConfig = Field(description="The base head training job; grid values override its fields")
    grid: dict[str, list[Any]] = Field(description="Field -> values, e.g. {lr: [1e-3, 1e-2], hidden: [128, 512]}")
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent_trials: int | None = Field(None, ge=1)

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        allowed = {"lr", "weight_decay", "hidden", "dropout", "head", "batch_size", "epochs", "standardize",
                   "class_weighting"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"cannot search over {bad}; searchable: {sorted(allowed)}")
        if not v or any(not isinstance(vals, list) or not vals for vals in v.values()):
            raise ValueError("give each searched field a non-empty list of values")
        return v


def _format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = ", ".join(sorted((cls or EmbedConfig).model_fields))
            msg = f"unknown key; known keys: {known}"
        elif e["type"] == "missing":
            msg = "required, but not given (set it in the YAML or with --set)"
        elif "expected" in e.get("ctx", {}):
            msg = f"{msg} (got {e.get('input')!r})"
        else:
            got = e.get("input")
            if not isinstance(got, dict):
                msg = f"{msg} (got {got!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse CLI ``--set key=value`` pairs; values are read as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (example: --set batch_size=256)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        shipped = CONFIG_DIR / p.name
        if shipped.exists():
            p = shipped
        else:
            names = ", ".join(sorted(x.name for x in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config file {str(path)!r} not found; shipped configs in {CONFIG_DIR}: {names}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, source: str | None = None,
    cls: type[C] = EmbedConfig,  # type: ignore[assignment]
) -> C:
    """Defaults <- YAML file <- overrides, validated in one place (any of the job config classes)."""
    data: dict[str, Any] = load_yaml(path) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return cls(**data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source or str(path or "command line"), cls)) from None


def _drop_redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_redacted(v) for k, v in value.items() if v != "***"}
    return value


def config_from_output(output: str, overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """The config a previous run saved beside its output (``_config.json``), with ``overrides`` on top.

    Secrets were never saved: they come again from the environment (instance roles, AWS_* variables).
    """
    from operators.errors import InputError
    from operators.io.storage import join, read_bytes

    raw = read_bytes(join(output, "_config.json"), (overrides or {}).get("storage_options"))
    if raw is None:
        raise InputError(f"no saved config at {join(output, '_config.json')}: pass --config with the job's YAML")
    data = json.loads(raw)
    data["storage_options"] = _drop_redacted(data.get("storage_options") or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return EmbedConfig(**data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, join(output, "_config.json"))) from None


def dump_config(cfg: BaseModel) -> str:
    return json.dumps(cfg.public_dict(), indent=2, sort_keys=True)


# -- from a config to the operators' options ------------------------------------------------------------------

def model_spec(cfg: "EmbedConfig | FinetuneConfig") -> ModelSpec:
    """The registry's spec for a job's model, checked against its input format (and its image size)."""
    opts = ModelOptions(weights=cfg.weights, revision=getattr(cfg, "revision", None), pooling=cfg.pooling,
                        normalize=getattr(cfg, "normalize", ModelOptions().normalize), max_length=cfg.max_length,
                        trust_remote_code=cfg.trust_remote_code)
    spec = resolve(cfg.model, opts)
    wants_image = cfg.format in IMAGE_FORMATS
    if wants_image != (spec.modality == "image"):
        raise ConfigError(
            f"model {cfg.model!r} is a{'n' if spec.modality == 'image' else ''} {spec.modality} model but format "
            f"{cfg.format!r} holds {'images' if wants_image else 'text'}; pick a matching model "
            f"(images: efficientnet-lite0, resnet50, ...; text: minilm-l6, hf:<id>)"
        )
    image_size = getattr(cfg, "image_size", None)
    if image_size and spec.modality != "image":
        raise ConfigError("image_size applies to image models only")
    return with_image_size(spec, image_size) if image_size else spec


def read_options(cfg: "EmbedConfig | FinetuneConfig") -> ReadOptions:
    """How a job's readers read its input: the embed job's passthrough columns, or fine-tuning's label/split."""
    if isinstance(cfg, FinetuneConfig):
        passthrough = () if cfg.label_column == "folder" else (cfg.label_column,)
        passthrough += (cfg.split_column,) if cfg.split_column else ()
    else:
        passthrough = tuple(cfg.passthrough)
    return ReadOptions(format=cfg.format, text_column=cfg.text_column, image_column=cfg.image_column,
                       key_column=cfg.key_column, passthrough=passthrough, storage_options=dict(cfg.storage_options))
