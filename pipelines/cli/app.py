"""The `featx` command line: one typer app, the commands registered from one module per command group.

Every command takes the same path (pipelines/cli/common.py): a job's config from ``--config`` YAML + the
command's flags + ``--set KEY=VALUE``, printed once resolved; a featx error as one clear message, no
traceback, exit code 1 when a run failed (nothing published, a rerun may succeed) and 2 when the command
was wrong. Heavy imports (Ray, torch) happen inside the commands, so ``featx --help`` is instant.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from pipelines.cli import cluster_commands, embed_commands, learn_commands, read_commands, start_commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="featx: feature extraction and transfer learning on Ray")

# the order of `featx --help`
for command in (embed_commands.embed, embed_commands.refresh, embed_commands.plan, embed_commands.status,
                learn_commands.train, learn_commands.finetune, learn_commands.tune, learn_commands.predict,
                read_commands.query, read_commands.sql, read_commands.inspect, read_commands.index,
                start_commands.demo, start_commands.models):
    app.command()(command)
app.command("submit", context_settings={"allow_interspersed_args": False})(cluster_commands.submit)
app.add_typer(cluster_commands.jobs_app, name="jobs")


def main(argv: Optional[list[str]] = None) -> None:
    """The console script `featx` (and ``python -m pipelines.cli``)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
