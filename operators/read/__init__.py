"""The read step: the input formats featx knows (``formats``), readers that turn one shard into an Arrow table
of keyed records (``readers``), and the read + preprocess stage that Ray Data runs per piece (``loading``).
Free of torch and of any model library (an import-linter contract in pyproject.toml keeps it so)."""
