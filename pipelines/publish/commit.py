"""Exactly-once publishing: stage, journal, commit by manifest, clean up.

The protocol, for one output (one writer at a time, see :mod:`pipelines.publish.lease`):

1. A run writes every file under its own prefix ``OUTPUT/_staging/<run_id>/`` (``data/`` and ``_errors/``,
   with the deterministic names the sink gives them).
2. When all parts of a piece are written, the driver appends the piece's record to the run's journal
   (``_staging/<run_id>/journal/NNNNNN.json``, a few seconds of pieces per object). A journalled piece is
   finished work: a rerun after a crash adopts it instead of embedding its shards again.
3. Commit: check the lease is still ours and that nobody committed since this run started; check the row
   accounting (for every piece, rows read from its shards = rows in its data files + rows in its error
   files, counted from the files' own footers; every listed shard in exactly one piece), else refuse
   (:class:`CommitRefused`, nothing published); move each staged file to its final name (``data/...``, ``_errors/...``); write the numbered snapshot, then
   ``_manifest.json`` in one whole-object write. Readers follow the manifest, so they see the old snapshot
   or the new one, never a mix, and never a file that no manifest lists. Right after, the snapshot becomes
   the next version of the Delta log at OUTPUT (:mod:`pipelines.publish.delta`); a run that finds the Delta
   log behind the manifest writes the missing versions first.
4. Clean up: delete every staging prefix (this run's and crashed runs'), and data files that neither the
   new manifest, nor the last ``keep_snapshots`` snapshots, nor the Delta log's latest version list.

A crash at any point leaves only unpublished files, which the next run adopts (journalled pieces; files
already moved are found at their final names) or deletes.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from operators.errors import CommitRefused, PipelineError, StorageError
from operators.faults import failpoint
from operators.io.parquet import parquet_rows
from operators.io.storage import delete, join, list_files, move, read_bytes, write_bytes
from pipelines.publish.delta import current_files
from pipelines.publish.lease import Lease
from pipelines.publish.manifest import build_manifest, commit, load_manifest, load_snapshot, now

STAGING = "_staging"


class Staging:
    """This run's staging prefix and its journal of finished pieces."""

    def __init__(self, output: str, run_id: str, content_fingerprint: str, storage_options: dict[str, Any],
                 flush_every_s: float = 5.0):
        self.output, self.run_id, self.content_fp = output, run_id, content_fingerprint
        self.storage_options = storage_options
        self.prefix = f"{STAGING}/{run_id}"
        self.flush_every_s = flush_every_s
        self._pending: list[dict[str, Any]] = []
        self._seq = 0
        self._last_flush = time.monotonic()

    def start(self, base_snapshot: int) -> "Staging":
        info = {"run_id": self.run_id, "content_fingerprint": self.content_fp, "base_snapshot": base_snapshot,
                "started": now()}
        write_bytes(join(self.output, self.prefix, "run.json"), json.dumps(info).encode(), self.storage_options)
        return self

    def add(self, record: dict[str, Any]) -> None:
        """Journal a finished piece (its files are all written)."""
        self._pending.append(record)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        self._seq += 1
        body = json.dumps({"run_id": self.run_id, "content_fingerprint": self.content_fp, "pieces": self._pending})
        write_bytes(join(self.output, self.prefix, "journal", f"{self._seq:06d}.json"), body.encode(),
                    self.storage_options)
        self._pending = []
        failpoint("journal")


def _file_paths(record: dict[str, Any]) -> list[str]:
    return [f["path"] for f in record["files"]] + [f["path"] for f in record["error_files"]]


