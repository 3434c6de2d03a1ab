"""Running featx commands on a Ray cluster through Ray's Job Submission API (no CLI here: the `featx submit`
and `featx jobs` commands in pipelines/cli/cluster_commands.py call these functions).

The submitter talks to the cluster's dashboard (``http://HEAD:8265``) with a token when the cluster
uses Ray's token auth (``RAY_AUTH_MODE=token``; the token from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). The job's runtime env ships this project: the
source checkout as ``working_dir``, or the installed ``operators``/``pipelines`` packages as
``py_modules``; a leading ``featx`` in the command then runs as ``python -m pipelines.cli`` from the
shipped copy, so the cluster's image needs only the dependencies. Or ship nothing when the image
has featx installed.

Secrets never travel in a job: Ray stores a job's runtime env (its env vars too) in the job's
metadata, which the dashboard shows to anyone who can reach it. Credentials reach the workers from
the cluster's own environment (instance roles, service accounts, Kubernetes Secrets). Whatever
featx prints (logs, statuses, errors) has the values of the submitter's secret-looking variables
blanked out.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from operators.errors import ConfigError, FeatxError, PipelineError

Ship = Literal["working-dir", "package", "none"]
SHIPS: tuple[str, ...] = ("working-dir", "package", "none")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW(OR)?D|CREDENTIAL|AUTH|SAS|SIGNATURE", re.IGNORECASE)
NOT_SECRET = {"RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM"}  # names that match the pattern but hold no secret
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# never shipped with the working dir: environments, caches, outputs, test data
EXCLUDES = [".venv", "venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache",
            "featx-demo", "runs", "tests", "benchmarks/results", "*.parquet", "*.tar"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
T = TypeVar("T")


def is_secret_name(name: str) -> bool:
    return name.upper() not in NOT_SECRET and bool(SECRET_NAME.search(name))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the secret-looking variables in ``environ`` (long enough to be worth blanking), longest first."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if is_secret_name(k) and len(v) >= 6}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


def project_root() -> Path | None:
    """The source checkout this featx runs from (has pyproject.toml, operators/ and pipelines/), if any."""
    root = Path(__file__).resolve().parents[2]
    ok = (root / "pyproject.toml").is_file() and (root / "operators").is_dir() and (root / "pipelines").is_dir()
    return root if ok else None


def api_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """The dashboard (Jobs API) address: --address, RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or localhost."""
    env = os.environ if environ is None else environ
    addr = address or env.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr and env.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        addr = env["RAY_ADDRESS"]
    addr = (addr or DEFAULT_ADDRESS).rstrip("/")
    if not addr.startswith(("http://", "https://")):
        raise ConfigError(f"--address must be the Ray dashboard's URL, like http://ray-head:8265; got {addr!r} "
                          "(a GCS address host:6379 or ray:// is not the Jobs API)")
    return addr


def resolve_token(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Ray's token sources, in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token
    (the default file only when RAY_AUTH_MODE=token, as Ray's own clients do)."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file() or not p.read_text().strip():
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path!r} is not a readable, non-empty token file")
        return p.read_text().strip()
    default = (home or Path.home()) / ".ray" / "auth_token"
    if env.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text().strip() or None
    return None


def parse_env(items: list[str], allow_secrets: bool = False, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``--env NAME=VALUE`` or ``--env NAME`` (the value from this shell) -> env vars for the job."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--env expects NAME=VALUE or NAME, got {item!r}")
        if not sep:
            if name not in env:
                raise ConfigError(f"--env {name}: {name} is not set in this shell; give --env {name}=VALUE")
            value = env[name]
        if is_secret_name(name) and not allow_secrets:
            raise ConfigError(
                f"--env {name}: refusing to put a secret-looking variable into the job. Ray keeps a job's env vars "
                "in its runtime env, which the dashboard and `featx jobs status` show to anyone who can reach "
                "them. Give the cluster its credentials instead (instance role / IAM role for service accounts, "
                "a Kubernetes Secret in the pod env, the environment `ray start` runs in), or pass "
                "--allow-secret-env if that exposure is acceptable."
            )
        out[name] = value
    return out


def show_env(env_vars: dict[str, str]) -> str:
    return " ".join(f"{k}={'***' if is_secret_name(k) else v}" for k, v in sorted(env_vars.items()))


def job_entrypoint(command: list[str], ship: Ship) -> str:
    """The shell command the job runs; a leading ``featx`` runs from the shipped code when code is shipped."""
    if not command:
        raise ConfigError("give the command to run after --, e.g. featx submit -- featx embed --config nightly.yaml")
    if ship != "none" and command[0] == "featx":
        command = ["python", "-m", "pipelines.cli", *command[1:]]
    return shlex.join(command)


def runtime_env(ship: Ship, env_vars: dict[str, str], working_dir: str | None = None,
                requirements: str | None = None) -> dict[str, Any]:
    """The job's runtime env: the project's code (working_dir or py_modules), env vars, optional pip packages."""
    renv: dict[str, Any] = {}
    if ship == "working-dir":
        root = Path(working_dir) if working_dir else project_root()
        if root is None or not (root / "pipelines").is_dir():
            raise ConfigError("--ship working-dir needs a featx source checkout (give --working-dir PATH); "
                              "an installed featx ships with --ship package, or use --ship none when the "
                              "cluster's image has featx installed")
        renv["working_dir"] = str(root)
        renv["excludes"] = list(EXCLUDES)
    elif ship == "package":
        import operators
        import pipelines

        renv["py_modules"] = [str(Path(m.__file__).parent) for m in (operators, pipelines)]
    if requirements:
        lines = [ln.split("#", 1)[0].strip() for ln in Path(requirements).read_text().splitlines()]
        renv["pip"] = {"packages": [ln for ln in lines if ln and not ln.startswith("-")], "pip_check": False}
    if env_vars:
        renv["env_vars"] = dict(env_vars)
    return renv


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster, with the token when there is one; clear errors otherwise."""
    from ray.job_submission import JobSubmissionClient

    url = api_address(address)
    token = resolve_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # the client checks the address at once: auth, connection and version errors
        text = str(e)
        if "Authentication required" in text or "401" in text:
            raise ConfigError(f"the Ray cluster at {url} refused the request: it requires a token. Set RAY_AUTH_TOKEN "
                              "(or RAY_AUTH_MODE=token with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH); "
                              "`ray get-auth-token` prints it on the head") from None
        if "Authentication failed" in text or "403" in text:
            raise ConfigError(f"the Ray cluster at {url} rejected the token: it is not this cluster's token") from None
        raise ConfigError(f"cannot reach the Ray Jobs API at {url}: {type(e).__name__}: {text[:500]}") from None


