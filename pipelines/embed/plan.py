"""Planning: the listed shards -> pieces, the unit of work and of output files.

A piece is a run of consecutive shards (sorted by path) that becomes one data
file: small shards (single images, small text files) are grouped so that files
are sized for scans; a large shard is a piece of its own. Boundaries are
content-defined (a shard whose path hashes to 0 mod K closes its piece), so a
new or changed shard only changes its own piece: the rest keep their ids and
files, which is what incremental refresh needs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from operators.io.storage import Shard, short_hash
from operators.models.specs import ModelSpec
from operators.read.formats import FORMATS
from pipelines.config import EmbedConfig


@dataclass(frozen=True)
class Piece:
    id: str
    shards: tuple[Shard, ...]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)


def _closes(rel: str, k: int) -> bool:
    h = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "big")
    return h % k == 0


def piece_id(shards: list[Shard] | tuple[Shard, ...]) -> str:
    return short_hash(*[f"{s.uri}|{s.size}|{s.fingerprint}" for s in shards], n=16)


def plan_pieces(shards: list[Shard], max_shards: int = 256, target_bytes: int = 64 << 20) -> list[Piece]:
    """Group sorted shards into pieces of at most ``max_shards`` shards / about ``target_bytes``."""
    k = max(1, max_shards // 4)  # expected piece length; the hard cap is max_shards
    pieces: list[Piece] = []
    cur: list[Shard] = []
    size = 0
    for s in sorted(shards, key=lambda x: x.rel):
        if cur and size + s.size > target_bytes:
            pieces.append(Piece(piece_id(cur), tuple(cur)))
            cur, size = [], 0
        cur.append(s)
        size += s.size
        if len(cur) >= max_shards or size >= target_bytes or _closes(s.rel, k):
            pieces.append(Piece(piece_id(cur), tuple(cur)))
            cur, size = [], 0
    if cur:
        pieces.append(Piece(piece_id(cur), tuple(cur)))
    return pieces


@dataclass(frozen=True)
class PieceWork:
    """A piece this run must (re)build: its shards to embed, and old rows to carry over unchanged."""

    piece: Piece
    embed: tuple[Shard, ...]  # new or changed shards: read and embed them
    carry: tuple[dict, ...]  # per old piece: {"files", "error_files", "uris", "records"}: copy those shards' rows


@dataclass
class WorkPlan:
    keep: list[dict]  # published piece records kept as they are
    todo: list[PieceWork]
    added: list[str]  # shard paths (relative to the input root)
    changed: list[str]
    removed: list[str]
    unchanged: int


def plan_work(pieces: list[Piece], published: dict | None) -> WorkPlan:
    """Compare the planned pieces with the published manifest (already checked to match the content fingerprint).

    A piece published with the same id (same shards, sizes and fingerprints) is kept. Any other piece is
    rebuilt: its new or changed shards are embedded, and the rows of its unchanged shards are carried
    over from the published files, so a changed shard costs only its own rows, whatever the grouping.
    """
    old_pieces = {p["id"]: p for p in (published or {}).get("pieces", [])}
    old_shards = {s["rel"]: (s, p) for p in old_pieces.values() for s in p["shards"]}
    now = {s.rel for p in pieces for s in p.shards}
    keep: list[dict] = []
    todo: list[PieceWork] = []
    added: list[str] = []
    changed: list[str] = []
    unchanged = 0
    for piece in pieces:
        if piece.id in old_pieces:
            keep.append(old_pieces[piece.id])
            unchanged += len(piece.shards)
            continue
        embed: list[Shard] = []
        carry: dict[str, dict] = {}
        for s in piece.shards:
            old = old_shards.get(s.rel)
            if old is None:
                added.append(s.rel)
                embed.append(s)
            elif (old[0]["uri"], old[0]["size"], old[0]["fingerprint"]) != (s.uri, s.size, s.fingerprint):
                changed.append(s.rel)
                embed.append(s)
            else:
                unchanged += 1
                src = carry.setdefault(old[1]["id"], {"files": [f["path"] for f in old[1]["files"]],
                                                      "error_files": [f["path"] for f in old[1]["error_files"]],
                                                      "uris": [], "records": {}})
                src["uris"].append(s.uri)
                src["records"][s.uri] = old[0].get("records")  # the count its read recorded (None: older manifest)
        todo.append(PieceWork(piece, tuple(embed), tuple(carry[k] for k in sorted(carry))))
    removed = sorted(rel for rel in old_shards if rel not in now)
    return WorkPlan(keep=keep, todo=todo, added=added, changed=changed, removed=removed, unchanged=unchanged)


def content_fingerprint(cfg: EmbedConfig, spec: ModelSpec) -> str:
    """Everything that decides a row's output: rows are reused only between runs that agree on it."""
    column_key = FORMATS[cfg.format].payload_column
    column = getattr(cfg, column_key) if column_key else ""
    # decoding in the actors (torchvision resize) gives pixels a few grey levels off Pillow's: other rows
    decode = ["decode=actors"] if cfg.image_decode == "actors" else []
    # "content_hash": the output contract with the content_hash column (tables from before it are embedded again)
    return short_hash(spec.fingerprint(), spec.preprocessing_fingerprint(), cfg.embedding_dtype, cfg.format, column,
                      cfg.key_column or "", ",".join(cfg.passthrough), *decode, "content_hash", n=16)
