"""Storage: object stores through fsspec (``storage``: listing shards, reads and writes with bounded retries,
moves, exclusive creates, secrets redacted) and Parquet over any of them (``parquet``: whole tables, files
opened for batch reads, footers, the Arrow filesystem). Free of torch."""
