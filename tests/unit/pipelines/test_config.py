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


# -- one base for every job config ------------------------------------------------------------------------------

def test_every_job_config_shares_the_base_and_dumps_redacted() -> None:
    """public_dict / dump on every job (tune once had none), nested storage_options redacted too."""
    from pipelines.config import JOBS, JobConfig, TuneConfig

    for cls in set(JOBS.values()):
        assert issubclass(cls, JobConfig)
    secret = {"key": "AKIA-CANARY", "secret": "CANARY-SECRET", "anon": False}
    tune = build_config(CONFIG_DIR / "tune-head.yaml", {"train.storage_options": secret}, cls=TuneConfig)
    assert tune.train.epochs == 40 and tune.train.storage_options["secret"] == "CANARY-SECRET"
    text = tune.dump() + repr(tune.public_dict())
    assert "CANARY" not in text and '"anon": false' in text
    assert tune.public_dict()["grid"] == {"lr": [0.001, 0.01], "hidden": [64, 256]}


def test_shared_field_groups_are_declared_once() -> None:
    """A key that several jobs share comes from one field group, with one default and one description."""
    from pipelines.config import (
        BackboneFields,
        ComputeFields,
        EmbedConfig,
        FinetuneConfig,
        HeadFields,
        InputFields,
        RayFields,
        StorageFields,
        TrainConfig,
        TrainerFields,
    )

    groups = {StorageFields: (EmbedConfig, TrainConfig, FinetuneConfig), InputFields: (EmbedConfig, FinetuneConfig),
              BackboneFields: (EmbedConfig, FinetuneConfig), ComputeFields: (EmbedConfig, FinetuneConfig),
              RayFields: (EmbedConfig, TrainConfig, FinetuneConfig), HeadFields: (TrainConfig, FinetuneConfig),
              TrainerFields: (TrainConfig, FinetuneConfig)}
    for group, jobs in groups.items():
        for job in jobs:
            assert issubclass(job, group)
            for name, field in group.model_fields.items():
                assert repr(job.model_fields[name]) == repr(field), (job.__name__, name)
    # the keys whose defaults differ between jobs stay each job's own
    assert (EmbedConfig.model_fields["model"].default, FinetuneConfig.model_fields["model"].default) == (
        "minilm-l6", "efficientnet-lite0")
    assert [c.model_fields["batch_size"].default for c in (EmbedConfig, TrainConfig, FinetuneConfig)] == [64, 256, 32]
    assert (TrainConfig.model_fields["patience"].default, FinetuneConfig.model_fields["patience"].default) == (8, 3)


def test_the_keys_of_every_job_are_kept() -> None:
    """YAMLs written for earlier featx versions still load: no key was renamed or dropped."""
    from pipelines.config import FinetuneConfig, TrainConfig, TuneConfig

    keys = {
        EmbedConfig: "input format text_column image_column key_column passthrough storage_options output "
                     "embedding_dtype max_error_fraction piece_max_shards piece_target_mb shard_fingerprint "
                     "keep_snapshots reuse lease_ttl_s "
                     "max_task_retries journal_interval_s max_record_attempts task_timeout_s progress_interval_s "
                     "model weights revision pooling normalize "
                     "max_length trust_remote_code batch_size batch_autotune max_batch_size torch_compile num_gpus "
                     "num_cpus min_actors max_actors precision image_decode preprocess_num_cpus preprocess_memory_mb "
                     "torch_threads cpu_streams embed_resources preprocess_resources ray_address",
        TrainConfig: "embeddings label_column output head hidden dropout standardize epochs batch_size lr weight_decay "
                     "class_weighting val_fraction split_column metric patience adapt_to coral_eps num_workers "
                     "cpus_per_worker use_gpu seed storage_options ray_address l2_c cv_grid cv_folds cv_max_rows solver_tol max_iter "
                     "refit",
        FinetuneConfig: "input format label_column text_column image_column key_column storage_options output model "
                        "weights pooling max_length image_size trust_remote_code head hidden dropout epochs batch_size "
                        "lr_head lr_backbone weight_decay trainable_groups unfreeze class_weighting val_fraction "
                        "split_column metric patience precision num_workers cpus_per_worker use_gpu torch_threads "
                        "seed ray_address",
        TuneConfig: "train grid cpus_per_trial max_concurrent_trials",
    }
    for cls, names in keys.items():
        assert set(cls.model_fields) == set(names.split()), cls.__name__


