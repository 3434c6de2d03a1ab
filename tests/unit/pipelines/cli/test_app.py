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


def _flat(res: object) -> str:
    return " ".join(res.output.split())  # type: ignore[attr-defined]  # rich wraps long lines


def test_every_job_command_takes_the_one_config_path(tmp_path: Path) -> None:
    """YAML + flags + --set, validated in one place: a bad key fails the same way, exit 2, for every job."""
    tune_yaml = tmp_path / "tune.yaml"
    tune_yaml.write_text("train: {embeddings: x, output: y, head: mlp}\ngrid: {lr: [0.1]}\n")
    for args in (["embed", "--config", "text-minilm.yaml"], ["refresh", "--config", "text-minilm.yaml"],
                 ["train", "--config", "train-probe.yaml"], ["finetune", "--config", "finetune-minilm.yaml"],
                 ["tune", "--config", str(tune_yaml)]):
        res = runner.invoke(app, [*args, "--set", "no_such_key=1"])
        assert res.exit_code == 2 and "no_such_key: unknown key" in _flat(res), (args, res.output)
        assert "Traceback" not in res.output


def test_refresh_uses_the_saved_config_with_set_on_top(tmp_path: Path) -> None:
    from pipelines.config import SAVED_CONFIG, build_config

    out = tmp_path / "out"
    out.mkdir()
    saved = build_config(None, {"input": str(tmp_path / "gone"), "output": str(out), "format": "jsonl",
                                "storage_options": {"secret": "CANARY"}})
    (out / SAVED_CONFIG).write_text(saved.dump())
    res = runner.invoke(app, ["refresh", "--output", str(out), "--set", "batch_size=5"])
    text = _flat(res)
    assert res.exit_code == 2 and "resolved config:" in text and '"batch_size": 5' in text
    assert str(tmp_path / "gone") in text and "CANARY" not in text
    res = runner.invoke(app, ["refresh"])
    assert res.exit_code == 2 and "refresh needs --config FILE, or --output URI" in _flat(res)


def test_the_resolved_config_is_printed_for_every_job_kind(tmp_path: Path, capsys: object) -> None:
    """`featx tune --config` once stopped with AttributeError: TuneConfig had no public_dict."""
    import json as _json

    from pipelines.cli.common import job_config
    from pipelines.config import JOBS, TuneConfig

    tune_yaml = tmp_path / "tune.yaml"
    tune_yaml.write_text("train: {embeddings: x, output: y, head: mlp, storage_options: {token: CANARY}}\ngrid: {lr: [0.1]}\n")
    cfg = job_config(TuneConfig, str(tune_yaml), {}, ["train.epochs=2"])
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    printed = _json.loads(err[err.index("{"):])
    assert cfg.train.epochs == 2 and printed["train"]["epochs"] == 2 and "CANARY" not in err
    assert set(JOBS) == {"embed", "refresh", "train", "finetune", "tune"}


def test_exit_codes() -> None:
    from operators.errors import CommitRefused, ConfigError, InputError, PipelineError, StorageError
    from pipelines.cli.common import exit_code

    assert [exit_code(e("x")) for e in (PipelineError, StorageError, CommitRefused)] == [1, 1, 1]
    assert [exit_code(e("x")) for e in (ConfigError, InputError)] == [2, 2]


def test_submission_logic_has_no_cli_and_nothing_imports_the_cli() -> None:
    import ast
    import subprocess
    import sys

    code = ("import sys, pipelines.cli.submit; bad = [m for m in ('typer', 'pipelines.cli.app') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    root = Path(__file__).resolve().parents[4]
    offenders = []
    for path in [*(root / "operators").rglob("*.py"), *(root / "pipelines").rglob("*.py")]:
        if (root / "pipelines" / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("pipelines.cli")]
    assert not offenders


def test_index_help_says_what_the_index_does() -> None:
    text = _flat(runner.invoke(app, ["index", "--help"]))
    assert "sqrt(rows)" in text and "rows / 39" in text and "4 x sqrt" not in text