def adoptable(output: str, content_fingerprint: str, wanted: set[str], own_run: str,
              storage_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pieces that crashed runs finished (journalled) with the same content fingerprint, by piece id.

    Only ``wanted`` pieces (this run's to-do list) are taken, and only when each of their files is still
    there: in the crashed run's staging prefix, or at its final name (moved by a commit that died).
    """
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    runs = sorted({p.split("/", 1)[0] for p in list_files(join(output, STAGING), storage_options) if "/" in p})
    staged = set()
    for run in runs:
        if run == own_run:
            continue
        raw = read_bytes(join(output, STAGING, run, "run.json"), storage_options)
        if raw is None or json.loads(raw).get("content_fingerprint") != content_fingerprint:
            continue
        files = list_files(join(output, STAGING, run), storage_options)
        staged |= {f"{STAGING}/{run}/{f}" for f in files}
        for name in sorted(f for f in files if f.startswith("journal/")):
            chunk = read_bytes(join(output, STAGING, run, name), storage_options)
            for rec in json.loads(chunk or b'{"pieces": []}')["pieces"]:
                if rec["id"] in wanted and rec["id"] not in found:
                    found[rec["id"]] = rec
    if not found:
        return found
    final = set(list_files(join(output, "data"), storage_options))
    final = {f"data/{f}" for f in final} | {f"_errors/{f}" for f in list_files(join(output, "_errors"), storage_options)}
    # a piece whose rows do not add up (journalled by a run whose commit then refused it) is embedded again
    return {pid: rec for pid, rec in found.items()
            if all(f"{rec['staged_in']}/{p}" in staged or p in final for p in _file_paths(rec))
            and read_rows(rec) is not None and read_rows(rec) == rec["rows"] + rec["error_rows"]}


def commit_run(
    *, output: str, lease: Lease, base_snapshot: int, records: list[dict[str, Any]], kept: list[dict[str, Any]],
    manifest_fields: dict[str, Any], storage_options: dict[str, Any], keep_snapshots: int, planned: list[str],
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Publish ``kept`` + ``records`` (new pieces, staged) as the next snapshot; returns the manifest.

    ``planned``: the URIs of every shard the run listed; the snapshot must account for each exactly once.
    """
    failpoint("commit-start")
    lease.check()
    current = load_manifest(output, storage_options)
    if (current or {}).get("snapshot", 0) != base_snapshot:
        raise PipelineError(
            f"another run committed snapshot {current['snapshot'] if current else 0} to {output!r} while this run "
            f"(started from snapshot {base_snapshot}) was working; nothing was published. Run again: the "
            "finished pieces of this run are adopted, not embedded again."
        )
    check_accounting(output, records, kept, planned, storage_options)
    moves = [(join(output, r["staged_in"], p), join(output, p)) for r in records if r.get("staged_in")
             for p in _file_paths(r)]
    failpoint("commit-before-move")
    if moves:
        move(*moves[0], storage_options)
        failpoint("commit-mid-move")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda m: move(m[0], m[1], storage_options), moves[1:]))
    pieces = kept + [{k: v for k, v in r.items() if k != "staged_in"} for r in records]
    manifest = build_manifest(previous=current, pieces=pieces, **manifest_fields)
    commit(output, manifest, storage_options, before_publish=lambda: failpoint("commit-before-manifest"))
    failpoint("commit-after-manifest")
    progress(f"committed snapshot {manifest['snapshot']}: {manifest['rows']} rows, {manifest['error_rows']} error rows")
    return manifest


def read_rows(piece: dict[str, Any]) -> int | None:
    """Records the read stage counted in a piece's shards (None for pieces of manifests older than the count)."""
    counts = [s.get("records") for s in piece["shards"]]
    return None if any(c is None for c in counts) else sum(counts)


def accounting_problems(pieces: list[dict[str, Any]], file_rows: dict[str, int],
                        planned: list[str] | None = None) -> list[str]:
    """What is wrong with a snapshot's row accounting (empty when it adds up). Pure.

    ``file_rows``: rows per data/error file path, as the files' own footers say (a file missing from it is
    not checked). For each piece: the read stage's count (``records`` per shard) must equal the rows of its
    data files plus the rows of its error files, and the sink's recorded counts must equal the footers.
    ``planned``: the shard URIs the run listed; each must be in exactly one piece, and no other.
    """
    problems: list[str] = []
    for p in pieces:
        read = read_rows(p)
        files_said = sum(f["rows"] for f in p["files"]), sum(f["rows"] for f in p["error_files"])
        footers = (sum(file_rows.get(f["path"], f["rows"]) for f in p["files"]),
                   sum(file_rows.get(f["path"], f["rows"]) for f in p["error_files"]))
        if footers != files_said:
            problems.append(f"piece {p['id']}: the sink recorded {files_said[0]} rows + {files_said[1]} error rows "
                            f"but its files hold {footers[0]} + {footers[1]}")
        if read is not None and read != footers[0] + footers[1]:
            problems.append(f"piece {p['id']}: read {read} records from {len(p['shards'])} shards, but "
                            f"{footers[0]} rows + {footers[1]} error rows were written "
                            f"({read - footers[0] - footers[1]:+d} missing)")
    if planned is not None:
        seen: dict[str, int] = {}
        for p in pieces:
            for s in p["shards"]:
                seen[s["uri"]] = seen.get(s["uri"], 0) + 1
        missing = sorted(set(planned) - set(seen))
        extra = sorted(set(seen) - set(planned))
        twice = sorted(u for u, n in seen.items() if n > 1)
        for what, uris in (("listed but in no piece", missing), ("in a piece but not listed", extra),
                           ("in more than one piece", twice)):
            if uris:
                problems.append(f"{len(uris)} shards {what}: {', '.join(uris[:5])}{' ...' if len(uris) > 5 else ''}")
    return problems


