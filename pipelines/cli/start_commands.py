"""`featx demo` and `featx models`: a first run with no data of your own, and what models there are."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import job_run, say


def demo(folder: str = typer.Option("featx-demo", "--dir", help="Where to write the sample data and outputs")) -> None:
    """Write a small real sample dataset, embed it with the offline default models, query it."""
    from pipelines.demo.demo import run_demo

    with job_run():
        run_demo(folder, say=say)


def models() -> None:
    """List the model registry."""
    from operators.models.registry import known_models

    t = Table("name", "what")
    for name, desc in known_models().items():
        t.add_row(name, desc)
    Console().print(t)
