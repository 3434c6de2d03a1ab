"""`featx submit` and `featx jobs`: featx commands on a Ray cluster (the logic is in pipelines/cli/submit.py)."""
from __future__ import annotations

from typing import Optional

import typer

from pipelines.cli.common import featx_errors, print_json, say

ADDRESS_HELP = "Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, or http://127.0.0.1:8265)"


def submit(
    command: list[str] = typer.Argument(None, help="The command to run on the cluster, after --"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    ship: Optional[str] = typer.Option(None, "--ship", help="working-dir (this checkout; the default from a checkout) "
                                       "| package (the installed featx) | none (the image has featx)"),
    working_dir: Optional[str] = typer.Option(None, "--working-dir", help="Folder to ship as the job's working dir"),
    env: list[str] = typer.Option([], "--env", help="NAME=VALUE or NAME (value from this shell) for the job"),
    allow_secret_env: bool = typer.Option(False, "--allow-secret-env",
                                          help="Also pass secret-looking --env names (Ray keeps them in job metadata)"),
    requirements: Optional[str] = typer.Option(None, "--requirements", help="pip requirements file for the job's env"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="Choose the submission id"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the logs and exit with the job's outcome"),
) -> None:
    """Submit a featx command to a Ray cluster (Ray Jobs API); exit code = the job's outcome."""
    from pipelines.cli.submit import run_submit

    with featx_errors():
        code = run_submit(address, list(command or []), ship, working_dir, env, allow_secret_env, requirements,
                          submission_id, wait, say)
    raise typer.Exit(code)


jobs_app = typer.Typer(add_completion=False, invoke_without_command=True,
                       help="Jobs on a Ray cluster: list (the default), status, logs, stop")


@jobs_app.callback()
def jobs_main(ctx: typer.Context, address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    ctx.obj = {"address": address}
    if ctx.invoked_subcommand is None:
        jobs_list(ctx, json_out=False)


@jobs_app.command("list")
def jobs_list(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """All jobs of the cluster, newest first."""
    from pipelines.cli.submit import connect, job_rows, jobs_api

    with featx_errors():
        rows = jobs_api(lambda: job_rows(connect(ctx.obj["address"])))
    if json_out:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table()
    t.add_column("submission id", no_wrap=True, min_width=26)  # ids stay whole and copyable in narrow terminals
    for name in ("job id", "status", "start", "end", "entrypoint"):
        t.add_column(name)
    for r in rows:
        t.add_row(*[str(r[k]) for k in ("submission_id", "job_id", "status", "start", "end", "entrypoint")])
    Console().print(t)


@jobs_app.command("status")
def jobs_status(ctx: typer.Context, submission_id: str = typer.Argument(..., help="Submission id"),
                json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """A job's status, ids, times and Ray's message (secret values hidden). Exit code 1 when it failed."""
    from pipelines.cli.submit import connect, exit_code, job_status, jobs_api

    with featx_errors():
        st = jobs_api(lambda: job_status(connect(ctx.obj["address"]), submission_id))
    if json_out:
        print_json(st)
    else:
        print("\n".join(f"{k}: {v}" for k, v in st.items()))
    raise typer.Exit(exit_code(st["status"]))


@jobs_app.command("logs")
def jobs_logs(ctx: typer.Context, submission_id: str = typer.Argument(..., help="Submission id"),
              follow: bool = typer.Option(False, "--follow", "-f", help="Follow until the job ends; exit with its "
                                                                        "outcome")) -> None:
    """A job's logs (secret values hidden)."""
    from pipelines.cli.submit import jobs_api, run_logs

    with featx_errors():
        code = jobs_api(lambda: run_logs(ctx.obj["address"], submission_id, follow))
    raise typer.Exit(code)


@jobs_app.command("stop")
def jobs_stop(ctx: typer.Context, submission_id: str = typer.Argument(..., help="Submission id"),
              wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until it has stopped")) -> None:
    """Stop a running job."""
    from pipelines.cli.submit import jobs_api, run_stop

    with featx_errors():
        state = jobs_api(lambda: run_stop(ctx.obj["address"], submission_id, wait))
    print(f"{submission_id}: {state}")
