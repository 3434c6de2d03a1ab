"""`featx submit` helpers: token sources, addresses, env vars (secrets refused), entrypoints, runtime envs."""
from __future__ import annotations

from pathlib import Path

import pytest

from operators.errors import ConfigError
from pipelines.cli.submit import (
    api_address,
    job_entrypoint,
    parse_env,
    resolve_token,
    runtime_env,
    scrub,
    secret_values,
    show_env,
)


def test_token_sources_in_rays_order(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default\n")
    (tmp_path / "tok").write_text("from-path\n")
    assert resolve_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, tmp_path) == "from-env"
    assert resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, tmp_path) == "from-path"
    assert resolve_token({"RAY_AUTH_MODE": "token"}, tmp_path) == "from-default"
    assert resolve_token({}, tmp_path) is None  # the default file only counts in token mode, as in Ray
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH"):
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)


def test_address_is_the_dashboard_url() -> None:
    assert api_address("http://head:8265/", {}) == "http://head:8265"
    assert api_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:1"}) == "http://a:1"
    assert api_address(None, {"RAY_ADDRESS": "https://b:2"}) == "https://b:2"
    assert api_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "http://127.0.0.1:8265"
    with pytest.raises(ConfigError, match="dashboard"):
        api_address("ray-head:6379", {})


def test_env_vars_are_passed_and_secret_ones_refused_without_echo() -> None:
    shell = {"HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": "canary-value-123"}
    assert parse_env(["HF_HUB_OFFLINE", "MODE=fast", "TOKENIZERS_PARALLELISM=false"], environ=shell) == {
        "HF_HUB_OFFLINE": "1", "MODE": "fast", "TOKENIZERS_PARALLELISM": "false"}
    with pytest.raises(ConfigError, match="secret-looking") as e:
        parse_env(["AWS_SECRET_ACCESS_KEY"], environ=shell)
    assert "canary-value-123" not in str(e.value)
    assert parse_env(["DB_PASSWORD=x"], allow_secrets=True, environ=shell) == {"DB_PASSWORD": "x"}
    assert show_env({"DB_PASSWORD": "x", "MODE": "fast"}) == "DB_PASSWORD=*** MODE=fast"
    with pytest.raises(ConfigError, match="not set"):
        parse_env(["NOT_THERE"], environ=shell)
    assert scrub("key=canary-value-123 ok", secret_values(shell)) == "key=*** ok"


def test_entrypoint_runs_featx_from_the_shipped_code() -> None:
    cmd = ["featx", "embed", "--config", "my file.yaml"]
    assert job_entrypoint(cmd, "working-dir") == "python -m pipelines.cli embed --config 'my file.yaml'"
    assert job_entrypoint(cmd, "none") == "featx embed --config 'my file.yaml'"
    with pytest.raises(ConfigError, match="after --"):
        job_entrypoint([], "none")


def test_runtime_env_ships_the_checkout_or_the_packages(tmp_path: Path) -> None:
    renv = runtime_env("working-dir", {"A": "1"})
    assert Path(renv["working_dir"], "pipelines", "cli", "submit.py").is_file()
    assert {".venv", ".git", "tests"} <= set(renv["excludes"]) and renv["env_vars"] == {"A": "1"}
    mods = runtime_env("package", {})["py_modules"]
    assert sorted(Path(m).name for m in mods) == ["operators", "pipelines"]
    assert runtime_env("none", {}) == {}
    req = tmp_path / "req.txt"
    req.write_text("# pinned\nduckdb==2.0.0  # query\n-c constraints.txt\n\n")
    assert runtime_env("none", {}, requirements=str(req))["pip"] == {"packages": ["duckdb==2.0.0"], "pip_check": False}
    with pytest.raises(ConfigError, match="checkout"):
        runtime_env("working-dir", {}, working_dir=str(tmp_path))
