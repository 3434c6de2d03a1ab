"""The Parquet sink (``sink``): an embedded piece -> its staged data and error files, deterministic names,
carried-over rows of unchanged shards copied into a piece's new files."""
