"""Parquet over any fsspec store: whole tables, footers, and the Arrow filesystem that Ray Data and
pyarrow datasets read through. The one place featx opens Parquet files it did not just write."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.io.storage import get_fs, retry


def read_parquet(uri: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table (``columns``: only those), with bounded retries of storage failures."""
    fs, path = get_fs(uri, storage_options)

    def run() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    return retry(run, f"reading {uri!r}")


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
    if "://" not in uri or uri.startswith("file://"):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = get_fs(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs))
