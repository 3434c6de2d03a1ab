"""Every Ray the suite starts gets its own ports and temp dir; every child process dies with its process group.

Ports. The OS hands out ephemeral ports from 32768 up (``/proc/sys/net/ipv4/ip_local_port_range``), and a
Ray started by ``ray.init`` (a ``featx`` child's local Ray, the moto server) picks its random ports there.
The suite's own Ray clusters take theirs below that, from 20000 to 31999, a range nobody else on the
machine draws from: each pytest worker (xdist's ``gw0``, ``gw1``...) owns a disjoint slice of it, and each
Ray it starts takes the next block of :data:`BLOCK` ports of its slice, every port named (GCS, raylet,
object manager, dashboard, agents, metrics, client server, and a worker-port range per node). Two Rays of
the suite can then never race for a port, and none of them can take a port between a "free" check and
its bind (``bind``-then-close was how ports were found before; another Ray could take one in between).

Temp dirs. Each Ray gets its own short temp dir (Ray's socket paths must stay under 107 bytes), removed when
it shuts down; each pytest worker (:func:`own_ray_tmpdir`, from conftest) and each child process its own
``RAY_TMPDIR``, so no two Rays share ``ray_current_cluster`` or the port cache, and nothing depends on what
an earlier run left in ``/tmp/ray`` (``Cluster`` writes ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``
without creating its folder: on a machine where no Ray ever ran, every cluster failed to start).

Children. :func:`run` starts a command in its own session and kills its whole process group when it
returns or runs past its timeout, so a child's Ray (raylet, GCS, agents, workers) never outlives the test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOW, HIGH = 20000, 32000  # below the ephemeral range (32768-60999 here): only the suite takes ports from it
BLOCK = 400  # ports per Ray cluster: 10 named ports per node (up to 4 nodes), then each node's worker ports
NAMED_PER_NODE, MAX_NODES = 10, 4
ENV_BLOCK = "FEATX_TEST_PORT_BLOCK"  # a child process that starts a Ray cluster gets its block from its parent
_next = [0]


def _worker() -> tuple[int, int]:
    """(this pytest worker's index, how many workers): gw3 of 4 -> (3, 4); no xdist -> (0, 1)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    return index, max(count, index + 1)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_block() -> int:
    """The first port of the next free block of this worker's slice (every port of it bindable now)."""
    inherited = os.environ.get(ENV_BLOCK)
    if inherited:
        return int(inherited)
    index, count = _worker()
    per = (HIGH - LOW) // count // BLOCK  # blocks in each worker's slice
    if per < 1:
        raise RuntimeError(f"{count} pytest workers do not fit {BLOCK}-port blocks in {LOW}-{HIGH}")
    for _ in range(per):
        base = LOW + (index * per + _next[0] % per) * BLOCK
        _next[0] += 1
        if all(_bindable(p) for p in range(base, base + BLOCK)):
            return base
    raise RuntimeError(f"no free block of {BLOCK} ports in pytest worker {index}'s slice of {LOW}-{HIGH}: "
                       "a Ray from an earlier run may still be alive (`ray stop` kills them all)")


_made: list[str] = []  # this process's temp dirs, removed at its end (remove_temp_dirs)


def temp_dir() -> str:
    """A short, fresh temp dir for one Ray (socket paths under 107 bytes)."""
    d = tempfile.mkdtemp(prefix="fxr-", dir="/tmp")
    _made.append(d)
    return d


def remove_temp_dirs() -> None:
    """Remove every temp dir this process made (a Ray session leaves ~15 MB of logs in each: a suite run made
    ~40, and runs on one machine filled its disk). Called when pytest ends, after every child was killed."""
    import shutil

    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


def ray_tmpdir() -> str:
    """A fresh ``RAY_TMPDIR`` for one process, with the ``ray/`` folder Ray writes ``ray_current_cluster`` into
    (``Cluster`` does not create it)."""
    d = temp_dir()
    os.makedirs(os.path.join(d, "ray"))
    return d


def own_ray_tmpdir() -> str:
    """This process's own ``RAY_TMPDIR`` (:func:`ray_tmpdir`)."""
    os.environ["RAY_TMPDIR"] = ray_tmpdir()
    return os.environ["RAY_TMPDIR"]


@dataclass
class RayPorts:
    """Every port of a local Ray cluster of up to :data:`MAX_NODES` nodes, from one block."""

    base: int

    def node(self, i: int) -> dict[str, Any]:
        """``RayParams`` keyword arguments (``Cluster.add_node``) naming every port of node ``i`` (0: head)."""
        if not 0 <= i < MAX_NODES:
            raise ValueError(f"node {i}: a block holds {MAX_NODES} nodes")
        p = self.base + i * NAMED_PER_NODE
        workers = (BLOCK - MAX_NODES * NAMED_PER_NODE) // MAX_NODES
        lo = self.base + MAX_NODES * NAMED_PER_NODE + i * workers
        args = {"node_manager_port": p, "object_manager_port": p + 1, "dashboard_agent_listen_port": p + 2,
                "metrics_agent_port": p + 3, "metrics_export_port": p + 4, "runtime_env_agent_port": p + 5,
                "min_worker_port": lo, "max_worker_port": lo + workers - 1}
        if i == 0:
            args.update(gcs_server_port=p + 6, dashboard_port=p + 7, ray_client_server_port=p + 8)
        return args

    def start_flags(self) -> list[str]:
        """The same ports for node 0 as ``ray start --head`` flags."""
        a = self.node(0)
        return ["--port", str(a["gcs_server_port"]), "--node-manager-port", str(a["node_manager_port"]),
                "--object-manager-port", str(a["object_manager_port"]),
                "--dashboard-port", str(a["dashboard_port"]),
                "--dashboard-agent-listen-port", str(a["dashboard_agent_listen_port"]),
                "--dashboard-agent-grpc-port", str(a["metrics_agent_port"]),
                "--metrics-export-port", str(a["metrics_export_port"]),
                "--runtime-env-agent-port", str(a["runtime_env_agent_port"]),
                "--ray-client-server-port", str(a["ray_client_server_port"]),
                "--min-worker-port", str(a["min_worker_port"]), "--max-worker-port", str(a["max_worker_port"])]


class LocalCluster:
    """A ``ray.cluster_utils.Cluster`` whose every node has named ports from one block and one temp dir."""

    def __init__(self, **head: Any) -> None:
        from ray.cluster_utils import Cluster

        self.ports = RayPorts(port_block())
        self.temp_dir = temp_dir()
        self._nodes = 0
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "include_dashboard": False, **head, **self.ports.node(0), "temp_dir": self.temp_dir})
        self._nodes = 1

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def head_node(self) -> Any:
        return self.cluster.head_node

    def add_node(self, **args: Any) -> Any:
        """A node with the next free node slot's ports (a removed node's slot is not reused)."""
        node = self.cluster.add_node(**args, **self.ports.node(self._nodes))
        self._nodes += 1
        return node

    def remove_node(self, node: Any, allow_graceful: bool = True) -> None:
        self.cluster.remove_node(node, allow_graceful=allow_graceful)

    def shutdown(self) -> None:
        import shutil

        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def child_env(extra: dict[str, str] | None = None, keep_ray_address: bool = False) -> dict[str, str]:
    """A child's environment: this repo on ``PYTHONPATH``, its own ``RAY_TMPDIR``, no inherited ``RAY_ADDRESS``
    (a ``featx`` child starts its own local Ray unless told where one is) and a port block if it starts a
    cluster (:func:`port_block` in the child returns it)."""
    env = {k: v for k, v in os.environ.items() if keep_ray_address or k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    env["RAY_TMPDIR"] = ray_tmpdir()
    env[ENV_BLOCK] = str(port_block())
    env.update(extra or {})
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (its own Ray included), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def popen(cmd: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """A child in its own session (its own process group): pair with :func:`kill_group`."""
    return subprocess.Popen(cmd, env=env if env is not None else child_env(), start_new_session=True, **kwargs)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a child to the end (output captured as text); its whole process group is killed when it returns or
    runs past ``timeout`` (which fails the test with its output's tail)."""
    proc = popen(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ran past {timeout} s\n{(out or '')[-3000:]}\n"
                             f"{(err or '')[-3000:]}") from None
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def python(code_or_module: list[str], timeout: float, env: dict[str, str] | None = None,
           **kwargs: Any) -> subprocess.CompletedProcess:
    """``run`` with this interpreter: ``python(["-c", SCRIPT, *args], ...)`` or ``python(["-m", "pipelines.cli", ...])``."""
    return run([sys.executable, *code_or_module], timeout, env, **kwargs)
