"""Content hashes and the partitioned join, against hashlib and a brute-force Python join."""
from __future__ import annotations

import hashlib
import random

import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.read.content import by_block, content_hashes, join, split


def _h(s: str) -> bytes:
    return hashlib.blake2b(s.encode(), digest_size=16).digest()


def test_hashes_are_blake2b_128_of_the_bytes_or_utf8() -> None:
    got = content_hashes(pa.array(["héllo", None, "x"])).to_pylist()
    assert got == [_h("héllo"), None, _h("x")]
    assert content_hashes(pa.array([b"\x00\xff"], pa.binary())).to_pylist() == [hashlib.blake2b(b"\x00\xff", digest_size=16).digest()]


def test_partitioned_join_equals_a_brute_force_join() -> None:
    rng = random.Random(0)
    stored = [f"s{rng.randrange(300)}" for _ in range(500)]  # the snapshot holds duplicates too
    new = [f"s{rng.randrange(600)}" for _ in range(400)]
    old_t = pa.table({C.CONTENT_HASH: content_hashes(pa.array(stored)), "file": pa.array([i % 7 for i in range(500)], pa.int32()),
                      "row": pa.array(range(500), pa.int64())})
    new_t = pa.table({C.CONTENT_HASH: content_hashes(pa.array(new + [None])), C.KEY: [f"k{i}" for i in range(401)],
                      "block": pa.array([i % 3 for i in range(401)], pa.int32()),
                      "piece": [f"p{i % 6}" for i in range(401)]})
    parts = 5
    hits, followers, dups = [], [], 0
    for o, n in zip(split(old_t, parts), split(new_t, parts)):
        h, f, d = join(n, o)
        hits += [by_block(h, 3)]
        followers += f.to_pylist()
        dups += d
    got = {r[C.KEY]: (r["block"], r["file"], r["row"]) for per_block in hits for b, t in enumerate(per_block)
           for r in t.to_pylist() if r["block"] == b}
    first = {}
    for i, s in enumerate(stored):
        first.setdefault(s, i)
    want = {f"k{i}": (i % 3, first[s] % 7, first[s]) for i, s in enumerate(new) if s in first}
    assert got == want  # every hit, in its block, pointing at the first stored row of that content
    misses = [s for s in new if s not in first]
    assert dups == len(misses) - len(set(misses))
    # followers, by brute force: a content's representative is its row with the lowest (block, key); every
    # other row of it in another block follows it (rows in the representative's block are the actor's)
    rows = sorted(((i % 3, f"k{i}", s, f"p{i % 6}") for i, s in enumerate(new) if s not in first))
    rep = {}
    for block, key, s, piece in rows:
        rep.setdefault(s, (block, key, piece))
    want_f = {key: (block, rep[s][1], rep[s][2]) for block, key, s, piece in rows if block != rep[s][0]}
    assert want_f  # the data has followers
    assert {r[C.KEY]: (r["block"], r[C.FOLLOW], r[C.FOLLOW_PIECE]) for r in followers} == want_f
    assert sum(t.num_rows for t in split(new_t, parts)) == 400  # a null hash (unreadable record) is never looked up
    assert pc.all(pc.is_valid(pa.concat_tables(split(new_t, parts))[C.CONTENT_HASH])).as_py()
