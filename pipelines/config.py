"""One config object per job. Defaults live here and nowhere else.

YAML files under ``pipelines/configs/`` only override these defaults; the CLI's flags and
``--set key=value`` override both. Unknown keys and bad values fail here, before any Ray work starts,
with a message naming the key and what is allowed.

Every job config is a :class:`JobConfig` (strict keys, a redacted ``public_dict``, ``dump``, ``build`` from
YAML + overrides, ``from_saved`` beside a run's output). The keys stay flat (YAML files name ``input``,
``storage_options``, ``ray_address`` at the top level), so the field groups that several jobs share are
declared once, in one ``*Fields`` class each, and a job config lists the groups it has:

=================  ======================================================  ============================
group              keys                                                    jobs
=================  ======================================================  ============================
StorageFields      storage_options                                         embed, train, finetune
InputFields        input, format, text_column, image_column, key_column    embed, finetune
BackboneFields     weights, pooling, max_length, trust_remote_code         embed, finetune
ComputeFields      precision, torch_threads                                embed, finetune
RayFields          ray_address                                             embed, train, finetune
HeadFields         label_column, head, hidden, weight_decay,               train, finetune
                   class_weighting, val_fraction, split_column, metric
TrainerFields      num_workers, cpus_per_worker, use_gpu, seed             train, finetune
=================  ======================================================  ============================

A key whose default differs between jobs (``model``, ``batch_size``, ``epochs``, ``dropout``,
``patience``) is declared by each job, with its own default. The embedding pool's "auto" values
(threads, streams, batch autotuning, pool size) are resolved by :func:`resolve_auto`, below the configs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operators.embed.autotune import tune_limit
from operators.errors import ConfigError
from operators.io.storage import redact
from operators.learn.convex import DEFAULT_CS
from operators.models.registry import ModelOptions, ModelSpec, resolve, with_image_size
from operators.read.formats import FORMATS, IMAGE_FORMATS, TEXT_FORMATS
from operators.read.readers import ReadOptions

InputFormat = Literal[tuple(FORMATS)]  # the names in operators.read.formats
Precision = Literal["fp32", "bf16", "fp16"]
Pooling = Literal["default", "mean", "cls", "avg", "token"]
HeadKind = Literal["linear", "mlp"]

CONFIG_DIR: Path = Path(__file__).parent / "configs"
SAVED_CONFIG = "_config.json"  # a run's resolved config (secrets redacted), saved beside its output
REDACTED = "***"
MAX_AUTO_STREAMS = 4  # cpu_streams by default: one per actor thread, at most this many
C = TypeVar("C", bound="JobConfig")


# -- the base ------------------------------------------------------------------------------------------------

def absolute(uri: str) -> str:
    """A local path made absolute (Ray's workers do not run in the driver's folder); URIs (``s3://``,
    ``file://``...) as given. Relative paths in a YAML or a flag mean: from where featx was started."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


class JobConfig(BaseModel):
    """What every job config is: strict keys (an unknown key fails), validated on assignment too, a public
    view with secrets redacted, built from YAML + overrides, or loaded from what a run saved."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    saved_as: ClassVar[str] = SAVED_CONFIG

    @field_validator("input", "output", "embeddings", "adapt_to", check_fields=False)
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("must be a non-empty URI or path")
        return absolute(v.strip())

    def public_dict(self) -> dict[str, Any]:
        """The resolved config with secrets redacted (every ``storage_options``, nested ones too): safe to log
        and save."""
        return _redact_storage(self.model_dump())

    def dump(self) -> str:
        """The public dict as sorted, indented JSON: what the CLI prints and a run saves."""
        return json.dumps(self.public_dict(), indent=2, sort_keys=True)

    @classmethod
    def build(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
              source: str | None = None) -> C:
        """Defaults <- YAML file (a path, or the name of a shipped config) <- overrides, validated once.

        Overrides whose value is None are left out (an unset CLI flag); a dotted key (``train.lr``,
        ``storage_options.anon``) sets one key inside a mapping instead of replacing the mapping.
        """
        data: dict[str, Any] = load_yaml(path) if path else {}
        return cls._validated(_merge(data, overrides), source or str(path or "command line"))

    @classmethod
    def from_saved(cls: type[C], output: str, overrides: dict[str, Any] | None = None) -> C:
        """The config a previous run saved beside its output (``saved_as``), with ``overrides`` on top.

        Secrets were never saved: they come again from the environment (instance roles, AWS_* variables),
        or from ``storage_options`` in the overrides.
        """
        from operators.errors import InputError
        from operators.io.storage import join, read_bytes

        where = join(output, cls.saved_as)
        raw = read_bytes(where, (overrides or {}).get("storage_options"))
        if raw is None:
            raise InputError(f"no saved config at {where}: pass --config with the job's YAML")
        return cls._validated(_merge(_drop_redacted(json.loads(raw)), overrides), where)

    @classmethod
    def _validated(cls: type[C], data: dict[str, Any], source: str) -> C:
        try:
            return cls(**data)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, source, cls)) from None


# -- field groups that several jobs share (declared once; a job lists the groups it has) ------------------------

class StorageFields(BaseModel):
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (endpoint, credentials) for the job's input and output; "
        "never logged")


class InputFields(StorageFields):
    """What to read: the same readers for `featx embed` and `featx finetune`."""

    input: str = Field(
        description="Input URI: a folder/prefix, a glob, or one file (s3://, gs://, az://, file://, path)")
    format: InputFormat = Field(description="Input format")
    text_column: str = "text"
    image_column: str = "image"
    key_column: str | None = Field(
        None, description="Column holding a stable record id (Parquet/JSONL); default: shard path + row number")

    @property
    def is_text(self) -> bool:
        return self.format in TEXT_FORMATS


class BackboneFields(BaseModel):
    """How a registry model is loaded (the model's name is the job's own key: its default differs)."""

    weights: str | None = Field(None, description="Local weights file/folder, hub id, or torchvision weights enum name")
    pooling: Pooling = "default"
    max_length: int | None = Field(None, ge=1, description="Tokenizer truncation length (default: the model's)")
    trust_remote_code: bool = False


class ComputeFields(BaseModel):
    precision: Precision = Field("fp32", description="Autocast precision; fp16 needs a GPU")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per embedding actor / training worker (default: auto; for embed "
        "see resolve_auto, for finetune int(cpus_per_worker), at least 1)")


class RayFields(BaseModel):
    ray_address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS, else start a local Ray")


class HeadFields(BaseModel):
    """The classification head and how it is validated (`featx train`, `featx tune`, `featx finetune`)."""

    label_column: str = Field("label", description="Column holding the class (string or int); for finetune on "
                              "format images, 'folder' = the parent folder's name")
    head: HeadKind = "linear"
    hidden: int = Field(256, ge=1, description="MLP hidden size")
    weight_decay: float = Field(1e-4, ge=0)
    class_weighting: Literal["none", "balanced"] = Field(
        "balanced", description="balanced: inverse class frequency in the loss")
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="Share of keys (by a stable hash) held out for validation, never trained on. "
        "Default: 0.2, but 0 for `featx train`'s linear probe, which chooses its L2 strength by cross-validation "
        "on the training rows and reports the CV estimate")
    split_column: str | None = Field(None, description="Column with train/val (or validation/test) per row; overrides "
                                                       "val_fraction")
    metric: Literal["accuracy", "macro_f1", "loss"] = Field("macro_f1", description="Validation metric for early "
                                                                                    "stopping and the best checkpoint")

    def require_validation(self, what: str) -> None:
        """For a job that stops early: ``val_fraction`` defaults to 0.2, and a validation split must exist."""
        if self.val_fraction is None:
            self.val_fraction = 0.2
        if self.val_fraction == 0 and not self.split_column:
            raise ValueError(f"{what} stops early on a validation split: set val_fraction > 0 (e.g. 0.2) or "
                             "split_column")


class TrainerFields(RayFields):
    """Ray Train's data-parallel workers."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data parallel)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    seed: int = 0


# -- the jobs ---------------------------------------------------------------------------------------------------

class EmbedConfig(JobConfig, InputFields, BackboneFields, ComputeFields, RayFields):
    """Everything one `featx embed` (or `featx refresh`) job needs. Every field has its default here."""

    passthrough: list[str] = Field(default_factory=list, description="Input columns copied to the output "
                                                                     "(Parquet/JSONL)")

    # -- where to write
    output: str
    embedding_dtype: Literal["float32", "float16"] = "float32"
    max_error_fraction: float = Field(0.01, ge=0, le=1, description="Fail (publish nothing) when more records than "
                                                                    "this fraction fail")
    piece_max_shards: int = Field(256, ge=1, description="Most input shards grouped into one output file")
    piece_target_mb: float = Field(64.0, gt=0, description="Input megabytes after which a group of small shards is "
                                                           "closed")
    shard_fingerprint: Literal["auto", "content"] = Field(
        "auto", description="How a changed shard is detected: auto = ETag/generation/mtime from the listing "
        "(content hash where the store has none); content = always hash the bytes")
    keep_snapshots: int = Field(5, ge=1, description="Files of the newest N snapshots are kept (time travel); older "
                                                     "unreferenced files are deleted")
    reuse: Literal["content", "none"] = Field(
        "content", description="content: a record whose content_hash the published snapshot holds (same model, "
        "preprocessing, dtype and read options) takes the stored vector, and identical contents in the run are "
        "embedded once; none: every record of a new or changed shard goes to the model")

    # -- fault tolerance
    lease_ttl_s: float = Field(600.0, gt=0, description="A run's lease on the output lasts this long unless renewed "
                                                        "(it renews every ttl/4)")
    max_task_retries: int = Field(3, ge=0, description="Retries of a read/embed/write task whose worker died, before "
                                                       "its piece is isolated")
    journal_interval_s: float = Field(5.0, ge=0, description="Finished pieces are journalled (and survive a crash) at "
                                                             "least this often")
    max_record_attempts: int = Field(2, ge=1, description="Tries of one record alone before it is quarantined to "
                                                          "_errors as WorkerCrashed (or WorkerHung)")
    task_timeout_s: float = Field(
        900.0, ge=0, description="Floor of the deadline of one block of work (a read task, an embedding actor call, "
        "an isolation call): a block still running after max(this, 20 x its rows x the rate measured so far) is "
        "killed as stuck, retried, then isolated; a record that hangs alone is quarantined as WorkerHung. 0: off")
    progress_interval_s: float = Field(10.0, gt=0, description="Where stderr is not a terminal (cron, CI, Ray job "
                                       "logs), one plain progress line this often; a terminal gets a live display")

    # -- the model (with BackboneFields)
    model: str = "minilm-l6"
    revision: str | None = None
    normalize: bool | None = Field(None, description="L2-normalise embeddings (default: the model's own choice)")

    # -- declared resources (never detected); "auto" (None) values are resolved by resolve_auto
    batch_size: int = Field(64, ge=1, description="Rows per forward pass (text: on average; batches hold about "
                                                  "batch_size x mean tokens, short texts in wider batches)")
    batch_autotune: bool | None = Field(None, description="Each actor doubles batch_size while rows/s rise by 5%+ "
                                        "(and, on a GPU, while a doubled batch fits in 85% of its memory), up to "
                                        "max_batch_size, and halves it after an out-of-memory error (default: on for "
                                        "GPU actors; off on CPU, where batches past ~32 rows gain nothing)")
    max_batch_size: int | None = Field(None, ge=1, description="The largest batch autotuning tries (default 8 x "
                                                               "batch_size)")
    torch_compile: bool = Field(False, description="Run the forward through torch.compile in each actor (compiled at "
                                "the first batch; CPU actors then run one stream). Off by default: on 2 CPU cores it "
                                "gained 2% for 25-40 s of compiling; measure on your GPUs with benchmarks/gpu_check.py")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor; fractions allowed")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor; fractions allowed")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1, description="Most embedding actors (on a local Ray: capped so that reads keep a "
                                                 "CPU)")
    image_decode: Literal["tasks", "actors"] = Field(
        "tasks", description="Where images are decoded, resized and cropped: tasks = CPU read tasks (Pillow); "
        "actors = the embedding actors, on their own device (on a GPU: nvJPEG via torchvision.io.decode_jpeg, "
        "for GPU pools whose CPUs cannot decode fast enough)")
    preprocess_num_cpus: float = Field(1.0, gt=0, description="CPUs per read/preprocess task")
    preprocess_memory_mb: int = Field(1024, ge=64, description="Memory reserved per read/preprocess task")
    cpu_streams: int | None = Field(
        None, ge=1, description="Batches a CPU actor runs side by side, its torch_threads split among them (default: "
        "one single-thread batch per thread, at most 4; 1 = one batch on all threads). GPU actors run one")
    embed_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per embedding actor (pins actors to nodes that offer "
        "them)")
    preprocess_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per read/preprocess task")

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


