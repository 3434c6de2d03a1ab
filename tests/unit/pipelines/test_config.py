"""One config object: shipped YAMLs load, bad keys/values fail early and clearly, secrets never leak."""
from __future__ import annotations

from pathlib import Path

import pytest

from operators.errors import ConfigError
from pipelines.config import CONFIG_DIR, EmbedConfig, build_config, dump_config, parse_set

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs() -> None:
    assert {p.name for p in SHIPPED} >= {"text-minilm.yaml", "image-efficientnet.yaml"}


def _kind(path: Path) -> type:
    from pipelines.config import FinetuneConfig, TrainConfig, TuneConfig

    return {"train": TrainConfig, "finetune": FinetuneConfig, "tune": TuneConfig}.get(path.name.split("-")[0], EmbedConfig)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cls = _kind(path)
    cfg = build_config(path, cls=cls)
    assert isinstance(cfg, cls)
    if cls is EmbedConfig:
        from pipelines.config import model_spec

        spec = model_spec(cfg)  # the model exists and matches the format
        assert spec.modality == ("text" if cfg.is_text else "image")
    elif cls.__name__ == "FinetuneConfig":
        from pipelines.learn.finetune import model_spec as ft_spec

        spec = ft_spec(cfg)
        assert spec.modality == ("text" if cfg.format in ("jsonl", "parquet") else "image")


def test_set_overrides_the_yaml() -> None:
    cfg = build_config(CONFIG_DIR / "text-minilm.yaml", parse_set(["batch_size=256", "passthrough=[a, b]", "num_gpus=0.5"]))
    assert cfg.batch_size == 256 and cfg.passthrough == ["a", "b"] and cfg.num_gpus == 0.5
    # a shipped config is found by name too
    assert build_config("text-minilm.yaml").model == "minilm-l6"


def test_unknown_key_names_the_key_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "batchsize": 3})
    msg = str(e.value)
    assert "batchsize: unknown key" in msg and "batch_size" in msg


def test_bad_values_name_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as e:
        build_config(None, {"input": "x", "output": "y", "format": "tiff"})
    assert "format" in str(e.value) and "'images'" in str(e.value) and "'tiff'" in str(e.value)
    with pytest.raises(ConfigError, match="precision"):
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "precision": "int3"})
    with pytest.raises(ConfigError, match="fp16' needs a GPU"):
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "precision": "fp16"})
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "batch_size": 0})
    with pytest.raises(ConfigError, match="input: required"):
        build_config(None, {"output": "y", "format": "jsonl"})
    with pytest.raises(ConfigError, match="min_actors"):
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "min_actors": 3, "max_actors": 2})
    with pytest.raises(ConfigError, match=r"max_batch_size \(16\) must be >= batch_size \(64\)"):
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "max_batch_size": 16})


def test_autotune_and_compile_reach_the_actor_with_their_defaults() -> None:
    """Batch autotuning is on for GPU actors unless set; torch.compile is off unless set and runs one stream."""
    from operators.models.registry import resolve
    from pipelines.embed.stream import embed_actor_args

    spec = resolve("minilm-l6")
    base = {"input": "x", "output": "y", "format": "jsonl"}
    cpu = embed_actor_args(build_config(None, base), spec, 2)
    assert cpu["autotune"] is False and cpu["torch_compile"] is False and cpu["streams"] == 2
    gpu = embed_actor_args(build_config(None, {**base, "num_gpus": 1, "max_batch_size": 512}), spec, 2)
    assert gpu["autotune"] is True and gpu["max_batch_size"] == 512 and gpu["streams"] == 1
    forced = embed_actor_args(build_config(None, {**base, "batch_autotune": True, "torch_compile": True}), spec, 2)
    assert forced["autotune"] is True and forced["torch_compile"] is True and forced["streams"] == 1


def test_missing_file_and_bad_set() -> None:
    with pytest.raises(ConfigError, match="shipped configs"):
        build_config("nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["batch_size"])


def test_model_and_format_must_match() -> None:
    from pipelines.config import model_spec

    with pytest.raises(ConfigError, match="text model but format 'images'"):
        model_spec(build_config(None, {"input": "x", "output": "y", "format": "images", "model": "minilm-l6"}))


def test_secrets_are_redacted_in_the_saved_config() -> None:
    cfg = build_config(None, {"input": "s3://b/x", "output": "s3://b/y", "format": "jsonl",
                              "storage_options": {"key": "AKIA-CANARY", "secret": "CANARY-SECRET",
                                                  "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}})
    text = dump_config(cfg) + repr(cfg.public_dict())
    assert "CANARY" not in text and "127.0.0.1:9" in text
