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

from operators.storage import Shard, short_hash


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
    return short_hash(*[f"{s.rel}|{s.size}|{s.fingerprint}" for s in shards], n=16)


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
