"""featx pipelines: the jobs assembled from the operators, and their plumbing.

The jobs ``embed``, ``learn`` (train, finetune, tune, predict), ``read`` (featx.open, query, index,
inspect) and ``demo``; what they share: ``config`` (one config object per job), ``runtime`` (Ray start-up
and resources) and ``publish`` (manifest, commit, lease); the command line ``cli`` on top, and ``featx``,
the Python entry point installed as ``import featx``. Nothing imports ``cli`` (import-linter contracts in
pyproject.toml keep the layers).
"""

__version__ = "0.1.0"