class TrainConfig(JobConfig, HeadFields, TrainerFields, StorageFields):
    """`featx train` (a head on an embeddings table) and the head part of `featx tune`."""

    embeddings: str = Field(description="Output URI of a `featx embed` table (its published snapshot is read)")
    output: str = Field(description="Folder for the trained head, metrics and plots")
    dropout: float = Field(0.0, ge=0, lt=1)
    standardize: bool = Field(True, description="Scale each feature to zero mean, unit variance (train split "
                                                "statistics)")
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1, description="Rows per step per worker")
    lr: float = Field(3e-3, gt=0)
    patience: int = Field(8, ge=1, description="Stop after this many epochs without a better validation metric")
    adapt_to: str | None = Field(None, description="Target-domain embeddings table (unlabelled): CORAL-align the "
                                                   "source features to it")
    coral_eps: float = Field(1.0, gt=0, description="CORAL covariance regularisation, relative to the mean variance")
    # the linear probe: multinomial logistic regression, full-batch L-BFGS (operators/learn/convex.py)
    l2_c: float | None = Field(None, gt=0, description="Linear probe: the inverse L2 strength C (scikit-learn's C); "
                                                       "default: chosen by k-fold cross-validation from cv_grid")
    cv_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_CS), min_length=1,
                                 description="Linear probe: the C values cross-validated (default: scikit-learn "
                                             "LogisticRegressionCV's, 10 from 1e-4 to 1e4)")
    cv_folds: int = Field(5, ge=2, le=20, description="Linear probe: cross-validation folds (by a stable key hash)")
    cv_max_rows: int = Field(50_000, ge=100, description="Linear probe: cross-validate on at most about this many "
                                                          "training rows (a fixed sample by key hash); the final "
                                                          "fit uses all of them")
    solver_tol: float = Field(1e-6, gt=0, description="Linear probe: converged when every gradient component of "
                                                      "the objective is under this")
    max_iter: int = Field(1000, ge=1, description="Linear probe: L-BFGS iterations per fit at most")
    refit: bool = Field(True, description="MLP: after early stopping picks the epoch count, train again from "
                                          "scratch on the training and validation rows for that many epochs")

    @model_validator(mode="after")
    def _held_out(self) -> "TrainConfig":
        if self.head == "linear":
            if self.val_fraction is None:  # (assigning re-runs the validators: only when it changes)
                self.val_fraction = 0.0
        else:
            self.require_validation("the mlp head")
        return self


