"""The `featx` command line."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from operators.errors import FeatxError, PipelineError, StorageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="featx: feature extraction and transfer learning on Ray")
console = Console(stderr=True, soft_wrap=True)  # messages hold paths and URIs: never wrap them


def _fail(e: BaseException) -> None:
    """Print a featx error and exit: 1 when a run failed (a pipeline or storage failure, a refused commit:
    nothing was published, a rerun may succeed), 2 when the command was wrong (config, input, model, busy)."""
    console.print("[bold red]error:[/] " + str(e).replace("[", "\\["), highlight=False)
    raise typer.Exit(1 if isinstance(e, (PipelineError, StorageError)) else 2)


@app.command()
def embed(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config (only overrides of the defaults)"),
    input: Optional[str] = typer.Option(None, "--input", help="Input URI: folder/prefix, glob or file"),
    format: Optional[str] = typer.Option(None, "--format", help="images | webdataset | parquet | jsonl | parquet-images"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name from `featx models`"),
    output: Optional[str] = typer.Option(None, "--output", help="Output URI"),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set batch_size=256"),
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON"),
) -> None:
    """Embed input shards with a frozen backbone into a Parquet table."""
    from pipelines.config import build_config, dump_config, parse_set
    from pipelines.embed.job import run_embed

    try:
        overrides: dict[str, Any] = {"input": input, "format": format, "model": model, "output": output}
        overrides.update(parse_set(set_))
        cfg = build_config(config, overrides)
        console.print(f"[dim]resolved config:[/]\n{dump_config(cfg)}", highlight=False)
        report = run_embed(cfg, progress=lambda m: console.print(m, highlight=False))
    except FeatxError as e:
        _fail(e)
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)


@app.command()
def refresh(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="The YAML config of the job to refresh"),
    output: Optional[str] = typer.Option(None, "--output", help="Output URI; without --config its saved config is used"),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set max_actors=4"),
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON"),
) -> None:
    """Embed only new or changed shards; drop removed ones; keep the rest. Safe to run from cron."""
    from pipelines.config import build_config, config_from_output, dump_config, parse_set
    from pipelines.embed.job import run_embed

    try:
        overrides: dict[str, Any] = {"output": output, **parse_set(set_)}
        if config is None and output is None:
            raise FeatxError("refresh needs --config FILE, or --output URI of a table featx wrote (its saved config is used)")
        cfg = build_config(config, overrides) if config else config_from_output(output or "", overrides)
        console.print(f"[dim]resolved config:[/]\n{dump_config(cfg)}", highlight=False)
        report = run_embed(cfg, progress=lambda m: console.print(m, highlight=False), command="refresh")
    except FeatxError as e:
        _fail(e)
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
    t = Table(title=f"featx run {report['run_id']}: {report['status']}", show_header=False)
    ch = report.get("changes") or {}
    report = {**report, "changes": {k: ch.get(f"{k}_count") for k in ("added", "changed", "removed", "unchanged")}}
    for k in ("output", "snapshot", "model", "changes", "shards_total", "shards_processed", "shards_skipped",
              "shards_adopted", "rows_in", "rows_out", "error_rows", "quarantined", "rows_carried", "published_rows",
              "published_error_rows", "data_files_written", "seconds", "rows_per_second", "seconds_to_first_result",
              "stage_seconds"):
        t.add_row(k, str(report.get(k)))
    Console().print(t)


@app.command()
def status(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON"),
) -> None:
    """What is published (snapshot, shards, rows, errors, model) and the history of runs."""
    from pipelines.publish.status import RUN_FIELDS, output_status

    try:
        st = output_status(output)
    except FeatxError as e:
        _fail(e)
    if json_out:
        print(json.dumps(st, indent=1))
        return
    pub = st["published"]
    out = Console()
    if pub is None:
        out.print(f"{output}: nothing published yet")
    else:
        t = Table(title=f"{output}: snapshot {pub['snapshot']}", show_header=False)
        for k, v in pub.items():
            t.add_row(k, str(v))
        out.print(t)
    if st.get("running"):
        r = st["running"]
        out.print(("stale lease (that run died; the next run takes over): " if r["stale"] else "running now: ") + r["what"])
    runs = Table(*RUN_FIELDS, title="runs")
    for r in st["runs"]:
        runs.add_row(*[str(r.get(k)) for k in RUN_FIELDS])
    out.print(runs)


def _job(cls: Any, config: Optional[str], overrides: dict[str, Any], set_: list[str]) -> Any:
    from pipelines.config import build_config, dump_config, parse_set

    overrides = {**overrides, **parse_set(set_)}
    cfg = build_config(config, overrides, cls=cls)
    console.print(f"[dim]resolved config:[/]\n{dump_config(cfg)}", highlight=False)
    return cfg


def _say(m: str) -> None:
    console.print(m, highlight=False, markup=False)


@app.command()
def train(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config of the head training job"),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="Output URI of a featx embed table"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Column holding the class"),
    head: Optional[str] = typer.Option(None, "--head", help="linear | mlp"),
    output: Optional[str] = typer.Option(None, "--output", help="Folder for the trained head and its metrics"),
    adapt_to: Optional[str] = typer.Option(None, "--adapt-to", help="Unlabelled target-domain embeddings (CORAL)"),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set epochs=20"),
) -> None:
    """Train a linear probe or MLP head on embeddings with Ray Train."""
    from pipelines.config import TrainConfig
    from pipelines.learn.train import run_train

    try:
        cfg = _job(TrainConfig, config, {"embeddings": embeddings, "label_column": label_column, "head": head,
                                         "output": output, "adapt_to": adapt_to}, set_)
        summary = run_train(cfg, progress=_say)
    except FeatxError as e:
        _fail(e)
    print(json.dumps({k: summary[k] for k in ("best_epoch", "best", "epochs_run", "train_rows", "val_rows")}, indent=1))


@app.command()
def finetune(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config of the fine-tuning job"),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set epochs=6"),
) -> None:
    """Fine-tune a registry backbone + a new head end to end on raw shards (freezing, gradual unfreezing)."""
    from pipelines.config import FinetuneConfig
    from pipelines.learn.finetune import run_finetune

    try:
        cfg = _job(FinetuneConfig, config, {}, set_)
        summary = run_finetune(cfg, progress=_say)
    except FeatxError as e:
        _fail(e)
    print(json.dumps({k: summary[k] for k in ("best_epoch", "best", "epochs_run", "registered_as")}, indent=1, default=str))


@app.command()
def tune(
    config: str = typer.Option(..., "--config", "-c", help="YAML with `train:` (the base job) and `grid:`"),
    output: Optional[str] = typer.Option(None, "--output", help="Folder for the trials table and the best config"),
    set_: list[str] = typer.Option([], "--set", help="Override a top-level key: --set cpus_per_trial=0.5"),
) -> None:
    """Grid search over head hyperparameters with Ray Tune."""
    from pipelines.config import TuneConfig
    from pipelines.learn.tune import run_tune

    try:
        cfg = _job(TuneConfig, config, {}, set_)
        summary = run_tune(cfg, output or cfg.train.output, progress=_say)
    except FeatxError as e:
        _fail(e)
    print(json.dumps({k: summary[k] for k in ("best_params", "best_value", "n_trials")}, indent=1, default=str))


@app.command()
def predict(
    model: str = typer.Option(..., "--model", help="A `featx train` output folder (the head)"),
    embeddings: str = typer.Option(..., "--embeddings", help="Output URI of a featx embed table"),
    output: str = typer.Option(..., "--output", help="Where to write the predictions (Parquet)"),
) -> None:
    """Apply a trained head to an embeddings table: key, label, score, probabilities."""
    from pipelines.learn.predict import run_predict

    try:
        summary = run_predict(model, embeddings, output, progress=_say)
    except FeatxError as e:
        _fail(e)
    print(json.dumps({k: summary[k] for k in ("rows", "output", "files")}, indent=1))


# ---- reading published tables (query, sql, inspect, index) ----------------------------------------

_STORAGE_HELP = "fsspec storage option for the output, key=value (repeatable): -o endpoint_url=http://... ; credentials come from the environment"


def _storage(items: list[str]) -> dict[str, Any]:
    from pipelines.config import parse_set

    opts = parse_set(items)
    if "endpoint_url" in opts:  # the common one, where s3fs wants it
        opts.setdefault("client_kwargs", {})["endpoint_url"] = opts.pop("endpoint_url")
    return opts


def _print_rows(rows: list[dict[str, Any]], title: str) -> None:
    t = Table(*(rows[0].keys() if rows else ["(no rows)"]), title=title)
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v)[:80] for v in r.values()])
    Console().print(t)


@app.command()
def query(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    text: Optional[str] = typer.Option(None, "--text", help="Query text (embedded with the table's own model)"),
    image: Optional[str] = typer.Option(None, "--image", help="Query image file or URI (embedded with the table's model)"),
    like: Optional[str] = typer.Option(None, "--like", help="Neighbours of the stored row with this key"),
    k: int = typer.Option(10, "-k", help="How many neighbours"),
    metric: str = typer.Option("cosine", "--metric", help="cosine | dot | l2"),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition on the other columns: --where \"label = 'cat'\""),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Read a kept older snapshot (time travel)"),
    exact: bool = typer.Option(False, "--exact", help="Never use a FAISS index"),
    model: Optional[str] = typer.Option(None, "--model", help="The table's model, where its saved config does not resolve here"),
    weights: Optional[str] = typer.Option(None, "--weights", help="The table's weights at their path on this machine"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=_STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print hits as JSON"),
) -> None:
    """Nearest neighbours of a text, an image or a stored row (exact, or a matching FAISS index)."""
    from pipelines.read.table import open as open_table

    try:
        table = open_table(output, snapshot, _storage(storage))
        if model or weights:
            table.use_encoder(model=model, weights=weights)
        hits = table.search(text=text, image=image, like=like, k=k, metric=metric, where=where,
                            use_index=False if exact else None)
    except FeatxError as e:
        _fail(e)
    rows = hits.to_pylist()
    if json_out:
        print(json.dumps({"method": hits.method, "note": hits.note, "snapshot": hits.snapshot, "seconds": hits.seconds,
                          "hits": rows}, indent=1, default=str))
        return
    _say(f"{hits.method}: {hits.note} ({hits.seconds:.3f} s)")
    _print_rows([{"rank": i + 1, **r} for i, r in enumerate(rows)], f"{output} snapshot {hits.snapshot}: {k} nearest ({metric})")


@app.command()
def sql(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    statement: str = typer.Argument(..., help="SQL over the view `embeddings` (embedding is FLOAT[dim])"),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Read a kept older snapshot"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=_STORAGE_HELP),
) -> None:
    """Run DuckDB SQL over the published snapshot (local or object storage)."""
    import duckdb

    from pipelines.read.table import open as open_table

    try:
        con = open_table(output, snapshot, _storage(storage)).duckdb()
        try:
            result = con.sql(statement)
        except duckdb.Error as e:
            raise FeatxError(f"DuckDB refused the statement ({e}); the table is the view `embeddings`") from None
        if result is None:
            return
        rows = [dict(zip(result.columns, r)) for r in result.fetchall()]
    except FeatxError as e:
        _fail(e)
    if fmt == "json":
        print(json.dumps(rows, indent=1, default=str))
    elif fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)
    else:
        _print_rows(rows, f"{len(rows)} rows")


@app.command()
def inspect(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    color: Optional[str] = typer.Option(None, "--color", help="Column that colours the 2-D map"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Save a 2-D PCA map of the vectors to this PNG"),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Inspect a kept older snapshot"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=_STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Schema, model, rows, files, vector norms, duplicate keys, and a 2-D map of the embeddings."""
    from pipelines.read.inspect import inspect_table

    try:
        rep = inspect_table(output, snapshot, color=color, plot=plot, storage_options=_storage(storage))
    except FeatxError as e:
        _fail(e)
    if json_out:
        print(json.dumps(rep, indent=1, default=str))
    else:
        t = Table(title=f"{output}: snapshot {rep['snapshot']} ({'healthy' if rep['healthy'] else 'PROBLEMS'})", show_header=False)
        for key, v in rep.items():
            t.add_row(key, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
        Console().print(t)
    if not rep["healthy"]:
        raise typer.Exit(1)


@app.command()
def index(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    kind: str = typer.Option("ivf", "--kind", help="ivf | hnsw"),
    metric: str = typer.Option("cosine", "--metric", help="cosine | dot | l2 (queries with this metric use it)"),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default ~4 x sqrt(rows))"),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists searched per query"),
    hnsw_m: int = typer.Option(32, "--hnsw-m", help="HNSW links per node"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=_STORAGE_HELP),
) -> None:
    """Build a FAISS index of the published snapshot, stored beside it (used while the snapshot is current)."""
    from pipelines.read.index import build_index

    try:
        meta = build_index(output, kind, metric, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                           storage_options=_storage(storage), progress=_say)
    except FeatxError as e:
        _fail(e)
    print(json.dumps(meta, indent=1))


@app.command()
def demo(folder: str = typer.Option("featx-demo", "--dir", help="Where to write the sample data and outputs")) -> None:
    """Write a small real sample dataset, embed it with the offline default models, query it."""
    from pipelines.demo.demo import run_demo

    try:
        run_demo(folder, say=lambda m: console.print(m, highlight=False, markup=False))
    except FeatxError as e:
        _fail(e)


@app.command()
def models() -> None:
    """List the model registry."""
    from operators.models.registry import known_models

    t = Table("name", "what")
    for name, desc in known_models().items():
        t.add_row(name, desc)
    Console().print(t)


def _register_cluster_commands() -> None:
    """`featx submit` and `featx jobs` (pipelines/cli/submit.py): run featx on a Ray cluster via the Jobs API."""
    from pipelines.cli.submit import jobs_app, submit_command

    app.command("submit", context_settings={"allow_interspersed_args": False})(submit_command)
    app.add_typer(jobs_app, name="jobs")


_register_cluster_commands()


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
