"""What every `featx` command shares: the one path from YAML + flags + ``--set`` to a printed, validated job
config; featx errors as one clear message and an exit code; messages on stderr, results on stdout."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from operators.errors import FeatxError, PipelineError, StorageError
from operators.read.formats import FORMATS

if TYPE_CHECKING:
    from pipelines.cli.display import RunDisplay
    from pipelines.config import JobConfig

J = TypeVar("J", bound="JobConfig")

console = Console(stderr=True, soft_wrap=True)  # messages hold paths and URIs: never wrap them

CONFIG_HELP = "YAML config (only overrides of the defaults); a path, or the name of a shipped config"
FORMAT_HELP = "Input format: " + " | ".join(FORMATS)
SET_HELP = "Override any config key (repeatable; a dotted key reaches inside a mapping): --set batch_size=256"
VERBOSE = typer.Option(False, "--verbose", "-v", help="Show Ray's own logs and progress as they come (by default "
                       "they go to a log file beside the run's report: _runs/RUN_ID.log)")
STORAGE_HELP = ("fsspec storage option for the output, key=value (repeatable): -o endpoint_url=http://... ; "
                "credentials come from the environment")

EXIT_RUN_FAILED = 1  # a run failed (pipeline/storage failure, refused commit): nothing published, a rerun may succeed
EXIT_BAD_COMMAND = 2  # the command was wrong: config, input, model, a busy output


def exit_code(e: BaseException) -> int:
    return EXIT_RUN_FAILED if isinstance(e, (PipelineError, StorageError)) else EXIT_BAD_COMMAND


def fail(e: BaseException) -> NoReturn:
    """Print a featx error (no traceback) and exit with its code (see exit_code)."""
    console.print("[bold red]error:[/] " + str(e).replace("[", "\\["), highlight=False)
    raise typer.Exit(exit_code(e))


@contextmanager
def featx_errors() -> Iterator[None]:
    """Around a command's work: a FeatxError becomes its message and exit code."""
    try:
        yield
    except FeatxError as e:
        fail(e)


@contextmanager
def job_run(ray_log: bool = False, verbose: bool = False) -> Iterator["RunDisplay"]:
    """Around a job's work (the commands that run on Ray): featx errors as for featx_errors; whatever the run
    prints (Ray Tune's tables, the workers' logs that Ray forwards) goes to stderr, and the job's Ray is shut
    down before the command prints its result, so that stdout holds the result alone (JSON for scripts).

    Yields the job's progress display (pipelines/cli/display.py). ``ray_log``: Ray's own output goes to a log
    file (pipelines/cli/raylog.py; each embedding run keeps its share beside its report) and the display is
    live on a terminal; ``verbose``: Ray's output also shows as it comes, beside plain progress lines."""
    from pipelines.cli.display import RunDisplay

    with featx_errors(), contextlib.ExitStack() as stack:
        log = _capture(stack, verbose) if ray_log and _owns_stderr() else None
        display = RunDisplay(console, live=log is not None and not verbose and console.is_terminal, ray_log=log)
        stack.callback(display.close)
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        try:
            yield display
        finally:
            _stop_ray()
            if log is not None and log.other:
                say(f"Ray logged {log.other} more warning or error lines; they are in {log.path}")


@contextmanager
def job_log(display: "RunDisplay", folder: str, storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Around a learning job's work: Ray's output during it (kept off the console by job_run) is written to
    ``FOLDER/_ray.log`` when it ends, failed or not (the leading underscore keeps it out of readers' globs)."""
    from operators.io.storage import join

    mark = display.log_mark()
    try:
        yield
    finally:
        display.keep_log(mark, join(folder, "_ray.log"), storage_options)


def _capture(stack: contextlib.ExitStack, verbose: bool) -> Any:
    """Start keeping Ray's output off the console (pipelines/cli/raylog.py) for the rest of ``stack``; the console
    writes to the terminal meanwhile. None, with a note, when the log file cannot be set up."""
    from pipelines.cli.raylog import RayLog

    saved_file, saved_width = console._file, console._width  # restored after the log's exit (LIFO)
    stack.callback(setattr, console, "_width", saved_width)
    stack.callback(setattr, console, "_file", saved_file)
    try:
        log = stack.enter_context(RayLog(notice=say, verbose=verbose))
    except OSError as e:
        say(f"note: Ray's output stays on the console: its log file could not be set up ({e})")
        return None
    console.file = log.terminal
    if log.terminal.isatty():  # fds 1 and 2 are the log now: the width comes from the terminal itself
        try:
            console.width = os.get_terminal_size(log.terminal.fileno()).columns
        except OSError:
            pass
    return log


def _owns_stderr() -> bool:
    """Whether this process's stderr is its file descriptor 2 (a console script's is; a test runner's or an
    embedding application's stream is not, and featx leaves its descriptors alone)."""
    try:
        return sys.stderr.fileno() == 2 and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


def _stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def say(message: str) -> None:
    """A progress message, on stderr (stdout holds the command's result)."""
    console.print(message, highlight=False, markup=False)


def job_config(cls: type[J], config: Optional[str], flags: dict[str, Any], sets: list[str],
               saved_at: Optional[str] = None, quiet: bool = False) -> J:
    """The one way a command gets its job config: defaults <- ``--config`` YAML (or, without one, the config a
    run saved at ``saved_at``) <- the command's flags (unset ones are None and skipped) <- ``--set`` pairs;
    validated, and printed (secrets redacted) before any work starts (``quiet``: not printed)."""
    from pipelines.config import parse_set

    overrides = {**flags, **parse_set(sets)}
    cfg = cls.from_saved(saved_at, overrides) if config is None and saved_at else cls.build(config, overrides)
    if quiet:
        return cfg
    console.print("[dim]resolved config:[/]", highlight=False)
    console.print(cfg.dump(), highlight=False, markup=False)
    return cfg


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str), flush=True)


def print_rows(rows: list[dict[str, Any]], title: str) -> None:
    t = Table(*(rows[0].keys() if rows else ["(no rows)"]), title=title)
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v)[:80] for v in r.values()])
    Console().print(t)


def storage_options(items: list[str]) -> dict[str, Any]:
    """``-o key=value`` pairs -> fsspec options; ``endpoint_url`` goes where s3fs wants it."""
    from pipelines.config import parse_set

    opts = parse_set(items)
    if "endpoint_url" in opts:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = opts.pop("endpoint_url")
    return opts
