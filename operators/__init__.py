"""featx operators: the library of steps, no jobs and no CLI.

``io`` (object storage and Parquet), ``read`` (input formats and readers), ``preprocess`` (decode, crop,
tokenize), ``models`` (the registry and the backbones), ``embed`` (the embedding actor), ``write`` (the
Parquet sink), ``learn`` (heads, metrics and domain adaptation on embeddings) and ``search`` (exact top-k),
with the column names the steps share (``columns``), featx's errors (``errors``) and the fault injection
the kill tests use (``faults``). Every operator is a pure function over Arrow/numpy column batches at its
core; Ray only schedules them (tasks for CPU work, actors that hold a loaded model). Operators never import
``pipelines`` (an import-linter contract in pyproject.toml).
"""
