"""Parquet over any fsspec store: whole tables, files opened for reading in batches, footers, and the
Arrow filesystem that Ray Data and pyarrow datasets read through. The one place featx opens Parquet
files it did not just write (a shard's bytes already in memory are parsed where they are read)."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.io.storage import get_fs, is_local, retry


def read_parquet(uri: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table (``columns``: only those), with bounded retries of storage failures."""
    fs, path = get_fs(uri, storage_options)

    def run() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    return retry(run, f"reading {uri!r}")


def open_parquet_file(uri: str, storage_options: dict[str, Any] | None = None) -> pq.ParquetFile:
    """A Parquet file opened for reading in batches or row groups (its footer read, its data not yet).

    Reads are buffered page by page, not by whole column chunks: a large row group of vectors would
    otherwise cost several times its size in decode buffers. Local files go through Arrow's own reader.
    """
    fs, path = get_fs(uri, storage_options)
    opts: dict[str, Any] = {"pre_buffer": False, "buffer_size": 1 << 20}
    if is_local(fs):
        return retry(lambda: pq.ParquetFile(path, **opts), f"opening {uri!r}")
    return retry(lambda: pq.ParquetFile(fs.open(path, "rb"), **opts), f"opening {uri!r}")


def parquet_rows(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Rows in a Parquet file, from its footer alone (a ranged read, not the data)."""
    fs, path = get_fs(uri, storage_options)

    def run() -> int:
        with fs.open(path, "rb") as f:
            return int(pq.read_metadata(f).num_rows)

    return retry(run, f"reading the footer of {uri!r}")


def arrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A pyarrow filesystem for ``uri``'s store (None for local paths: pyarrow's own is used), built over the
    same fsspec filesystem (endpoint, credentials) as the rest of featx."""
    fs, _ = get_fs(uri, storage_options)
    if is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def write_parquet_bytes(table: pa.Table) -> bytes:
    """A table as one Parquet object's bytes (zstd)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