def submit(client: Any, command: list[str], ship: Ship, env_vars: dict[str, str], working_dir: str | None = None,
           requirements: str | None = None, submission_id: str | None = None) -> tuple[str, str]:
    """Submit one job; returns (submission id, entrypoint)."""
    entrypoint = job_entrypoint(command, ship)
    secrets = secret_values()
    leaked = [s for s in secrets if s in entrypoint]
    if leaked:
        raise ConfigError("the command holds the value of a secret variable of this shell; jobs keep their command "
                          "in their metadata. Let the cluster's environment provide it instead.")
    from pipelines import __version__

    metadata = {"featx_version": __version__, "featx_command": command[1] if command[0] == "featx" and len(command) > 1
                else command[0]}
    sid = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
                            runtime_env=runtime_env(ship, env_vars, working_dir, requirements))
    return sid, entrypoint


def follow_logs(client: Any, submission_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns them (for the error tail)."""
    seen: list[str] = []

    async def run() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            seen.append(chunk)
            write(chunk)

    asyncio.run(run())
    return "".join(seen)


def wait_terminal(client: Any, submission_id: str, timeout_s: float = 60.0) -> Any:
    """The job's info once it is SUCCEEDED, FAILED or STOPPED (logs can end a moment before the status)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(submission_id)
        if str(info.status) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def status_text(status: Any) -> str:
    return getattr(status, "value", str(status))


def exit_code(status: Any) -> int:
    """SUCCEEDED -> 0; FAILED or STOPPED -> 1; still running (--no-wait) -> 0."""
    return 1 if status_text(status) in ("FAILED", "STOPPED") else 0


def error_tail(info: Any, logs: str, secrets: list[str], lines: int = 15) -> str:
    """What went wrong, short: Ray's message (first line), its error type, and the last lines of the log."""
    msg = (info.message or "").strip().splitlines()
    head = msg[0] if msg else ""
    tail = "\n".join(logs.rstrip().splitlines()[-lines:]) if logs.strip() else "\n".join(msg[1:][-lines:])
    kind = f" ({info.error_type})" if getattr(info, "error_type", None) else ""
    return scrub(f"job {info.submission_id} {status_text(info.status)}{kind}: {head}\n{tail}", secrets)


def job_rows(client: Any) -> list[dict[str, Any]]:
    """One row per job, newest first, for `featx jobs list` (the entrypoint scrubbed of secrets)."""
    secrets = secret_values()
    rows = []
    for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True):
        rows.append({"submission_id": j.submission_id or "", "job_id": j.job_id or "", "status": status_text(j.status),
                     "start": _ts(j.start_time), "end": _ts(j.end_time),
                     "entrypoint": scrub(j.entrypoint or "", secrets)[:120]})
    return rows


