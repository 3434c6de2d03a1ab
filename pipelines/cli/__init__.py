"""The `featx` command line, on top of every job (nothing else imports it): the typer app (``app``), the
path every command shares from YAML + flags + ``--set`` to a validated config and its errors (``common``),
one module per command group (``start_commands``: demo, models; ``embed_commands``: embed, refresh,
status; ``learn_commands``: train, finetune, tune, predict; ``read_commands``: query, sql, inspect, index;
``cluster_commands``: submit, jobs), the Ray Job Submission client they use (``submit``), and
``python -m pipelines.cli`` (``__main__``)."""
