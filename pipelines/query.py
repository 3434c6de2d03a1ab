"""Reading a published table: the manifest's files only (never a bare glob), into DuckDB or Arrow."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.errors import InputError
from operators.storage import get_fs
from pipelines.manifest import load_manifest, published_files


def read_table(output: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """The published snapshot as one Arrow table."""
    manifest = load_manifest(output, storage_options)
    if manifest is None:
        raise InputError(f"nothing is published at {output!r} (no _manifest.json); run `featx embed` first")
    files = published_files(manifest, output)
    if not files:
        return pa.table({})
    fs, _ = get_fs(files[0], storage_options)
    paths = [get_fs(f, storage_options)[1] for f in files]
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)


def duckdb_connection(output: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A DuckDB connection with an ``embeddings`` view whose vector column is already ``FLOAT[dim]``.

    Local outputs are scanned in place; object-store outputs are read through
    fsspec/pyarrow and handed to DuckDB as Arrow (httpfs needs no install).
    """
    import duckdb

    manifest = load_manifest(output, storage_options)
    if manifest is None:
        raise InputError(f"nothing is published at {output!r} (no _manifest.json); run `featx embed` first")
    dim = int(manifest["dim"])
    con = duckdb.connect()
    files = published_files(manifest, output)
    fs, _ = get_fs(output, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        paths = [get_fs(f)[1] for f in files]
        con.execute(f"CREATE VIEW raw_embeddings AS SELECT * FROM read_parquet({paths!r})")
    else:
        con.register("raw_embeddings", read_table(output, storage_options))
    con.execute(f"CREATE VIEW embeddings AS SELECT * REPLACE (embedding::FLOAT[{dim}] AS embedding) FROM raw_embeddings")
    return con
