"""`featx status`: what is published at an output, and the history of runs that wrote it."""
from __future__ import annotations

import json
from typing import Any

from operators.errors import InputError, StorageError
from operators.io.storage import get_fs, join, retry
from pipelines.publish.manifest import load_manifest

RUN_FIELDS = ("run_id", "command", "status", "started", "finished", "shards_processed", "shards_skipped",
              "shards_adopted", "rows_in", "rows_out", "rows_embedded", "rows_reused", "rows_deduped", "error_rows",
              "quarantined", "rows_per_second", "seconds", "snapshot")


def output_status(output: str, storage_options: dict[str, Any] | None = None, last_runs: int = 20) -> dict[str, Any]:
    from pipelines.publish.lease import is_stale, read_lease

    manifest = load_manifest(output, storage_options)
    runs = [{k: r.get(k) for k in RUN_FIELDS} for r in run_reports(output, storage_options, last=last_runs)]
    holder = read_lease(output, storage_options)
    if manifest is None and not runs and holder is None:
        raise InputError(f"nothing at {output!r}: no _manifest.json and no run reports; check the URI")
    published = None
    if manifest is not None:
        published = {
            "snapshot": manifest["snapshot"], "created": manifest["created"], "run_id": manifest["run_id"],
            "model": manifest["model"]["model"], "model_fingerprint": manifest["model_fingerprint"],
            "dim": manifest["dim"], "embedding_dtype": manifest["embedding_dtype"],
            "input": manifest["input"], "shards": manifest["shards"], "pieces": len(manifest["pieces"]),
            "data_files": len(manifest["files"]), "rows": manifest["rows"], "error_rows": manifest["error_rows"],
            "bytes": sum(f.get("bytes", 0) for f in manifest["files"]),
            "delta": _delta(output, manifest, storage_options),
        }
    running = None if holder is None else {"run_id": holder.run_id, "host": holder.host, "pid": holder.pid,
                                           "stale": is_stale(holder), "what": holder.describe()}
    return {"output": output, "published": published, "running": running, "runs": runs}


def _delta(output: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The Delta version next to the snapshot (pipelines.publish.delta); a log that cannot be read says so."""
    from pipelines.publish.delta import state

    try:
        return state(output, manifest, storage_options)
    except StorageError as e:
        return {"version": None, "snapshot": None, "in_sync": False, "error": str(e)}


def repair(output: str, storage_options: dict[str, Any] | None = None, keep_snapshots: int = 5,
           lease_ttl_s: float = 600.0) -> dict[str, Any]:
    """`featx status --repair`: write the Delta versions the log is missing (a run killed between its manifest
    and its Delta commit; a table from before Delta logs), under the output's lease like any writer."""
    import time
    import uuid

    from pipelines.publish.delta import sync
    from pipelines.publish.lease import Lease

    manifest = load_manifest(output, storage_options)
    if manifest is None:
        raise InputError(f"nothing is published at {output!r} (no _manifest.json): nothing to repair")
    lease = Lease(output, f"repair-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}", lease_ttl_s,
                  storage_options).acquire()  # a running job holds it: it writes the Delta versions itself
    try:
        return sync(output, manifest, storage_options, keep_snapshots)
    finally:
        lease.release()


def run_reports(output: str, storage_options: dict[str, Any] | None, last: int | None = None) -> list[dict[str, Any]]:
    """The reports of the runs that wrote ``output`` (``_runs/``), oldest first; ``last``: only the newest that
    many are read (a report's name is its run id, which starts with its start time)."""
    fs, path = get_fs(join(output, "_runs"), storage_options)
    try:
        names = sorted(retry(lambda: fs.ls(path, detail=False), f"listing {join(output, '_runs')!r}"))
    except FileNotFoundError:
        return []
    names = [n for n in names if n.endswith(".json")]
    out = []
    for name in names[-last:] if last else names:
        out.append(json.loads(retry(lambda n=name: fs.cat_file(n), f"reading {name!r}")))
    return sorted(out, key=lambda r: (r.get("started") or "", r.get("finished") or ""))
