"""Every YAML under cluster/ parses and carries the fields its kind requires; each command is a real featx command.

The field sets below are the KubeRay `ray.io/v1` CRD fields these manifests use, checked against the KubeRay
CRDs and API reference (RayCluster, RayJob, RayCronJob of KubeRay 1.6/1.7): a key outside them is a typo that
the API server would drop or refuse.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pipelines.config import CONFIG_DIR, build_config

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))

RAYCLUSTER_SPEC = {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "idleTimeoutSeconds", "numOfHosts", "scaleStrategy", "suspend"}
AUTOSCALER = {"upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "env", "envFrom",
              "securityContext", "version"}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
               "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "submissionMode",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "metadata", "suspend", "jobId",
               "deletionStrategy", "submitterPodTemplate", "submitterConfig", "managedBy"}
RAYCRONJOB_SPEC = {"schedule", "timeZone", "suspend", "jobTemplate"}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW(OR)?D|CREDENTIAL", re.IGNORECASE)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in YAMLS for d in _docs(p) if isinstance(d, dict) and d.get("kind") == kind]


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k), v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown RayClusterSpec keys {set(spec) - RAYCLUSTER_SPEC}"
    assert spec["authOptions"]["mode"] == "token", f"{where}: the dashboard must require Ray's token"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: no public exposure of the head"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head runs no tasks"
    _containers(head)
    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert set(g) <= WORKER_GROUP, f"{where}: unknown worker group keys {set(g) - WORKER_GROUP}"
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert isinstance(g["rayStartParams"], dict)
        _containers(g)
    for group in [head, *groups]:  # KubeRay passes rayStartParams as strings (map[string]string)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: quote rayStartParams"
    gpu = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g))]
    cpu = [g for g in groups if g not in gpu]
    assert gpu and all(g["maxReplicas"] > g["minReplicas"] for g in gpu), f"{where}: an autoscaling GPU group"
    assert any("featx_preprocess" in g["rayStartParams"].get("resources", "") for g in cpu), \
        f"{where}: a CPU group offering the featx_preprocess resource that preprocess_resources asks for"
    assert spec["enableInTreeAutoscaling"] is True


def check_featx_command(entrypoint: str, where: str) -> None:
    """A real featx command (parsed by featx's own CLI, nothing run) whose --config exists in the repo."""
    import click
    from typer.main import get_command

    from pipelines.cli.app import app

    argv = shlex.split(entrypoint)
    assert argv[0] == "featx", f"{where}: {entrypoint!r} is not a featx command"
    group = get_command(app)
    ctx = click.Context(group)
    cmd = group.get_command(ctx, argv[1])
    assert cmd is not None, f"{where}: featx has no command {argv[1]!r}"
    params = cmd.make_context(argv[1], argv[2:]).params  # raises on unknown options
    assert params.get("config"), f"{where}: give the job its config file"
    assert (CONFIG_DIR / Path(params["config"]).name).is_file() or Path(params["config"]).is_file()
    build_config(params["config"])  # the config is valid for the job


def check_no_literal_secrets(doc: Any, where: str) -> None:
    for key, value in _walk(doc):
        if key == "env" and isinstance(value, list):
            for e in value:
                assert not (SECRET_NAME.search(e["name"]) and "value" in e), \
                    f"{where}: {e['name']} holds a literal value; use valueFrom.secretKeyRef or a workload identity"
    text = yaml.safe_dump(doc)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{where}: an AWS access key id in YAML"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_and_holds_no_literal_secret(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for d in docs:
        check_no_literal_secrets(d, str(path))


def test_the_expected_manifests_exist() -> None:
    kinds = {d.get("kind") for p in YAMLS for d in _docs(p) if isinstance(d, dict)}
    assert {"RayCluster", "RayJob", "RayCronJob", "ServiceAccount"} <= kinds
    assert (CLUSTER / "kuberay" / "raycronjob-nightly-refresh.yaml").is_file()
    assert (CLUSTER / "vm" / "aws-gpu.yaml").is_file()


def test_ray_clusters() -> None:
    for path, d in _all("RayCluster"):
        assert d["apiVersion"] == "ray.io/v1" and d["metadata"]["name"]
        check_ray_cluster_spec(d["spec"], str(path))


def _check_ray_job_spec(spec: dict[str, Any], where: str) -> None:
    assert set(spec) <= RAYJOB_SPEC, f"{where}: unknown RayJobSpec keys {set(spec) - RAYJOB_SPEC}"
    assert isinstance(spec["entrypoint"], str)
    check_featx_command(spec["entrypoint"], where)
    renv = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert set(renv) <= {"env_vars", "pip", "working_dir", "py_modules", "excludes", "config"}
    assert not any(SECRET_NAME.search(k) for k in renv.get("env_vars", {})), f"{where}: secrets in the runtime env"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{where}: a cluster spec or a selector"
    if "rayClusterSpec" in spec:
        check_ray_cluster_spec(spec["rayClusterSpec"], where)
        assert spec["shutdownAfterJobFinishes"] is True  # the GPU nodes do not outlive the job


def test_ray_jobs() -> None:
    jobs = _all("RayJob")
    assert jobs
    for path, d in jobs:
        assert d["apiVersion"] == "ray.io/v1" and d["metadata"]["name"]
        _check_ray_job_spec(d["spec"], str(path))
    assert any(shlex.split(d["spec"]["entrypoint"])[1] == "embed" for _, d in jobs)


def test_ray_cron_jobs() -> None:
    crons = _all("RayCronJob")
    assert crons
    for path, d in crons:
        spec = d["spec"]
        assert d["apiVersion"] == "ray.io/v1" and len(d["metadata"]["name"]) <= 52
        assert set(spec) <= RAYCRONJOB_SPEC, f"{path}: unknown RayCronJobSpec keys {set(spec) - RAYCRONJOB_SPEC}"
        fields = spec["schedule"].split()
        assert len(fields) == 5 and "TZ" not in spec["schedule"], "a five-field cron schedule; the zone in timeZone"
        from zoneinfo import ZoneInfo

        ZoneInfo(spec["timeZone"])  # a real IANA zone
        assert "spec" not in spec["jobTemplate"], "jobTemplate is a RayJobSpec itself"
        _check_ray_job_spec(spec["jobTemplate"], str(path))
        assert shlex.split(spec["jobTemplate"]["entrypoint"])[1] == "refresh"


def test_vm_cluster_config() -> None:
    path = CLUSTER / "vm" / "aws-gpu.yaml"
    cfg = _docs(path)[0]
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"} <= set(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, t in types.items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(t), name
        assert t["min_workers"] <= t["max_workers"] and t["node_config"]["InstanceType"]
        assert "IamInstanceProfile" in t["node_config"], f"{name}: credentials from the instance role"
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert any(t["resources"].get("GPU", 0) > 0 and t["max_workers"] > t["min_workers"] for t in types.values())
    assert any("featx_preprocess" in t["resources"] for t in types.values())
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)


def test_systemd_timer_and_service_run_refresh() -> None:
    service = (CLUSTER / "systemd" / "featx-refresh.service").read_text()
    timer = (CLUSTER / "systemd" / "featx-refresh.timer").read_text()
    exec_start = next(ln.split("=", 1)[1] for ln in service.splitlines() if ln.startswith("ExecStart="))
    check_featx_command("featx " + exec_start.split("featx ", 1)[1], "featx-refresh.service")
    assert "Type=oneshot" in service and re.search(r"^OnCalendar=.+ Europe/Berlin$", timer, re.M)
