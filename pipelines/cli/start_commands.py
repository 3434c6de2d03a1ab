"""`featx demo` and `featx models`: a first run with no data of your own, and what models there are."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import VERBOSE, job_run


def demo(folder: str = typer.Option("featx-demo", "--dir", help="Where to write the sample data and outputs"),
         verbose: bool = VERBOSE) -> None:
    """Write a small real sample dataset, embed it with the offline default models, query it."""
    from pipelines.demo.demo import run_demo

    with job_run(ray_log=True, verbose=verbose) as show:
        run_demo(folder, say=show)


def models() -> None:
    """List the model registry."""
    from operators.models.registry import known_models

    t = Table("name", "what")
    for name, desc in known_models().items():
        t.add_row(name, desc)
    Console().print(t)
