"""The `featx` command line: clear errors with exit code 2, before any Ray work."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pipelines.cli.app import app

runner = CliRunner()


def test_models_lists_the_registry() -> None:
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("efficientnet-lite0", "minilm-l6", "resnet50", "vgg16", "vit-b-16"):
        assert name in res.output


def test_unknown_model_exits_2_with_the_known_names(tmp_path: Path) -> None:
    """In a fresh process: the error comes before any Ray work (no local Ray is started)."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "embed", "--input", str(tmp_path), "--format", "jsonl",
         "--output", str(tmp_path / "o"), "--model", "no-such-model"],
        capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "unknown model 'no-such-model'" in out and "minilm-l6" in out
    assert "Ray" not in out and not (tmp_path / "o").exists()


def test_bad_set_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    res = runner.invoke(app, ["embed", "--config", "text-minilm.yaml", "--set", "batch_size=-4"])
    assert res.exit_code == 2 and "batch_size" in res.output
    res = runner.invoke(app, ["embed", "--config", "text-minilm.yaml", "--set", "num_gpu=1"])
    assert res.exit_code == 2 and "num_gpu: unknown key" in res.output


def test_status_of_nothing_exits_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["status", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nothing at" in res.output


def test_transfer_learning_commands_fail_clearly_before_ray(tmp_path: Path) -> None:
    def run(*args: str) -> tuple[int, str]:
        res = runner.invoke(app, list(args))
        return res.exit_code, " ".join(res.output.split())  # rich wraps long lines

    code, out = run("train", "--embeddings", str(tmp_path / "none"), "--output", str(tmp_path / "o"))
    assert code == 2 and "no published featx table" in out and "featx embed" in out
    code, out = run("predict", "--model", str(tmp_path), "--embeddings", str(tmp_path), "--output", str(tmp_path / "p"))
    assert code == 2 and "not a trained featx head" in out
    code, out = run("train", "--embeddings", "x", "--output", "y", "--set", "head=transformer")
    assert code == 2 and "head" in out
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("train: {embeddings: x, output: y}\ngrid: {momentum: [0.9]}\n")
    code, out = run("tune", "--config", str(cfg))
    assert code == 2 and "cannot search over ['momentum']" in out
    for cmd in ("train", "finetune", "tune", "predict", "refresh"):
        assert runner.invoke(app, [cmd, "--help"]).exit_code == 0