def job_status(client: Any, submission_id: str) -> dict[str, Any]:
    """The job's status, ids, times and message, with the runtime env's env var values hidden."""
    info = client.get_job_info(submission_id)
    secrets = secret_values()
    env = ((info.runtime_env or {}).get("env_vars") or {})
    return {"submission_id": info.submission_id, "job_id": info.job_id, "status": status_text(info.status),
            "start": _ts(info.start_time), "end": _ts(info.end_time),
            "entrypoint": scrub(info.entrypoint or "", secrets),
            "env_vars": show_env(env), "metadata": info.metadata or {}, "error_type": info.error_type,
            "message": scrub(info.message or "", secrets)[-4000:]}


def _ts(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def jobs_api(call: Callable[[], T]) -> T:
    """``call()``, with the Jobs API's answer to an unknown submission id (a 404 RuntimeError) as a ConfigError."""
    try:
        return call()
    except FeatxError:
        raise
    except RuntimeError as e:
        raise ConfigError(str(e)[:500]) from None


def run_submit(address: str | None, command: list[str], ship: str | None, working_dir: str | None,
               env: list[str], allow_secret_env: bool, requirements: str | None, submission_id: str | None,
               wait: bool, say: Callable[[str], None]) -> int:
    """`featx submit`: submit, print the ids, follow the logs; returns the exit code (the job's outcome)."""
    if ship not in (None, *SHIPS):
        raise ConfigError(f"--ship must be {', '.join(SHIPS[:-1])} or {SHIPS[-1]}; got {ship!r}")
    ship = ship or ("working-dir" if working_dir or project_root() else "package")
    env_vars = parse_env(env, allow_secret_env)
    client = connect(address)
    sid, entrypoint = submit(client, command, ship, env_vars, working_dir, requirements, submission_id)  # type: ignore[arg-type]
    secrets = secret_values()
    print(f"submission id: {sid}", flush=True)
    say(f"entrypoint: {scrub(entrypoint, secrets)}" + (f"; env: {show_env(env_vars)}" if env_vars else "")
        + f"; code shipped as: {ship}")
    if not wait:
        say(f"not waiting; follow it with: featx jobs --address {api_address(address)} logs {sid} --follow")
        return 0
    try:
        logs = follow_logs(client, sid, lambda chunk: write_out(scrub(chunk, secrets)))
    except KeyboardInterrupt:
        say(f"stopped following; the job keeps running. Stop it with: featx jobs stop {sid}")
        return 130
    info = wait_terminal(client, sid)
    print(f"job id: {info.job_id}", flush=True)
    print(f"status: {status_text(info.status)}", flush=True)
    if exit_code(info.status):
        say(error_tail(info, logs, secrets))
    elif status_text(info.status) not in TERMINAL:
        raise PipelineError(f"job {sid} is still {status_text(info.status)} although its log stream ended; "
                            f"check it with featx jobs status {sid}")
    return exit_code(info.status)


def run_logs(address: str | None, submission_id: str, follow: bool) -> int:
    client = connect(address)
    secrets = secret_values()
    if follow:
        follow_logs(client, submission_id, lambda chunk: write_out(scrub(chunk, secrets)))
        return exit_code(wait_terminal(client, submission_id).status)
    write_out(scrub(client.get_job_logs(submission_id), secrets))
    return 0


def run_stop(address: str | None, submission_id: str, wait: bool) -> str:
    client = connect(address)
    if not client.stop_job(submission_id):
        info = client.get_job_info(submission_id)
        return status_text(info.status)
    return status_text(wait_terminal(client, submission_id).status) if wait else "STOPPING"
