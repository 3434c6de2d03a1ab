"""`featx submit` / `featx jobs` against a real Ray head with token auth, started by the test from the venv.

One head for the session, shared with test_cli_commands.py (`ray start --head --block` in its own
session, every port free and on loopback, its own temp dir; stopped by signalling its process group, so
other Ray instances on the machine are left alone). The head gets S3 credentials from its environment,
as a cluster gets them from an instance role or a Kubernetes Secret: the secret key is the canary that
must not show up anywhere.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from tests.conftest import S3_SECRET, upload
from tests.integration.helpers import assert_matches_reference, reference_embeddings
from tests.isolation import RayPorts, port_block, ray_tmpdir, run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CANARY = S3_SECRET  # AWS_SECRET_ACCESS_KEY of the moto server: the job really uses it


def _clean_env(**extra: str) -> dict[str, str]:
    """The submitter's environment: no Ray auth settings or addresses inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), **extra})
    return env


_HEAD: dict[str, Any] = {}  # the session's one head, shared with tests/integration/test_cli_commands.py


@pytest.fixture(scope="session")
def ray_head(s3_server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The session's Ray head. A module that imports this fixture gets its own copy of it from pytest, so the
    head itself is kept here: the first copy starts it and stops it at the end of the session."""
    if _HEAD:
        yield _HEAD
        return
    with _running_head() as head:
        _HEAD.update(head)
        try:
            yield head
        finally:
            _HEAD.clear()


@contextmanager
def _running_head() -> Iterator[dict[str, Any]]:
    """A token-auth Ray head on loopback, every port named from this pytest worker's own range (no other Ray
    on the machine draws from it: tests/isolation.py), so it starts at the first try or the test fails with
    its logs."""
    head = _start_head()
    if isinstance(head, str):
        raise RuntimeError("the Ray head did not start:\n" + head)
    proc, info = head
    try:
        yield info
    finally:
        _stop_head(proc, info["tmp"])


def _start_head() -> tuple[subprocess.Popen, dict[str, Any]] | str:
    """A started head (its process and url/token/tmp), or the tail of its logs when it died while starting."""
    tmp = Path(f"/tmp/fxs-{secrets.token_hex(3)}")  # short: Ray's socket paths must stay under 107 bytes
    tmp.mkdir()
    token = secrets.token_hex(24)
    token_file = tmp / "token"
    token_file.write_text(token)
    ports = RayPorts(port_block())  # every port named, from this pytest worker's own range (tests/isolation.py)
    dash = ports.node(0)["dashboard_port"]
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), HF_HUB_OFFLINE="1",
                     PATH=f"{BIN}:{os.environ.get('PATH', '')}")  # the job's `python` is the venv's
    with open(tmp / "head.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--dashboard-host", "127.0.0.1", *ports.start_flags(), "--num-cpus", "2", "--num-gpus", "0",
             "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(tmp))
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:
        try:
            req = urllib.request.Request(url + "/api/version", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(req, timeout=2).read()
            return proc, {"url": url, "token": token, "tmp": tmp}
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = (tmp / "head.log").read_text()[-1500:]
                for extra in sorted((tmp / "ray").glob("session_*/logs/dashboard.*"))[:2]:
                    logs += f"\n{extra.name}: " + extra.read_text(errors="replace")[-1500:]
                _stop_head(proc, tmp)
                return logs
            time.sleep(0.5)


def _stop_head(proc: subprocess.Popen, tmp: Path) -> None:
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):  # the head's whole process group, by its id
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def _featx(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    exe = [str(BIN / "featx")] if (BIN / "featx").exists() else [sys.executable, "-m", "pipelines.cli"]
    return run(exe + args, timeout, env={"RAY_TMPDIR": ray_tmpdir(), **env}, cwd=str(REPO))


def _jobs(head: dict[str, Any], args: list[str]) -> Any:
    """`featx jobs ...` in this process (the submit calls above run as real subprocesses)."""
    from typer.testing import CliRunner

    from pipelines.cli.app import app

    return CliRunner().invoke(app, ["jobs", "--address", head["url"], *args], env={"RAY_AUTH_TOKEN": head["token"]})


def _client(head: dict[str, Any]) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["url"], headers={"Authorization": f"Bearer {head['token']}"})


def test_submit_embed_job_succeeds_with_token_and_leaks_no_secret(
        ray_head: dict[str, Any], tmp_path: Path, tiny_bert: str, s3_fs: Any, s3_bucket: str) -> None:
    from pipelines.demo.sample_data import write_text_shards
    from pipelines.read.table import read_table

    info = write_text_shards(tmp_path / "in", fmt="jsonl", shards=3, max_per_topic=4, limit=24)
    src = upload(s3_fs, tmp_path / "in", s3_bucket, "in")
    out = tmp_path / "out"
    env = _clean_env(RAY_AUTH_TOKEN=ray_head["token"])
    r = _featx(["submit", "--address", ray_head["url"], "--env", "HF_HUB_OFFLINE=1", "--",
                "featx", "embed", "--input", src, "--format", "jsonl", "--model", f"hf:{tiny_bert}",
                "--output", str(out), "--set", "key_column=id", "--set", "num_cpus=0.5", "--json"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sid = next(ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("submission id: "))
    job_id = next(ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("job id: "))
    assert sid.startswith("raysubmit_") and job_id not in ("", "None")
    assert "status: SUCCEEDED" in r.stdout
    assert "python -m pipelines.cli embed" in r.stderr  # featx ran from the shipped working dir

    # output present and correct: every record once, vectors equal to the inner loop's
    table = read_table(str(out))
    assert table.num_rows == info["records"]
    assert_matches_reference(table["key"].to_pylist(), np.array(table["embedding"].to_pylist(), dtype=np.float32),
                             reference_embeddings(tmp_path / "in", f"hf:{tiny_bert}"))

    client = _client(ray_head)
    job = client.get_job_info(sid)
    assert str(job.status) == "SUCCEEDED" and job.job_id == job_id
    assert job.runtime_env["env_vars"] == {"HF_HUB_OFFLINE": "1"} and "working_dir" in job.runtime_env
    assert job.metadata["featx_command"] == "embed"

    # the canary (the S3 secret key the job used to read its input) appears nowhere
    logs = client.get_job_logs(sid)
    assert "published" in logs or "snapshot" in logs
    st = _jobs(ray_head, ["status", sid, "--json"])
    listing = _jobs(ray_head, ["list", "--json"])
    assert st.exit_code == 0 and json.loads(st.stdout)["status"] == "SUCCEEDED"
    assert sid in {j["submission_id"] for j in json.loads(listing.stdout)}
    table_view = _jobs(ray_head, [])  # `featx jobs --address URL` alone lists
    assert table_view.exit_code == 0 and sid in table_view.stdout
    reports = [p.read_text() for p in [out / "_report.json", out / "_config.json", *(out / "_runs").glob("*.json")]]
    job_meta = json.dumps(job.model_dump(), default=str)
    for where, text in {"submit stdout": r.stdout, "submit stderr": r.stderr, "job logs": logs,
                        "job metadata": job_meta, "jobs status": st.stdout, "jobs list": listing.stdout + table_view.stdout,
                        **{f"report {i}": t for i, t in enumerate(reports)}}.items():
        assert CANARY not in text, f"the secret leaked into {where}"

    # a secret-looking --env is refused (Ray would keep its value in the job's metadata) without echoing it
    refused = _featx(["submit", "--address", ray_head["url"], "--env", "AWS_SECRET_ACCESS_KEY", "--", "featx", "models"],
                     {**env, "AWS_SECRET_ACCESS_KEY": CANARY})
    assert refused.returncode == 2 and "secret-looking" in refused.stderr
    assert CANARY not in refused.stdout + refused.stderr


def test_failing_job_exits_nonzero_with_its_error(ray_head: dict[str, Any], tmp_path: Path) -> None:
    env = _clean_env(RAY_AUTH_TOKEN=ray_head["token"])
    missing = tmp_path / "no-such-input"
    r = _featx(["submit", "--address", ray_head["url"], "--", "featx", "embed", "--input", str(missing),
                "--format", "jsonl", "--output", str(tmp_path / "out")], env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "status: FAILED" in r.stdout
    assert "no-such-input" in r.stderr and "FAILED" in r.stderr  # the error tail names what was wrong
    sid = next(ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("submission id: "))
    st = _jobs(ray_head, ["status", sid])
    assert st.exit_code == 1 and "status: FAILED" in st.stdout


def test_jobs_stop_and_logs(ray_head: dict[str, Any]) -> None:
    env = _clean_env(RAY_AUTH_TOKEN=ray_head["token"])
    r = _featx(["submit", "--address", ray_head["url"], "--ship", "none", "--no-wait", "--",
                "python", "-c", "import time; print('started', flush=True); time.sleep(120)"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    sid = r.stdout.split("submission id: ", 1)[1].split()[0]
    client = _client(ray_head)
    deadline = time.monotonic() + 60
    while "started" not in client.get_job_logs(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    stop = _jobs(ray_head, ["stop", sid])
    assert stop.exit_code == 0 and "STOPPED" in stop.stdout, stop.output
    logs = _jobs(ray_head, ["logs", sid])
    assert logs.exit_code == 0 and "started" in logs.stdout
    assert str(client.get_job_info(sid).status) == "STOPPED"


def test_submission_without_the_token_is_refused(ray_head: dict[str, Any]) -> None:
    for env, expect in ((_clean_env(), "requires a token"),
                        (_clean_env(RAY_AUTH_TOKEN="not-the-token"), "rejected the token")):
        r = _featx(["submit", "--address", ray_head["url"], "--ship", "none", "--", "featx", "models"], env, timeout=60)
        assert r.returncode == 2 and expect in r.stderr, r.stderr[-2000:]
        assert "submission id" not in r.stdout
    assert _client(ray_head).list_jobs() is not None  # the head still serves clients that hold the token
