"""Collecting the parts the streaming pass writes, and journalling each piece once all its parts are in."""
from __future__ import annotations

import json
from typing import Any

from pipelines.embed.plan import Piece, PieceWork
from pipelines.publish.commit import Staging, read_rows


def piece_record(piece: Piece, parts: list[dict[str, Any]], carried: set[int] = frozenset(),
                 records: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest entry of a finished piece: its shards (with ``records``: the records read from each, by
    URI) and every part file (``carried``: part indexes)."""
    records = records or {}
    shards = [{**s.to_dict(), "records": records.get(s.uri)} for s in piece.shards]
    files = [{"path": r["data_file"], "rows": r["rows"], "bytes": r["bytes"], **({"carried": True} if i in carried else {})}
             for i, r in enumerate(parts) if r.get("data_file")]
    errs = [{"path": r["error_file"], "rows": r["error_rows"], **({"carried": True} if i in carried else {})}
            for i, r in enumerate(parts) if r.get("error_file")]
    dims = [r["dim"] for r in parts if r.get("rows")]
    return {"id": piece.id, "shards": shards, "files": files, "error_files": errs,
            "rows": sum(f["rows"] for f in files), "error_rows": sum(e["rows"] for e in errs),
            "read_rows": read_rows({"shards": shards}), "dim": max(dims) if dims else None}


class Tracker:
    """Collect part results as they stream in; journal a piece once all its parts are written."""

    def __init__(self, todo: list[PieceWork], staging: Staging) -> None:
        self.work = {w.piece.id: w for w in todo}
        self.staging = staging
        self.embed_parts: dict[str, list[dict[str, Any]]] = {}
        self.carry_parts: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}
        # the write stage's live counts (the progress display): rows written, error rows, rows held back for
        # the fill pass, rows carried over
        self.written = {"rows": 0, "errors": 0, "held": 0, "carried": 0}

    def add_embedded(self, r: dict[str, Any]) -> None:
        self.embed_parts.setdefault(r["piece"], []).append(r)
        for key, field in (("rows", "rows"), ("errors", "error_rows"), ("held", "held_rows")):
            self.written[key] += int(r.get(field) or 0)
        self._maybe_done(r["piece"])

    def add_carried(self, r: dict[str, Any]) -> None:
        self.carry_parts[r["piece"]] = r
        self.written["carried"] += int(r.get("rows") or 0) + int(r.get("error_rows") or 0)
        self._maybe_done(r["piece"])

    def embedded_complete(self, pid: str) -> bool:
        parts = self.embed_parts.get(pid, [])
        return bool(parts) and sum(p["rows"] + p["error_rows"] for p in parts) == parts[0]["piece_rows"]

    def awaiting_fill(self) -> list[str]:
        """Pieces whose every row came back from the stream, some of them held back for their representative in
        another block (they are journalled once the fill pass has written those)."""
        out = []
        for pid, parts in self.embed_parts.items():
            held = sum(int(p.get("held_rows") or 0) for p in parts)
            if pid not in self.records and held and \
                    sum(p["rows"] + p["error_rows"] for p in parts) + held == parts[0]["piece_rows"]:
                out.append(pid)
        return out

    def embedded_files(self, pid: str) -> dict[str, list[str]]:
        """The data and error files this run wrote for piece ``pid`` (not its carried part)."""
        if pid in self.records:
            carry = self.carry_parts.get(pid)
            parts = [p for p in self.records[pid]["parts"] if p is not carry]
        else:
            parts = self.embed_parts.get(pid, [])
        return {"data": [p["data_file"] for p in parts if p.get("data_file")],
                "errors": [p["error_file"] for p in parts if p.get("error_file")]}

    def _maybe_done(self, pid: str) -> None:
        w = self.work[pid]
        if pid in self.records or (w.embed and not self.embedded_complete(pid)) or (w.carry and pid not in self.carry_parts):
            return
        self.finish(pid, self.embed_parts.get(pid, []))

    def finish(self, pid: str, embedded: list[dict[str, Any]], read_counts: dict[str, int] | None = None) -> None:
        """Journal piece ``pid`` from its parts. ``read_counts``: records read per embedded shard URI (default:
        as the read stage counted them in the parts); carried shards take the counts their last read recorded."""
        w = self.work[pid]
        carry = [self.carry_parts[pid]] if pid in self.carry_parts else []
        records: dict[str, int] = {}
        if read_counts is None:
            for p in embedded:
                records.update(json.loads(p.get("shard_rows") or "{}"))
        else:
            records.update(read_counts)
        records = {s.uri: records[s.uri] for s in w.embed if s.uri in records}
        copied = json.loads(carry[0].get("shard_rows") or "{}") if carry else {}
        for src in w.carry:
            for uri in src["uris"]:
                # an older manifest has no count: then the rows copied stand for it (no independent check)
                old = src.get("records", {}).get(uri)
                records[uri] = old if old is not None else copied.get(uri, 0)
        rec = piece_record(w.piece, carry + embedded, carried=set(range(len(carry))), records=records)
        rec["staged_in"] = self.staging.prefix
        self.staging.add(rec)
        self.records[pid] = {**rec, "parts": carry + embedded}  # parts: for the report; dropped before commit

