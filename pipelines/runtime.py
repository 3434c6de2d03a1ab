"""Where a job runs and with what: joining or starting Ray, and the "auto" rules for the embedding pool
(threads per actor, CPU streams, batch autotuning, pool size), resolved against the cluster."""
from __future__ import annotations

import math
import os
from typing import Any

from operators.embed.autotune import tune_limit
from operators.errors import ConfigError
from pipelines.config import EmbedConfig

MAX_AUTO_STREAMS = 4  # cpu_streams by default: one per actor thread, at most this many


def batch_autotune(cfg: EmbedConfig) -> bool:
    """The config's ``batch_autotune``; by default on for GPU actors only."""
    return cfg.batch_autotune if cfg.batch_autotune is not None else cfg.num_gpus > 0


def actor_streams(cfg: EmbedConfig, torch_threads: int) -> int:
    """Batches each actor runs side by side: the config's ``cpu_streams``; else on CPU one single-thread
    batch per thread, at most MAX_AUTO_STREAMS (measured on 2 cores only: 2 x 1 beats 1 x 2 there for both
    modalities; more streams cost one batch of activations each); GPU actors run one."""
    if cfg.num_gpus or cfg.torch_compile:
        return 1
    return cfg.cpu_streams or max(1, min(torch_threads, MAX_AUTO_STREAMS))


def init_ray(ray_address: str | None = None, local_resources: dict[str, float] | None = None) -> None:
    """Join the Ray cluster at ``ray_address`` (or RAY_ADDRESS), else start a local Ray; no-op when connected.

    ``local_resources``: custom resources a local Ray offers. A local Ray is one node, so it offers the
    resources that a cluster config pins its stages with, and that config runs here unchanged.
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, resources=local_resources or None)


def check_resources(cfg: EmbedConfig) -> dict[str, Any]:
    """Refuse a pool that would leave read/preprocess tasks no CPU (it would hang, not fail)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    plan = {"cluster_cpus": cpus, "cluster_gpus": gpus, "min_actors": cfg.min_actors, "max_actors": cfg.max_actors,
            "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "batch_size": cfg.batch_size, "precision": cfg.precision,
            "batch_autotune": batch_autotune(cfg), "max_batch_size": tune_limit(cfg.batch_size, cfg.max_batch_size)}
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may grow to fit: Ray Data waits
        threads = actor_threads(cfg, cpus, cfg.max_actors, local=False)
        return {**plan, "torch_threads": threads, "cpu_streams": actor_streams(cfg, threads)}
    need_cpu = cfg.min_actors * cfg.num_cpus + cfg.preprocess_num_cpus
    if need_cpu > cpus + 1e-9:
        raise ConfigError(
            f"the embedding pool needs min_actors x num_cpus = {cfg.min_actors} x {cfg.num_cpus} CPUs plus "
            f"preprocess_num_cpus = {cfg.preprocess_num_cpus} for reading, but the cluster has {cpus:g} CPUs; "
            "it would wait forever. Lower num_cpus (fractions like 0.5 work), min_actors or preprocess_num_cpus."
        )
    if cfg.num_gpus > 0 and cfg.min_actors * cfg.num_gpus > gpus + 1e-9:
        raise ConfigError(
            f"num_gpus = {cfg.num_gpus} per actor x min_actors = {cfg.min_actors} needs "
            f"{cfg.min_actors * cfg.num_gpus:g} GPUs but this Ray has {gpus:g}; set num_gpus=0 to run on CPU"
        )
    # on a fixed-size (local) Ray, cap the pool so that reads always keep a CPU
    fit = max(cfg.min_actors, math.floor((cpus - cfg.preprocess_num_cpus) / cfg.num_cpus + 1e-9))
    max_actors = min(cfg.max_actors, fit)
    if cfg.num_gpus > 0:
        max_actors = min(max_actors, max(cfg.min_actors, math.floor(gpus / cfg.num_gpus + 1e-9)))
    threads = actor_threads(cfg, cpus, max_actors, local=True)
    return {**plan, "max_actors": max_actors, "torch_threads": threads, "cpu_streams": actor_streams(cfg, threads)}


def actor_threads(cfg: EmbedConfig, cluster_cpus: float, max_actors: int, local: bool) -> int:
    """Intra-op threads per embedding actor: the config's ``torch_threads``; else, on a local CPU-only Ray,
    the machine's CPUs shared by the actors (read tasks are short bursts: a 2-core laptop with one actor
    runs 2 threads, measured 1.46x the rows/s of 1); else ceil(num_cpus)."""
    if cfg.torch_threads:
        return cfg.torch_threads
    declared = max(1, math.ceil(cfg.num_cpus))
    if not local or cfg.num_gpus > 0:
        return declared
    return max(declared, int(cluster_cpus // max(1, max_actors)))

