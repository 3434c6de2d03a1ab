"""`featx embed`, `featx refresh`, `featx status`: write an embeddings table, keep it fresh, see what it holds."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import (CONFIG_HELP, FORMAT_HELP, SET_HELP, STORAGE_HELP, featx_errors, job_config, job_run,
                                  print_json, say, storage_options)

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
    repair: bool = typer.Option(False, "--repair", help="First write the Delta versions the Delta log is missing "
                                "(a run killed between its manifest and its Delta commit, or a table from before "
                                "Delta logs); takes the output's lease like any writer"),
    keep_snapshots: int = typer.Option(5, "--keep-snapshots", min=1, help="With --repair: the output's keep_snapshots "
                                       "(only kept snapshots get their missing versions)"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=STORAGE_HELP),
) -> None:
    """What is published (snapshot, Delta version, shards, rows, errors, model) and the history of runs."""
    from pipelines.publish.status import RUN_FIELDS, output_status
    from pipelines.publish.status import repair as repair_delta

    with featx_errors():
        if repair:
            fixed = repair_delta(output, storage_options(storage), keep_snapshots=keep_snapshots)
            if not json_out:
                Console().print(f"repair: {len(fixed['written'])} Delta versions written "
                                f"{fixed['written'] or ''}".rstrip())
        st = output_status(output, storage_options(storage))
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
            t.add_row(k, delta_line(v) if k == "delta" else str(v))
        out.print(t)
    if st.get("running"):
        r = st["running"]
        what = "stale lease (that run died; the next run takes over): " if r["stale"] else "running now: "
        out.print(what + r["what"])
    runs = Table(*RUN_FIELDS, title="runs")
    for r in st["runs"]:
        runs.add_row(*[str(r.get(k)) for k in RUN_FIELDS])
    out.print(runs)


def delta_line(d: dict) -> str:
    """The Delta log next to the snapshot, in words."""
    if d.get("skipped") or d.get("error"):
        return f"none: {d.get('skipped') or d.get('error')}"
    if d.get("version") is None:
        return "no Delta log yet: the next run, or featx status --repair, writes it"
    state = "in sync" if d["in_sync"] else "BEHIND the manifest: run featx status --repair"
    return f"version {d['version']} (shows snapshot {d['snapshot']}; {state})"