def test_a_saved_config_loads_back_without_its_secrets(tmp_path: Path) -> None:
    from pipelines.config import SAVED_CONFIG, config_from_output

    cfg = build_config(None, {"input": str(tmp_path / "in"), "output": str(tmp_path), "format": "jsonl",
                              "storage_options": {"secret": "CANARY", "anon": True}, "batch_size": 7})
    (tmp_path / SAVED_CONFIG).write_text(cfg.dump())
    again = config_from_output(str(tmp_path), {"max_actors": 2})
    assert again.batch_size == 7 and again.max_actors == 2 and again.storage_options == {"anon": True}
    assert EmbedConfig.from_saved(str(tmp_path)).input == str(tmp_path / "in")
    with pytest.raises(Exception, match="no saved config"):
        EmbedConfig.from_saved(str(tmp_path / "elsewhere"))


def test_dotted_set_keys_reach_inside_and_nested_unknown_keys_name_their_own_fields() -> None:
    from pipelines.config import TuneConfig

    base = {"train": {"embeddings": "/e", "output": "/o", "head": "mlp"}, "grid": {"lr": [0.1]}}
    cfg = build_config(None, {**base, **parse_set(["train.epochs=3", "grid.hidden=[8, 16]"])}, cls=TuneConfig)
    assert cfg.train.epochs == 3 and cfg.train.embeddings == "/e" and cfg.grid == {"lr": [0.1], "hidden": [8, 16]}
    with pytest.raises(ConfigError) as e:
        build_config(None, {**base, "train.epoch": 3}, cls=TuneConfig)
    assert "train.epoch: unknown key" in str(e.value) and "coral_eps" in str(e.value)
    with pytest.raises(ConfigError, match="not a mapping"):
        build_config(None, {"input": "x", "output": "y", "format": "jsonl", "model": "m", "model.name": "z"})


def test_local_paths_become_absolute_uris_stay() -> None:
    """Ray's workers do not run in the driver's folder: a relative path means 'from where featx started'."""
    import os

    from pipelines.config import TrainConfig

    cfg = build_config(None, {"input": "data/in", "output": "s3://bucket/out", "format": "jsonl"})
    assert cfg.input == os.path.join(os.getcwd(), "data/in") and cfg.output == "s3://bucket/out"
    train = build_config(None, {"embeddings": "emb", "output": "file:///x", "adapt_to": "t"}, cls=TrainConfig)
    assert os.path.isabs(train.embeddings) and os.path.isabs(train.adapt_to or "") and train.output == "file:///x"


# -- the "auto" rules -------------------------------------------------------------------------------------------

def test_resolve_auto_names_every_value_it_decided() -> None:
    from pipelines.config import resolve_auto

    base = {"input": "x", "output": "y", "format": "jsonl"}
    laptop = resolve_auto(build_config(None, base), cluster_cpus=2, cluster_gpus=0, local=True)
    picked = {k: laptop[k] for k in ("max_actors", "torch_threads", "cpu_streams", "batch_autotune", "max_batch_size")}
    assert picked == {"max_actors": 1, "torch_threads": 2, "cpu_streams": 2, "batch_autotune": False,
                      "max_batch_size": 512}
    assert set(laptop["auto"]) == {"torch_threads", "cpu_streams", "batch_autotune", "max_batch_size"}

    capped = resolve_auto(build_config(None, {**base, "max_actors": 4, "num_cpus": 0.5}), 2, 0, local=True)
    assert capped["max_actors"] == 2 and "max_actors" in capped["auto"] and capped["torch_threads"] == 1

    gpus = build_config(None, {**base, "num_gpus": 0.5, "max_actors": 8, "num_cpus": 2, "cpu_streams": 3})
    cluster = resolve_auto(gpus, cluster_cpus=4, cluster_gpus=1, local=False)
    assert [cluster[k] for k in ("max_actors", "torch_threads", "cpu_streams", "batch_autotune")] == [8, 2, 1, True]
    assert "cpu_streams" in cluster["auto"]  # set, but GPU actors run one: the rule says why
    local_gpu = resolve_auto(gpus, cluster_cpus=16, cluster_gpus=1, local=True)
    assert local_gpu["max_actors"] == 2  # two actors share the one GPU

    fixed = build_config(None, {**base, "torch_threads": 3, "cpu_streams": 1, "batch_autotune": True,
                                "max_batch_size": 64})
    assert resolve_auto(fixed, 2, 0, local=True)["auto"] == {}  # nothing left to a rule
