"""A reader process for tests/integration/test_readers.py: reads a featx table over and over, while another
process commits snapshot after snapshot, until a stop file appears.

    python -m tests.integration.reader_loop OUTPUT RESULTS.jsonl STOP_FILE [STORAGE_OPTIONS_JSON]

Each read takes one of three paths in turn, as three kinds of user would: ``featx.open(...).keys()``; DuckDB
through featx (``featx.open(...).duckdb()``); pyarrow over the files ``_manifest.json`` lists (no featx
code). It appends one line per read: the path, the rows and a digest of the sorted key set (or the error).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any


def digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()


def read_featx(output: str, so: dict[str, Any]) -> list[str]:
    import featx

    return featx.open(output, storage_options=so).keys()


def read_duckdb(output: str, so: dict[str, Any]) -> list[str]:
    import featx

    con = featx.open(output, storage_options=so).duckdb()
    return [r[0] for r in con.sql("SELECT key FROM embeddings").fetchall()]


def read_pyarrow(output: str, so: dict[str, Any]) -> list[str]:
    """What a user without featx does: the manifest's file list, then pyarrow (fsspec for the store)."""
    import fsspec
    import pyarrow.parquet as pq

    protocol = output.split("://", 1)[0] if "://" in output else "file"
    fs = fsspec.filesystem(protocol, **({"client_kwargs": {"endpoint_url": so["endpoint_url"]}}
                                        if so.get("endpoint_url") else {}))
    fs.invalidate_cache()  # a user's fresh look: no listing or size remembered from the last read
    base = output.split("://", 1)[-1].rstrip("/")
    with fs.open(f"{base}/_manifest.json", "rb") as f:
        manifest = json.load(f)
    keys: list[str] = []
    for entry in manifest["files"]:
        with fs.open(f"{base}/{entry['path']}", "rb") as f:
            keys += pq.read_table(f, columns=["key"])["key"].to_pylist()
    return keys


def main() -> None:
    output, results, stop = sys.argv[1:4]
    so = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    paths = [("featx", read_featx), ("duckdb", read_duckdb), ("pyarrow", read_pyarrow)]
    i = 0
    with open(results, "a") as out:
        while not os.path.exists(stop):
            name, fn = paths[i % len(paths)]
            i += 1
            try:
                keys = fn(output, so)
                line = {"path": name, "rows": len(keys), "distinct": len(set(keys)), "digest": digest(keys)}
            except Exception as e:  # noqa: BLE001 - recorded: the test decides what an error means
                line = {"path": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            out.write(json.dumps(line) + "\n")
            out.flush()
            time.sleep(0.05)


if __name__ == "__main__":
    main()