class FinetuneConfig(JobConfig, InputFields, BackboneFields, ComputeFields, HeadFields, TrainerFields):
    """`featx finetune`: a registry backbone + a new head, trained end to end on the raw shards."""

    output: str = Field(description="Folder for the fine-tuned backbone + head, metrics and plots")
    model: str = "efficientnet-lite0"
    image_size: int | None = Field(None, ge=32, description="Train (and later embed) at this crop size instead of the "
                                                            "model's")
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1, description="Rows per step per worker")
    lr_head: float = Field(1e-3, gt=0, description="Learning rate of the new head")
    lr_backbone: float = Field(1e-4, gt=0, description="Learning rate of the unfrozen backbone layers "
                                                       "(discriminative: lower)")
    trainable_groups: int = Field(0, ge=-1, description="Backbone layer groups (counted from the top) trainable from "
                                                        "the start; -1 = all")
    unfreeze: dict[int, int] = Field(default_factory=lambda: {2: 2}, description="Gradual unfreezing: {epoch: "
                                                                                 "trainable groups from then on}")
    patience: int = Field(3, ge=1, description="Stop after this many epochs without a better validation metric")

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneConfig":
        self.require_validation("fine-tuning")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision 'fp16' needs a GPU (use_gpu: true); use fp32 or bf16 on CPU")
        return self