def footer_rows(output: str, records: list[dict[str, Any]], storage_options: dict[str, Any]) -> dict[str, int]:
    """Rows per data/error file of the pieces, from each file's footer, read in parallel: a staged piece's in
    its staging prefix (or at its final name when a crashed commit already moved it), a published one's at its
    final name."""

    def rows(rec: dict[str, Any], path: str) -> tuple[str, int]:
        if rec.get("staged_in"):
            try:
                return path, parquet_rows(join(output, rec["staged_in"], path), storage_options)
            except FileNotFoundError:
                pass
        return path, parquet_rows(join(output, path), storage_options)

    jobs = [(r, p) for r in records for p in _file_paths(r)]
    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(lambda j: rows(*j), jobs))


def check_accounting(output: str, records: list[dict[str, Any]], kept: list[dict[str, Any]], planned: list[str],
                     storage_options: dict[str, Any]) -> None:
    """Refuse the commit unless every row read is published or recorded as an error row (see
    :func:`accounting_problems`). The new pieces' files are counted from their footers; kept pieces were
    counted by the commit that published them."""
    problems = [f"piece {r['id']}: no read count for shard {s['uri']}" for r in records for s in r["shards"]
                if s.get("records") is None]
    problems += accounting_problems(kept + records, footer_rows(output, records, storage_options), planned)
    if problems:
        # this run's staged pieces are not to be adopted by a rerun: drop its journal (best effort; the
        # adopters' own count check stands behind it)
        for prefix in {r["staged_in"] for r in records if r.get("staged_in")}:
            try:
                journal = join(output, prefix, "journal")
                delete([join(journal, f) for f in list_files(journal, storage_options)], storage_options)
            except StorageError:
                pass
        raise CommitRefused(
            "the commit refused to publish: rows read do not equal rows published + error rows, so rows would be "
            f"lost or duplicated. {'; '.join(problems[:10])}{' ...' if len(problems) > 10 else ''}. Nothing was "
            f"published; the previous snapshot of {output!r} stays current. This is a featx bug: please report it "
            "with the run report (_runs/), then rerun."
        )


def referenced_files(output: str, manifest: dict[str, Any] | None, keep_snapshots: int,
                     storage_options: dict[str, Any]) -> set[str]:
    """Files that the manifest or one of the ``keep_snapshots`` newest snapshots list."""
    refs: set[str] = set()
    if manifest is None:
        return refs
    for n in range(manifest["snapshot"], max(0, manifest["snapshot"] - keep_snapshots), -1):
        snap = manifest if n == manifest["snapshot"] else load_snapshot(output, n, storage_options)
        if snap is not None:
            refs |= {f["path"] for f in snap["files"]} | {f["path"] for f in snap["error_files"]}
    return refs


def clean_up(output: str, manifest: dict[str, Any] | None, keep_snapshots: int,
             storage_options: dict[str, Any]) -> dict[str, int]:
    """Delete staging prefixes and unreferenced data/error files (those of no kept snapshot and not in the Delta
    log's latest version). Call only while holding the lease."""
    staged = [join(output, STAGING, p) for p in list_files(join(output, STAGING), storage_options)]
    refs = referenced_files(output, manifest, keep_snapshots, storage_options)
    try:  # a Delta log behind the manifest still shows the previous snapshot's files: they stay
        refs |= current_files(output, storage_options) or set()
    except StorageError:  # the Delta log cannot be read: delete no data file it might list
        delete(staged, storage_options)
        return {"staging_files": len(staged), "unreferenced_files": 0}
    garbage = [join(output, "data", p) for p in list_files(join(output, "data"), storage_options)
               if f"data/{p}" not in refs]
    garbage += [join(output, "_errors", p) for p in list_files(join(output, "_errors"), storage_options)
                if f"_errors/{p}" not in refs]
    delete(staged + garbage, storage_options)
    return {"staging_files": len(staged), "unreferenced_files": len(garbage)}

