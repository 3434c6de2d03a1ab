"""Where a job runs and with what: joining or starting Ray, and the embedding pool checked against the cluster.

The "auto" rules themselves (threads per actor, CPU streams, batch autotuning, pool size) live in one
function beside the config, :func:`pipelines.config.resolve_auto`; :func:`check_resources` feeds it the
cluster and returns what each rule resolved to (the run report's ``resources``).
"""
from __future__ import annotations

import os
from typing import Any

from operators.errors import ConfigError
from pipelines.config import MAX_AUTO_STREAMS, EmbedConfig, resolve_auto

__all__ = ["MAX_AUTO_STREAMS", "actor_streams", "actor_threads", "batch_autotune", "check_resources", "init_ray",
           "is_local", "resolve_auto"]


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
        # "local": a Ray of this job's own, never whichever Ray happens to run on this machine (ray.init() with
        # no address attaches to the latest one it finds: another user's, or one with other auth settings)
        ray.init(address="local", include_dashboard=False, log_to_driver=True, resources=local_resources or None)


def is_local(cfg: EmbedConfig) -> bool:
    """Whether the job runs on a local Ray of fixed size (no address given): its CPUs are all there is."""
    return not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def check_resources(cfg: EmbedConfig) -> dict[str, Any]:
    """The embedding pool on this Ray: the declared resources and every "auto" value resolved (``auto`` names
    each one and its rule). Refuses a pool that would leave read/preprocess tasks no CPU (it would hang, not
    fail) or that asks for GPUs a local Ray lacks; an autoscaling cluster may grow to fit, so there Ray waits."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    local = is_local(cfg)
    if local:
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
    return {"cluster_cpus": cpus, "cluster_gpus": gpus, "local_ray": local, "min_actors": cfg.min_actors,
            "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "batch_size": cfg.batch_size,
            "precision": cfg.precision, **resolve_auto(cfg, cpus, gpus, local)}


# -- one resolved value each, for callers that need just that one (the rules are in resolve_auto) --------------

def batch_autotune(cfg: EmbedConfig) -> bool:
    """The config's ``batch_autotune``; by default on for GPU actors only."""
    return bool(resolve_auto(cfg, 0.0, 0.0, local=False)["batch_autotune"])


def actor_streams(cfg: EmbedConfig, torch_threads: int) -> int:
    """Batches each actor runs side by side, for actors of ``torch_threads`` threads."""
    actor = cfg.model_copy(update={"torch_threads": torch_threads})
    return int(resolve_auto(actor, 0.0, 0.0, local=False)["cpu_streams"])


def actor_threads(cfg: EmbedConfig, cluster_cpus: float, max_actors: int, local: bool) -> int:
    """Intra-op threads per embedding actor in a pool of at most ``max_actors`` on ``cluster_cpus`` CPUs."""
    pool = cfg.model_copy(update={"min_actors": 1, "max_actors": max_actors})
    gpus = max_actors * cfg.num_gpus  # GPUs for the whole pool: only the CPUs cap it here
    return int(resolve_auto(pool, cluster_cpus, gpus, local)["torch_threads"])
