"""`featx train`, `featx finetune`, `featx tune`, `featx predict`: transfer learning on featx tables and shards."""
from __future__ import annotations

from typing import Any, Optional

import typer

from pipelines.cli.common import CONFIG_HELP, FORMAT_HELP, SET_HELP, VERBOSE, job_config, job_log, job_run, print_json


def _pick(summary: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: summary.get(k) for k in keys}


def train(
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="Output URI of a featx embed table"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Column holding the class"),
    head: Optional[str] = typer.Option(None, "--head", help="linear | mlp"),
    output: Optional[str] = typer.Option(None, "--output", help="Folder for the trained head and its metrics"),
    adapt_to: Optional[str] = typer.Option(None, "--adapt-to", help="Unlabelled target-domain embeddings (CORAL)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    verbose: bool = VERBOSE,
) -> None:
    """Train a linear probe or MLP head on embeddings with Ray Train."""
    from pipelines.config import TrainConfig
    from pipelines.learn.train import run_train

    with job_run(ray_log=True, verbose=verbose) as show:
        cfg = job_config(TrainConfig, config, {"embeddings": embeddings, "label_column": label_column, "head": head,
                                               "output": output, "adapt_to": adapt_to}, set_)
        with job_log(show, cfg.output, cfg.storage_options):
            summary = run_train(cfg, progress=show)
    keys = (("solver", "cv", "held_out") if summary["head"] == "linear" else ("best_epoch", "epochs_run", "refit"))
    print_json(_pick(summary, ("head", "best", *keys, "train_rows", "val_rows")))


def finetune(
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    input: Optional[str] = typer.Option(None, "--input", help="Raw shards, as for `featx embed`"),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="The backbone: a model name from `featx models`"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Column holding the class ('folder' for "
                                                                            "image folders)"),
    output: Optional[str] = typer.Option(None, "--output", help="Folder for the fine-tuned backbone + head"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    verbose: bool = VERBOSE,
) -> None:
    """Fine-tune a registry backbone + a new head end to end on raw shards (freezing, gradual unfreezing)."""
    from pipelines.config import FinetuneConfig
    from pipelines.learn.finetune import run_finetune

    with job_run(ray_log=True, verbose=verbose) as show:
        cfg = job_config(FinetuneConfig, config, {"input": input, "format": format, "model": model,
                                                  "label_column": label_column, "output": output}, set_)
        with job_log(show, cfg.output, cfg.storage_options):
            summary = run_finetune(cfg, progress=show)
    print_json(_pick(summary, ("best_epoch", "best", "epochs_run", "registered_as")))


def tune(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML with `train:` (the base job) and `grid:`"),
    output: Optional[str] = typer.Option(None, "--output", help="Folder for the trials table and the best config "
                                         "(default: the base job's output)"),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set cpus_per_trial=0.5, --set train.epochs=20, "
                                   "--set grid.lr=[0.001,0.01]"),
    verbose: bool = VERBOSE,
) -> None:
    """Grid search over head hyperparameters with Ray Tune."""
    from pipelines.config import TuneConfig
    from pipelines.learn.tune import run_tune

    with job_run(ray_log=True, verbose=verbose) as show:
        cfg = job_config(TuneConfig, config, {}, set_)
        with job_log(show, output or cfg.train.output, cfg.train.storage_options):
            summary = run_tune(cfg, output or cfg.train.output, progress=show)
    print_json(_pick(summary, ("best_params", "best_value", "n_trials")))


def predict(
    model: str = typer.Option(..., "--model", help="A `featx train` output folder (the head)"),
    embeddings: str = typer.Option(..., "--embeddings", help="Output URI of a featx embed table"),
    output: str = typer.Option(..., "--output", help="Where to write the predictions (Parquet)"),
    verbose: bool = VERBOSE,
) -> None:
    """Apply a trained head to an embeddings table: key, label, score, probabilities."""
    from pipelines.config import absolute
    from pipelines.learn.predict import run_predict

    with job_run(ray_log=True, verbose=verbose) as show, job_log(show, absolute(output)):
        summary = run_predict(absolute(model), absolute(embeddings), absolute(output), progress=show)
    print_json(_pick(summary, ("rows", "output", "files")))
