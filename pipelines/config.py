"""One config object per job. Defaults live here and nowhere else.

YAML files under ``pipelines/configs/`` only override these defaults; the CLI's
``--set key=value`` overrides both. Unknown keys and bad values fail here,
before any Ray work starts, with a message naming the key and what is allowed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operators.errors import ConfigError
from operators.storage import redact

InputFormat = Literal["images", "webdataset", "parquet", "jsonl", "parquet-images"]
TEXT_FORMATS: frozenset[str] = frozenset({"parquet", "jsonl"})
IMAGE_FORMATS: frozenset[str] = frozenset({"images", "webdataset", "parquet-images"})

CONFIG_DIR: Path = Path(__file__).parent / "configs"


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
    batch_size: int = Field(64, ge=1, description="Rows per forward pass")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor; fractions allowed")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor; fractions allowed")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    preprocess_num_cpus: float = Field(1.0, gt=0, description="CPUs per read/preprocess task")
    preprocess_memory_mb: int = Field(1024, ge=64, description="Memory reserved per read/preprocess task")
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads per actor (default: ceil(num_cpus))")

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
        if self.precision == "fp16" and self.num_gpus == 0:
            raise ValueError("precision 'fp16' needs a GPU (num_gpus > 0); use 'fp32' or 'bf16' on CPU")
        return self

    @property
    def is_text(self) -> bool:
        return self.format in TEXT_FORMATS

    def public_dict(self) -> dict[str, Any]:
        """The resolved config with secrets redacted: safe to log and save."""
        data = self.model_dump()
        data["storage_options"] = redact(data["storage_options"])
        return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = ", ".join(sorted(EmbedConfig.model_fields))
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
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, source: str | None = None
) -> EmbedConfig:
    """Defaults <- YAML file <- overrides, validated in one place."""
    data: dict[str, Any] = load_yaml(path) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return EmbedConfig(**data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source or str(path or "command line"))) from None


def _drop_redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_redacted(v) for k, v in value.items() if v != "***"}
    return value


def config_from_output(output: str, overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """The config a previous run saved beside its output (``_config.json``), with ``overrides`` on top.

    Secrets were never saved: they come again from the environment (instance roles, AWS_* variables).
    """
    from operators.errors import InputError
    from operators.storage import join, read_bytes

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


def dump_config(cfg: EmbedConfig) -> str:
    return json.dumps(cfg.public_dict(), indent=2, sort_keys=True)
