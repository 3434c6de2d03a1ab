"""`featx embed`, `featx refresh`, `featx status`: write an embeddings table, keep it fresh, see what it holds."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import (CONFIG_HELP, FORMAT_HELP, SET_HELP, STORAGE_HELP, VERBOSE, featx_errors, job_config,
                                  job_run, print_json, storage_options)

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
    verbose: bool = VERBOSE,
) -> None:
    """Embed input shards with a frozen backbone into a Parquet table."""
    from pipelines.config import EmbedConfig
    from pipelines.embed.job import run_embed

    with job_run(ray_log=True, verbose=verbose) as show:
        flags = {"input": input, "format": format, "model": model, "output": output}
        cfg = job_config(EmbedConfig, config, flags, set_)
        show.interval_s = cfg.progress_interval_s
        report = run_embed(cfg, progress=show)
    _show_report(report, json_out)


# options refresh and plan share (one OptionInfo may serve several commands)
SAVED_OUTPUT = typer.Option(None, "--output", help="Output URI; without --config its saved config is used")
SETS = typer.Option([], "--set", help=SET_HELP)


def refresh(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="The YAML config of the job to refresh"),
    output: Optional[str] = SAVED_OUTPUT,
    set_: list[str] = SETS,
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what the refresh would do and how long it would "
                                 "take (as featx plan); exit 0 when nothing would change, 3 when work is pending"),
    verbose: bool = VERBOSE,
) -> None:
    """Embed only new or changed shards; drop removed ones; keep the rest. Safe to run from cron."""
    from pipelines.embed.job import run_embed

    if dry_run:
        plan(config=config, output=output, set_=set_, json_out=json_out)
        return
    with job_run(ray_log=True, verbose=verbose) as show:
        cfg = _saved_job("refresh", config, output, set_)
        show.interval_s = cfg.progress_interval_s
        report = run_embed(cfg, progress=show, command="refresh")
    _show_report(report, json_out)


def _saved_job(command: str, config: Optional[str], output: Optional[str], sets: list[str],
               quiet: bool = False) -> Any:
    """The job config of `featx refresh` / `featx plan`: ``--config FILE``, or the config the run that wrote
    ``--output`` saved there."""
    from operators.errors import ConfigError
    from pipelines.config import EmbedConfig

    if config is None and output is None:
        raise ConfigError(f"{command} needs --config FILE, or --output URI of a table featx wrote (its saved config "
                          "is used)")
    return job_config(EmbedConfig, config, {"output": output}, sets, saved_at=output, quiet=quiet)


EXIT_PENDING = 3  # featx plan: work is pending (cron can branch on it)


def plan(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="The YAML config of the job"),
    output: Optional[str] = SAVED_OUTPUT,
    set_: list[str] = SETS,
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
) -> None:
    """What the next refresh would do (shards, pieces, bytes, records) and how long it would take, from this
    output's earlier runs. Nothing is written and no Ray starts. Exit 0: nothing would change; 3: work pending."""
    from pipelines.embed.dryrun import plan_run

    with featx_errors():
        p = plan_run(_saved_job("plan", config, output, set_, quiet=True))
    if json_out:
        print_json(p)
    else:
        Console().print(plan_lines(p), highlight=False)
    raise typer.Exit(EXIT_PENDING if p["pending"] else 0)


def plan_lines(p: dict[str, Any]) -> str:
    """The plan in a few lines of at most 80 columns."""
    sh, pc, em, est = p["shards"], p["pieces"], p["embed"], p["estimate"]
    lines = [f"{p['output']}: snapshot {p['snapshot'] or 'none yet'}, model {p['model']}",
             f"shards: {sh['new']} new, {sh['changed']} changed, {sh['removed']} removed, {sh['unchanged']} unchanged",
             f"pieces: {pc['to_build']} to build, {pc['kept']} kept; rows carried over: {p['carry_rows']}",
             f"to embed: {em['shards']} shards, {em['bytes'] / 1e6:.2f} MB, about "
             f"{em['records_estimate'] if em['records_estimate'] is not None else '?'} records"]
    if p["reembed_everything"]:
        lines.append("the model or its settings changed: everything is embedded again")
    if not p["pending"]:
        lines.append("nothing would change: no new snapshot")
    elif est.get("seconds") is None:
        lines.append(f"time: {est['basis']}")
    else:
        lines.append(f"time: about {est['seconds']:.0f} s ({est['basis']})")
    return "\n".join(lines)


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
    limit: int = typer.Option(10, "--limit", min=1, help="Show the newest N runs"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=STORAGE_HELP),
) -> None:
    """What is published (snapshot, Delta version, shards, rows, errors, model) and the history of runs."""
    from pipelines.publish.status import output_status
    from pipelines.publish.status import repair as repair_delta

    with featx_errors():
        if repair:
            fixed = repair_delta(output, storage_options(storage), keep_snapshots=keep_snapshots)
            if not json_out:
                Console().print(f"repair: {len(fixed['written'])} Delta versions written "
                                f"{fixed['written'] or ''}".rstrip())
        st = output_status(output, storage_options(storage), last_runs=limit)
    st["runs"] = st["runs"][::-1]  # newest first
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
    out.print(runs_table(st["runs"], limit))


RUN_COLUMNS = ("run", "command", "status", "started", "rows", "model", "reused", "errors", "secs")


def runs_table(runs: list[dict[str, Any]], limit: int) -> Table:
    """The run history, newest first, in columns that fit 80 characters (featx status --json has every field)."""
    t = Table(*RUN_COLUMNS, title=f"runs (newest first, at most {limit}; --json for every field)", box=None,
              pad_edge=False, padding=(0, 1))
    for r in runs:
        run_id = str(r.get("run_id") or "")
        started = str(r.get("started") or "")[5:16].replace("T", " ")  # MM-DD HH:MM
        secs = r.get("seconds")
        t.add_row(run_id[-6:], str(r.get("command") or ""), str(r.get("status") or ""), started,
                  _n(r.get("rows_in")), _n(r.get("rows_embedded")), _n(r.get("rows_reused")), _n(r.get("error_rows")),
                  f"{secs:.0f}" if isinstance(secs, (int, float)) else "")
    return t


def _n(v: Any) -> str:
    if v is None:
        return ""
    v = int(v)
    return f"{v / 1e6:.1f}M" if v >= 10**6 else f"{v / 1e3:.1f}k" if v >= 10**4 else str(v)


def delta_line(d: dict) -> str:
    """The Delta log next to the snapshot, in words."""
    if d.get("skipped") or d.get("error"):
        return f"none: {d.get('skipped') or d.get('error')}"
    if d.get("version") is None:
        return "no Delta log yet: the next run, or featx status --repair, writes it"
    state = "in sync" if d["in_sync"] else "BEHIND the manifest: run featx status --repair"
    return f"version {d['version']} (shows snapshot {d['snapshot']}; {state})"

