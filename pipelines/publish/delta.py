"""Every committed snapshot is also a Delta Lake table version at OUTPUT, for Spark, Polars, DuckDB, pandas, Ray.

featx's commit point stays ``_manifest.json`` (:mod:`pipelines.publish.commit`). Right after it, in the same
commit step, :func:`sync` writes the snapshot as one Delta version through ``deltalake`` (delta-rs): the
snapshot's data files, already written and moved to ``data/...``, are added by relative path (no copy); files
of changed or removed pieces leave the table in that version; carried files stay. A run, a refresh and
``featx status --repair`` first write any version the Delta log is missing (a run killed between the
manifest and the Delta commit), so Delta readers see the previous snapshot for a moment at worst, never a
partial or mixed one.

Mapping: every featx commit carries the app transaction ``("featx", N)`` (``DeltaTable.transaction_version
("featx")`` = the snapshot a version shows) and custom metadata (``featx.snapshot``, ``featx.run_id``,
``featx.model``, ``featx.content_fingerprint``). A model change takes two versions (the data overwrite with
the new schema, then the table properties ``featx.model`` / ``featx.dim``); both show the same snapshot, and
:func:`version_of` returns the last.

S3: delta-rs 1.x commits each log entry with a conditional put (``If-None-Match: *``), so a second writer of
the same version fails instead of overwriting; featx's lease already makes featx the only writer, so no
DynamoDB lock and no ``AWS_S3_ALLOW_UNSAFE_RENAME`` are used.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import pyarrow as pa

from operators.errors import StorageError
from operators.faults import failpoint
from operators.io.parquet import open_parquet_file
from operators.io.storage import get_fs, join
from pipelines.publish.manifest import load_snapshot

DELTA_LOG = "_delta_log"
APP_ID = "featx"
# Delta has no half-precision float type: a float16 table is not mirrored (featx status says so)
UNSUPPORTED_DTYPES = {"float16": "Delta Lake has no float16 type; embed with embedding_dtype: float32 to get a "
                                 "Delta table"}
_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


class DeltaUnavailable(Exception):
    """This output cannot have a Delta log (its store or its dtype); the message says why."""


def location(output: str, storage_options: dict[str, Any] | None) -> tuple[str, dict[str, str] | None]:
    """The table URI and the delta-rs storage options for a featx output, from the same storage options and
    standard places (env variables) featx uses. The result holds credentials: never print it."""
    so = dict(storage_options or {})
    proto = output.split("://", 1)[0] if "://" in output else "file"
    if proto == "file":
        fs, path = get_fs(output, so)
        return os.path.abspath(path), None
    if proto not in _PROTOCOLS:
        raise DeltaUnavailable(f"delta-rs cannot write to {proto}:// stores")
    client = so.get("client_kwargs") or {}
    opts: dict[str, str] = {}
    if proto in ("s3", "s3a"):
        endpoint = so.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        region = client.get("region_name") or so.get("region_name") or os.environ.get("AWS_REGION") \
            or os.environ.get("AWS_DEFAULT_REGION")
        pairs = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": region, "AWS_ACCESS_KEY_ID": so.get("key"),
                 "AWS_SECRET_ACCESS_KEY": so.get("secret"), "AWS_SESSION_TOKEN": so.get("token"),
                 "AWS_PROFILE": so.get("profile")}
        opts = {k: str(v) for k, v in pairs.items() if v}
        if endpoint and str(endpoint).startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
        if so.get("anon"):
            opts["AWS_SKIP_SIGNATURE"] = "true"
        return "s3://" + output.split("://", 1)[1].rstrip("/"), opts
    if proto in ("gs", "gcs"):
        token = so.get("token")
        if isinstance(token, str) and os.path.exists(token):
            opts["google_service_account"] = token
        return "gs://" + output.split("://", 1)[1].rstrip("/"), opts
    pairs = {"azure_storage_account_name": so.get("account_name"), "azure_storage_account_key": so.get("account_key"),
             "azure_storage_sas_token": so.get("sas_token"), "azure_storage_connection_string": so.get("connection_string")}
    return output.rstrip("/"), {k: str(v) for k, v in pairs.items() if v}


def _open(uri: str, dso: dict[str, str] | None) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, storage_options=dso)
    except TableNotFoundError:
        return None


def _wrap(what: str, fn: Callable[[], Any]) -> Any:
    from deltalake.exceptions import DeltaError

    try:
        return fn()
    except (DeltaError, OSError) as e:  # delta-rs raises OSError for object-store failures; never a secret in it
        raise StorageError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


def _why_not(manifest: dict[str, Any]) -> str | None:
    return UNSUPPORTED_DTYPES.get(manifest.get("embedding_dtype", "float32"))


def table_properties(manifest: dict[str, Any]) -> dict[str, str]:
    return {"featx.model": str((manifest.get("model") or {}).get("model", "")), "featx.dim": str(manifest.get("dim") or "")}


def _arrow_schema(output: str, snap: dict[str, Any], so: dict[str, Any]) -> pa.Schema:
    """The output contract's schema, as the snapshot's first data file's footer says (metadata stripped)."""
    schema = open_parquet_file(join(output, snap["files"][0]["path"]), so).schema_arrow
    return pa.schema([f.remove_metadata() for f in schema])


