"""Pieces: deterministic, sized, and stable under new shards (incremental refresh relies on it)."""
from __future__ import annotations

from operators.io.storage import Shard
from pipelines.embed.plan import plan_pieces


def _shards(names: list[str], size: int = 1000) -> list[Shard]:
    return [Shard(uri=f"s3://b/{n}", rel=n, size=size, fingerprint=f"etag:{n}") for n in names]


def test_deterministic_and_complete() -> None:
    shards = _shards([f"img/{i:05d}.jpg" for i in range(1000)])
    a, b = plan_pieces(shards, max_shards=64), plan_pieces(list(reversed(shards)), max_shards=64)
    assert [p.id for p in a] == [p.id for p in b]
    assert sorted(s.rel for p in a for s in p.shards) == sorted(s.rel for s in shards)
    assert all(len(p.shards) <= 64 for p in a) and len(a) > 1000 // 64


def test_large_shards_are_pieces_of_their_own() -> None:
    pieces = plan_pieces(_shards([f"t/{i}.parquet" for i in range(5)], size=100 << 20), target_bytes=64 << 20)
    assert [len(p.shards) for p in pieces] == [1] * 5


def test_a_new_shard_changes_only_its_own_piece() -> None:
    names = [f"img/{i:05d}.jpg" for i in range(0, 2000, 2)]
    before = {p.id for p in plan_pieces(_shards(names), max_shards=64)}
    after = {p.id for p in plan_pieces(_shards(sorted(names + ["img/00777.jpg"])), max_shards=64)}
    assert len(before - after) == 1 and len(after - before) == 1


def test_a_changed_fingerprint_changes_the_piece_id() -> None:
    s = _shards(["a.tar", "b.tar"])
    changed = [s[0], Shard(uri=s[1].uri, rel=s[1].rel, size=s[1].size, fingerprint="etag:new")]
    assert {p.id for p in plan_pieces(s)} != {p.id for p in plan_pieces(changed)}


def test_small_pieces_share_blocks_but_every_actor_has_work() -> None:
    from pipelines.embed.stream import TEXT_BLOCK_BYTES, block_groups

    def blocks(sizes: list[int], actors: int, min_bytes: int = 256 << 10) -> list[int]:
        g = block_groups(sizes, actors, min_bytes)
        assert sum(g) == len(sizes) and min(g) >= 1  # every piece in exactly one block, in order
        return g

    assert blocks([64 << 20] * 10, actors=2) == [1] * 10  # scan-sized pieces: one block each
    assert len(blocks([200] * 100, actors=1)) == 2  # a refresh of 100 tiny shards: 2 blocks, not 100
    assert blocks([200] * 100, actors=1)[0] == 1  # ... the first small, for an early first result
    four = blocks([200] * 100, actors=4)
    assert len(four) >= 8 and four[:4] == four[-4:] == [1] * 4  # two per actor at least; small first and last
    assert blocks([1 << 20] * 3, actors=4) == [1, 1, 1]  # never more blocks than pieces
    assert len(blocks([100 << 10] * 40, actors=1)) == 1 + 16  # the first piece, then ~256 KB of input per block
    text = blocks([170 << 10] * 20, actors=1, min_bytes=TEXT_BLOCK_BYTES)  # 20,000 sentences in 20 JSONL files
    assert text[0] == 1 and len(text) == 14 and max(text) - min(text[1:]) <= 1  # then ~256 KB blocks, balanced
    uneven = blocks([10, 10, 10, 1000, 10, 10, 10, 10], actors=1, min_bytes=500)
    assert uneven == [1, 3, 1, 3]  # cut by bytes, not by count: the big piece ends its block


def test_big_pieces_are_read_in_slices_so_every_actor_has_work() -> None:
    from pipelines.embed.stream import piece_slices

    assert piece_slices([10 << 20], actors=1) == [1]  # one actor: nothing to share
    assert piece_slices([10 << 20], actors=2) == [4]  # a single shard: two slices per actor
    assert piece_slices([90, 5, 5], actors=2) == [4, 1, 1]  # one big shard beside tiny ones
    assert piece_slices([1] * 20, actors=2) == [1] * 20  # many even pieces already spread
    assert piece_slices([1000], actors=16) == [32]  # two slices per actor
    assert piece_slices([], actors=2) == []


def test_actor_threads_use_the_local_machine_unless_told() -> None:
    from pipelines.config import EmbedConfig
    from pipelines.runtime import actor_threads

    cfg = EmbedConfig(input="in", format="jsonl", output="out")
    assert actor_threads(cfg, cluster_cpus=2, max_actors=1, local=True) == 2  # a 2-core laptop: both cores
    assert actor_threads(cfg, cluster_cpus=16, max_actors=4, local=True) == 4
    assert actor_threads(cfg, cluster_cpus=64, max_actors=4, local=False) == 1  # a cluster: what the actor declared
    cfg.num_cpus = 3.5
    assert actor_threads(cfg, cluster_cpus=64, max_actors=4, local=False) == 4
    cfg.num_gpus = 1
    assert actor_threads(cfg, cluster_cpus=16, max_actors=1, local=True) == 4  # GPU actors: the declared CPUs
    cfg.torch_threads = 6
    assert actor_threads(cfg, cluster_cpus=2, max_actors=1, local=True) == 6  # the config wins