TUNABLE = ("lr", "weight_decay", "hidden", "dropout", "head", "batch_size", "epochs", "standardize", "class_weighting")


class TuneConfig(JobConfig):
    """`featx tune`: a grid search over head hyperparameters; each trial trains a head on the embeddings."""

    train: TrainConfig = Field(description="The base head training job; grid values override its fields")
    grid: dict[str, list[Any]] = Field(description="Field -> values, e.g. {lr: [1e-3, 1e-2], hidden: [128, 512]}")
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent_trials: int | None = Field(None, ge=1)

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        bad = sorted(set(v) - set(TUNABLE))
        if bad:
            raise ValueError(f"cannot search over {bad}; searchable: {sorted(TUNABLE)}")
        if not v or any(not isinstance(vals, list) or not vals for vals in v.values()):
            raise ValueError("give each searched field a non-empty list of values")
        return v

    @model_validator(mode="after")
    def _mlp_only(self) -> "TuneConfig":
        heads = self.grid.get("head", [self.train.head])
        if "linear" in heads:
            raise ValueError("the linear probe chooses its L2 strength itself, by cross-validation over "
                             "train.cv_grid (`featx train --head linear`); tune the MLP: set train.head: mlp "
                             "(and leave linear out of grid.head)")
        return self


JOBS: dict[str, type[JobConfig]] = {"embed": EmbedConfig, "refresh": EmbedConfig, "train": TrainConfig,
                                    "finetune": FinetuneConfig, "tune": TuneConfig}