def current_files(output: str, storage_options: dict[str, Any] | None) -> set[str] | None:
    """Relative paths of the files in the Delta table's latest version (empty when there is no Delta log; None
    when this output cannot have one)."""
    try:
        uri, dso = location(output, storage_options)
    except DeltaUnavailable:
        return None
    dt = _wrap(f"opening the Delta log of {output!r}", lambda: _open(uri, dso))
    return set() if dt is None else _files(dt)


def _files(dt: Any) -> set[str]:
    actions = pa.table(dt.get_add_actions(flatten=True))
    return set(actions.column("path").to_pylist()) if actions.num_rows else set()


def _table_for(output: str, manifest: dict[str, Any], so: dict[str, Any] | None) -> str | tuple[str, Any, Any]:
    """(uri, delta-rs options, the open table or None) for an output, or why it has no Delta log."""
    why = _why_not(manifest)
    try:
        uri, dso = location(output, so)
    except DeltaUnavailable as e:
        why = str(e)
    if why:
        return why
    return uri, dso, _wrap(f"opening the Delta log of {output!r}", lambda: _open(uri, dso))


def state(output: str, manifest: dict[str, Any] | None, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Where the Delta log stands against the manifest: version, the snapshot it shows, in sync or behind."""
    if manifest is None:
        return {"version": None, "snapshot": None, "in_sync": True}
    where = _table_for(output, manifest, storage_options)
    if isinstance(where, str):
        return {"version": None, "snapshot": None, "in_sync": False, "skipped": where}
    dt = where[2]
    if dt is None:
        return {"version": None, "snapshot": None, "in_sync": False}
    shown = dt.transaction_version(APP_ID)
    return {"version": dt.version(), "snapshot": shown, "in_sync": shown == manifest["snapshot"]}


def version_of(output: str, snapshot: int, storage_options: dict[str, Any] | None) -> int | None:
    """The Delta version that shows featx snapshot ``snapshot`` (the last one, when two do), or None."""
    try:
        uri, dso = location(output, storage_options)
    except DeltaUnavailable:
        return None
    dt = _wrap(f"opening the Delta log of {output!r}", lambda: _open(uri, dso))
    if dt is None:
        return None
    v = dt.version()
    while v >= 0:
        shown = dt.transaction_version(APP_ID)
        if shown is None or shown < snapshot:
            return None
        if shown == snapshot:
            return v
        v -= 1
        _wrap(f"reading version {v} of the Delta log of {output!r}", lambda: dt.load_as_version(v))
    return None


def sync(output: str, manifest: dict[str, Any] | None, storage_options: dict[str, Any] | None, keep_snapshots: int,
         progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Bring the Delta log up to ``manifest`` (the published one): write each missing snapshot's version in order
    (only kept snapshots: older ones' files may be cleaned up), creating the table from the current snapshot
    when there is none (a new output, or a table from before featx wrote Delta logs). Call while holding the
    output's lease. Returns :func:`state`'s answer after the work, plus ``written``: the versions written."""
    if manifest is None:
        return state(output, manifest, storage_options)
    so = dict(storage_options or {})
    where = _table_for(output, manifest, so)
    if isinstance(where, str):
        return {"version": None, "snapshot": None, "in_sync": False, "skipped": where, "written": []}
    uri, dso, dt = where
    current = int(manifest["snapshot"])
    shown = dt.transaction_version(APP_ID) if dt is not None else None
    if shown is None or shown > current:
        todo = [current]  # a new table, or one from before featx wrote Delta logs: from the current snapshot
    else:
        todo = list(range(max(shown + 1, current - keep_snapshots + 1), current + 1))
    written: list[int] = []
    for n in todo:
        snap = manifest if n == current else load_snapshot(output, n, so)
        if snap is None:
            continue
        dt = _write_version(output, uri, dso, dt, snap, so)
        if dt is not None:
            written.append(dt.version())
            progress(f"Delta version {dt.version()} = snapshot {n}")
    if dt is not None and dt.transaction_version(APP_ID) == current:
        wanted = table_properties(manifest)
        if {k: dt.metadata().configuration.get(k) for k in wanted} != wanted:
            _wrap(f"setting the table properties of {output!r}",
                  lambda: dt.alter.set_table_properties(wanted, raise_if_not_exists=False))
            dt = _open(uri, dso)
            written.append(dt.version())
    out = state(output, manifest, so)
    out["written"] = written
    return out


def _write_version(output: str, uri: str, dso: dict[str, str] | None, dt: Any, snap: dict[str, Any],
                   so: dict[str, Any]) -> Any:
    """One Delta version showing exactly ``snap``'s data files; returns the reopened table (None when there is
    no table yet and the snapshot has no data file to take a schema from)."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction

    n = int(snap["snapshot"])
    if dt is None and not snap["files"]:
        return None
    schema = _arrow_schema(output, snap, so) if snap["files"] else None
    if dt is None:
        dt = _wrap(f"creating the Delta log of {output!r}", lambda: DeltaTable.create(
            uri, schema, mode="error", configuration=table_properties(snap), storage_options=dso,
            raise_if_key_not_exists=False,
            commit_properties=CommitProperties(custom_metadata={"featx.operation": "create"})))
    wanted = {f["path"]: f for f in snap["files"]}
    have = _files(dt)
    if schema is None:
        schema = dt.schema()
    overwrite = Schema.from_arrow(schema).to_json() != dt.schema().to_json()
    now_ms = int(time.time() * 1000)
    sizes = _sizes(output, [p for p in wanted if (overwrite or p not in have) and not wanted[p].get("bytes")], so)
    adds = [AddAction(p, int(f.get("bytes") or sizes[p]), {}, now_ms, True, json.dumps({"numRecords": f["rows"]}))
            for p, f in wanted.items() if overwrite or p not in have]
    removes = [] if overwrite else [RemoveAction(p, True, now_ms) for p in sorted(have - set(wanted))]
    meta = {"featx.snapshot": str(n), "featx.run_id": str(snap.get("run_id", "")),
            "featx.model": str((snap.get("model") or {}).get("model", "")),
            "featx.content_fingerprint": str(snap.get("content_fingerprint", ""))}
    props = CommitProperties(custom_metadata=meta, app_transactions=[Transaction(APP_ID, n)])
    failpoint("commit-before-delta")
    _wrap(f"committing snapshot {n} to the Delta log of {output!r}", lambda: dt.create_write_transaction(
        adds + removes, "overwrite" if overwrite else "append", schema, commit_properties=props))
    return _open(uri, dso)


def _sizes(output: str, paths: list[str], so: dict[str, Any]) -> dict[str, int]:
    if not paths:
        return {}
    fs, root = get_fs(output, so)
    return {p: int(fs.size(f"{root.rstrip('/')}/{p}")) for p in paths}



def mirror(output: str, manifest: dict[str, Any] | None, storage_options: dict[str, Any] | None, keep_snapshots: int,
           progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """:func:`sync` for a run: a Delta log that cannot be written does not unpublish the committed snapshot; the
    failure is reported (run report, ``featx status``) and the next run or ``featx status --repair`` catches up."""
    try:
        return sync(output, manifest, storage_options, keep_snapshots, progress)
    except Exception as e:  # noqa: BLE001 - the manifest is committed; say what failed and how to repair it
        msg = (f"the Delta log of {output!r} could not be brought up to snapshot {(manifest or {}).get('snapshot')} "
               f"({type(e).__name__}: {str(e)[:300]}); featx readers see the snapshot, Delta readers the previous "
               "one until `featx status --repair` or the next run writes it")
        progress("WARNING: " + msg)
        return {"version": None, "snapshot": None, "in_sync": False, "error": msg, "written": []}
