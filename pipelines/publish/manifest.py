"""``OUTPUT/_manifest.json``: the one source of truth for what is published.

It lists the committed data files with their row counts, the pieces and the
input shards (URI, size, ETag or mtime) they came from, the model fingerprint
and the content fingerprint (model + preprocessing + dtype + read options:
rows are only reused between runs that agree on it). It is written last, as one
whole object; every version is also kept as a numbered snapshot under
``OUTPUT/_manifests/``. A data file that no manifest lists is not published.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable

from operators.io.storage import get_fs, join, retry, write_bytes

MANIFEST = "_manifest.json"
SNAPSHOTS = "_manifests"
FORMAT_VERSION = 2


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_manifest(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The published manifest, or None when nothing was published yet."""
    fs, path = get_fs(join(output, MANIFEST), storage_options)
    try:
        raw = retry(lambda: fs.cat_file(path), f"reading {join(output, MANIFEST)!r}")
    except FileNotFoundError:
        return None
    manifest = json.loads(raw)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise RuntimeError(
            f"{join(output, MANIFEST)} was written by a newer featx (format {manifest['format_version']}); upgrade featx"
        )
    return manifest


def build_manifest(
    *, previous: dict[str, Any] | None, run_id: str, model: dict[str, Any], model_fingerprint: str,
    content_fingerprint: str, dim: int | None, embedding_dtype: str, input_uri: str, input_format: str, pieces: list[dict[str, Any]],
) -> dict[str, Any]:
    pieces = sorted(pieces, key=lambda p: p["id"])
    files = [f for p in pieces for f in p["files"]]
    error_files = [f for p in pieces for f in p["error_files"]]
    return {
        "format_version": FORMAT_VERSION,
        "snapshot": (previous or {}).get("snapshot", 0) + 1,
        "created": now(),
        "run_id": run_id,
        "input": {"uri": input_uri, "format": input_format},
        "model": model,
        "model_fingerprint": model_fingerprint,
        "content_fingerprint": content_fingerprint,
        "dim": dim,
        "embedding_dtype": embedding_dtype,
        "rows": sum(f["rows"] for f in files),
        "error_rows": sum(f["rows"] for f in error_files),
        "shards": sum(len(p["shards"]) for p in pieces),
        "files": files,
        "error_files": error_files,
        "pieces": pieces,
    }


def commit(output: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None,
           before_publish: Callable[[], None] = lambda: None) -> str:
    """Publish: the numbered snapshot first, then ``_manifest.json`` in one whole-object write.

    A snapshot file newer than ``_manifest.json`` (a commit that died in between) is not published: readers
    go by ``_manifest.json``, and the next commit takes that number again.
    """
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    snap = join(output, SNAPSHOTS, f"{manifest['snapshot']:08d}.json")
    write_bytes(snap, body, storage_options)
    before_publish()
    write_bytes(join(output, MANIFEST), body, storage_options)
    return snap


def load_snapshot(output: str, snapshot: int, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A kept numbered snapshot, or None when there is none with that number."""
    fs, path = get_fs(join(output, SNAPSHOTS, f"{snapshot:08d}.json"), storage_options)
    try:
        return json.loads(retry(lambda: fs.cat_file(path), f"reading snapshot {snapshot} of {output!r}"))
    except FileNotFoundError:
        return None


def published_files(manifest: dict[str, Any], output: str) -> list[str]:
    """Full URIs of the data files a reader must read (never a bare glob)."""
    return [join(output, f["path"]) for f in manifest["files"]]