# -- the embedding pool's "auto" rules, all in one place ------------------------------------------------------

def resolve_auto(cfg: EmbedConfig, cluster_cpus: float, cluster_gpus: float, local: bool) -> dict[str, Any]:
    """What each "auto" value of an embedding job resolves to on a cluster; pure (no Ray, no detection).

    ``local``: a fixed-size Ray this process started (a laptop, one node), whose size is known; otherwise a
    cluster that an autoscaler may grow, where only what the config declares is used. Returns the resolved
    ``max_actors``, ``torch_threads``, ``cpu_streams``, ``batch_autotune`` and ``max_batch_size``, and under
    ``auto`` the rule that decided each value the config left open (or that capped one it set).
    """
    auto: dict[str, str] = {}

    # pool size: on a fixed-size Ray, cap the pool so that reads always keep a CPU (a pool that takes every
    # CPU waits forever, with no error) and, with GPU actors, so that the actors fit the GPUs
    max_actors = cfg.max_actors
    if local:
        fit = math.floor((cluster_cpus - cfg.preprocess_num_cpus) / cfg.num_cpus + 1e-9)
        max_actors = min(max_actors, max(cfg.min_actors, fit))
        if cfg.num_gpus > 0:
            max_actors = min(max_actors, max(cfg.min_actors, math.floor(cluster_gpus / cfg.num_gpus + 1e-9)))
        if max_actors < cfg.max_actors:
            auto["max_actors"] = (f"capped to what this Ray's {cluster_cpus:g} CPUs / {cluster_gpus:g} GPUs "
                                  "hold beside the reads")

    # intra-op threads per actor: on a local CPU-only Ray the machine's CPUs shared by the actors (read tasks
    # are short bursts: a 2-core laptop with one actor runs 2 threads, measured 1.46x the rows/s of 1);
    # elsewhere what each actor declared, ceil(num_cpus)
    threads = cfg.torch_threads
    if threads is None:
        declared = max(1, math.ceil(cfg.num_cpus))
        if local and cfg.num_gpus == 0:
            threads = max(declared, int(cluster_cpus // max(1, max_actors)))
            auto["torch_threads"] = "the local CPUs shared by the actors"
        else:
            threads = declared
            auto["torch_threads"] = "ceil(num_cpus)"

    # batches side by side in one actor: on CPU one single-thread batch per thread, at most MAX_AUTO_STREAMS
    # (measured on 2 cores only: 2 x 1 beats 1 x 2 there for both modalities; more streams cost one batch
    # of activations each); GPU actors and compiled forwards run one
    if cfg.num_gpus or cfg.torch_compile:
        streams = 1
        if cfg.cpu_streams not in (None, 1):
            auto["cpu_streams"] = "1: GPU actors and torch_compile run one batch at a time"
    elif cfg.cpu_streams:
        streams = cfg.cpu_streams
    else:
        streams = max(1, min(threads, MAX_AUTO_STREAMS))
        auto["cpu_streams"] = f"one single-thread batch per actor thread, at most {MAX_AUTO_STREAMS}"

    # batch autotuning: on for GPU actors, off on CPU (batches past ~32 rows gain nothing there)
    autotune = cfg.batch_autotune
    if autotune is None:
        autotune = cfg.num_gpus > 0
        auto["batch_autotune"] = "on for GPU actors, off on CPU"
    max_batch = tune_limit(cfg.batch_size, cfg.max_batch_size)
    if cfg.max_batch_size is None:
        auto["max_batch_size"] = "8 x batch_size"

    return {"max_actors": max_actors, "torch_threads": threads, "cpu_streams": streams, "batch_autotune": autotune,
            "max_batch_size": max_batch, "auto": auto}


# -- reading YAML and --set, messages -------------------------------------------------------------------------

def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class that holds the key at ``loc`` (``train.lr`` -> TrainConfig inside TuneConfig)."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return cls


def _format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = ", ".join(sorted(_fields_at(cls or EmbedConfig, tuple(e["loc"])).model_fields))
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
    """Parse CLI ``--set key=value`` pairs; values are read as YAML scalars/lists/mappings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (example: --set batch_size=256)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: {raw!r} is not a YAML value (quote strings that hold : or {{)") from None
    return out


def _merge(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with ``overrides`` on top; None values are skipped, dotted keys set one key inside a mapping."""
    out = dict(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *path, last = key.split(".")
        node = out
        for i, part in enumerate(path):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {key}: {'.'.join(path[:i + 1])} is not a mapping (it is {child!r})")
            node[part] = child = dict(child)
            node = child
        node[last] = value
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
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _redact_storage(value: Any) -> Any:
    """``value`` with every ``storage_options`` mapping in it redacted (their secret-looking values -> ***)."""
    if isinstance(value, dict):
        return {k: redact(v) if k == "storage_options" else _redact_storage(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_storage(v) for v in value]
    return value


def _drop_redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_redacted(v) for k, v in value.items() if v != REDACTED}
    return value


# -- the functions the jobs and tests call (one per use; each is a JobConfig method underneath) ----------------

def build_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, source: str | None = None,
                 cls: type[C] = EmbedConfig) -> C:  # type: ignore[assignment]
    """Defaults <- YAML file <- overrides, validated in one place (any of the job config classes)."""
    return cls.build(path, overrides, source)


def config_from_output(output: str, overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """The embed config a previous run saved beside its output (``_config.json``), with ``overrides`` on top."""
    return EmbedConfig.from_saved(output, overrides)


def dump_config(cfg: JobConfig) -> str:
    return cfg.dump()


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
