"""`featx embed`, `featx refresh`, `featx status`: write an embeddings table, keep it fresh, see what it holds."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import CONFIG_HELP, FORMAT_HELP, SET_HELP, featx_errors, job_config, job_run, print_json, say

REPORT_ROWS = ("output", "snapshot", "model", "changes", "shards_total", "shards_processed", "shards_skipped",
               "shards_adopted", "rows_in", "rows_out", "error_rows", "quarantined", "rows_carried", "published_rows",
               "published_error_rows", "data_files_written", "seconds", "rows_per_second", "seconds_to_first_result",
               "stage_seconds", "resources")


def embed(
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    input: Optional[str] = typer.Option(None, "--input", help="Input URI: folder/prefix, glob or file"),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="Model name from `featx models`"),
    output: Optional[str] = typer.Option(None, "--output", help="Output URI"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON"),
) -> None:
    """Embed input shards with a frozen backbone into a Parquet table."""
    from pipelines.config import EmbedConfig
    from pipelines.embed.job import run_embed

    with job_run():
        flags = {"input": input, "format": format, "model": model, "output": output}
        cfg = job_config(EmbedConfig, config, flags, set_)
        report = run_embed(cfg, progress=say)
    _show_report(report, json_out)


def refresh(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="The YAML config of the job to refresh"),
    output: Optional[str] = typer.Option(None, "--output", help="Output URI; without --config its saved config is "
                                                                "used"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON"),
) -> None:
    """Embed only new or changed shards; drop removed ones; keep the rest. Safe to run from cron."""
    from operators.errors import ConfigError
    from pipelines.config import EmbedConfig
    from pipelines.embed.job import run_embed

    with job_run():
        if config is None and output is None:
            raise ConfigError("refresh needs --config FILE, or --output URI of a table featx wrote "
                              "(its saved config is used)")
        cfg = job_config(EmbedConfig, config, {"output": output}, set_, saved_at=output)
        report = run_embed(cfg, progress=say, command="refresh")
    _show_report(report, json_out)


def _show_report(report: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(report)
        return
    t = Table(title=f"featx run {report['run_id']}: {report['status']}", show_header=False)
    ch = report.get("changes") or {}
    report = {**report, "changes": {k: ch.get(f"{k}_count") for k in ("added", "changed", "removed", "unchanged")}}
    for k in REPORT_ROWS:
        t.add_row(k, str(report.get(k)))
    Console().print(t)


def status(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON"),
) -> None:
    """What is published (snapshot, shards, rows, errors, model) and the history of runs."""
    from pipelines.publish.status import RUN_FIELDS, output_status

    with featx_errors():
        st = output_status(output)
    if json_out:
        print_json(st)
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
        what = "stale lease (that run died; the next run takes over): " if r["stale"] else "running now: "
        out.print(what + r["what"])
    runs = Table(*RUN_FIELDS, title="runs")
    for r in st["runs"]:
        runs.add_row(*[str(r.get(k)) for k in RUN_FIELDS])
    out.print(runs)
