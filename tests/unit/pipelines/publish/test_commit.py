"""Planning a refresh against the published manifest; adoption and clean-up of staged files."""
from __future__ import annotations

import json
from pathlib import Path

from operators.io.storage import Shard, list_files, write_bytes
from pipelines.embed.plan import plan_pieces, plan_work
from pipelines.publish.commit import Staging, accounting_problems, adoptable, clean_up


def _shards(n: int, changed: dict[int, str] | None = None) -> list[Shard]:
    changed = changed or {}
    return [Shard(uri=f"s3://b/in/{i:03d}.jsonl", rel=f"{i:03d}.jsonl", size=100, fingerprint=changed.get(i, "ETag:x"))
            for i in range(n)]


def _published(pieces: list, rows: int = 4) -> dict:
    return {"pieces": [{"id": p.id, "shards": [s.to_dict() for s in p.shards],
                        "files": [{"path": f"data/part-{p.id}.parquet", "rows": rows * len(p.shards)}],
                        "error_files": []} for p in pieces]}


def test_plan_work_keeps_unchanged_pieces_and_carries_unchanged_shards_of_touched_ones() -> None:
    old = plan_pieces(_shards(40), max_shards=16)
    published = _published(old)
    new_shards = [s for s in _shards(41, changed={5: "ETag:new"}) if s.rel != "010.jsonl"]
    plan = plan_work(plan_pieces(new_shards, max_shards=16), published)
    assert plan.added == ["040.jsonl"] and plan.changed == ["005.jsonl"] and plan.removed == ["010.jsonl"]
    embedded = sorted(s.rel for w in plan.todo for s in w.embed)
    assert embedded == ["005.jsonl", "040.jsonl"]  # only new and changed shards are embedded
    carried = sorted(u for w in plan.todo for c in w.carry for u in c["uris"])
    touched = {s.rel for w in plan.todo for s in w.piece.shards}
    assert carried == sorted(f"s3://b/in/{r}" for r in touched - {"005.jsonl", "040.jsonl"})
    assert all(c["files"] for w in plan.todo for c in w.carry)
    kept = {s["rel"] for p in plan.keep for s in p["shards"]}
    assert kept | touched == {s.rel for s in new_shards} and not kept & touched
    assert plan.unchanged == len(new_shards) - 2


def test_plan_work_without_a_matching_manifest_embeds_everything() -> None:
    plan = plan_work(plan_pieces(_shards(10), max_shards=4), None)
    assert len(plan.added) == 10 and not plan.keep and all(not w.carry for w in plan.todo)


def test_a_moved_input_root_is_embedded_again_not_carried() -> None:
    old = plan_pieces(_shards(8), max_shards=4)
    moved = [Shard(uri=s.uri.replace("/in/", "/moved/"), rel=s.rel, size=s.size, fingerprint=s.fingerprint)
             for s in _shards(8)]
    plan = plan_work(plan_pieces(moved, max_shards=4), _published(old))
    # source_uri is published: rows from the old location are not passed off as the new one's
    assert not plan.keep and sorted(plan.changed) == sorted(s.rel for s in moved)
    assert all(not w.carry for w in plan.todo)


def _record(pid: str, staged_in: str, read: int = 3) -> dict:
    return {"id": pid, "shards": [{"uri": f"s3://b/{pid}.jsonl", "records": read}],
            "files": [{"path": f"data/part-{pid}.parquet", "rows": 3, "bytes": 10}],
            "error_files": [], "rows": 3, "error_rows": 0, "staged_in": staged_in}


def test_adoption_takes_journalled_pieces_whose_files_are_still_there(tmp_path: Path) -> None:
    out = str(tmp_path)
    crashed = Staging(out, "run-old", "fp1", {}, flush_every_s=0).start(0)
    for pid in ("p1", "p2", "p3"):
        write_bytes(f"{out}/{crashed.prefix}/data/part-{pid}.parquet", b"x")
        crashed.add(_record(pid, crashed.prefix))
    # p2 was moved to its final name by a commit that died; p3 lost its file
    (tmp_path / "data").mkdir()
    Path(out, crashed.prefix, "data", "part-p2.parquet").rename(tmp_path / "data" / "part-p2.parquet")
    Path(out, crashed.prefix, "data", "part-p3.parquet").unlink()
    other = Staging(out, "run-other-model", "fp2", {}, flush_every_s=0).start(0)
    write_bytes(f"{out}/{other.prefix}/data/part-p4.parquet", b"x")
    other.add(_record("p4", other.prefix))
    # p5 read 4 records but wrote 3 rows (a run whose commit refused it): embedded again, never adopted
    write_bytes(f"{out}/{crashed.prefix}/data/part-p5.parquet", b"x")
    crashed.add(_record("p5", crashed.prefix, read=4))
    got = adoptable(out, "fp1", {"p1", "p2", "p3", "p4", "p5"}, own_run="run-new", storage_options={})
    assert sorted(got) == ["p1", "p2"]  # p3: file gone; p4: another content fingerprint; p5: rows lost
    assert adoptable(out, "fp1", {"p1"}, own_run="run-old", storage_options={}) == {}


def test_clean_up_removes_staging_and_unreferenced_files_but_keeps_recent_snapshots(tmp_path: Path) -> None:
    out = str(tmp_path)
    for name in ("a", "b", "c", "orphan"):
        write_bytes(f"{out}/data/part-{name}.parquet", b"x")
    write_bytes(f"{out}/_staging/run-x/data/part-z.parquet", b"x")
    snap = {"snapshot": 1, "files": [{"path": "data/part-a.parquet"}], "error_files": []}
    write_bytes(f"{out}/_manifests/00000001.json", json.dumps(snap).encode())
    manifest = {"snapshot": 2, "files": [{"path": "data/part-b.parquet"}, {"path": "data/part-c.parquet"}],
                "error_files": []}
    stats = clean_up(out, manifest, keep_snapshots=2, storage_options={})
    assert sorted(list_files(f"{out}/data")) == ["part-a.parquet", "part-b.parquet", "part-c.parquet"]
    assert list_files(f"{out}/_staging") == [] and stats == {"staging_files": 1, "unreferenced_files": 1}
    clean_up(out, manifest, keep_snapshots=1, storage_options={})
    assert sorted(list_files(f"{out}/data")) == ["part-b.parquet", "part-c.parquet"]


def _piece(pid: str, reads: list[int | None], rows: int, errors: int) -> dict:
    return {"id": pid, "shards": [{"uri": f"s3://b/{pid}-{i}.jsonl", "records": r} for i, r in enumerate(reads)],
            "files": [{"path": f"data/{pid}.parquet", "rows": rows}],
            "error_files": [{"path": f"_errors/{pid}.parquet", "rows": errors}] if errors else []}


def test_accounting_names_each_piece_whose_rows_do_not_add_up() -> None:
    good, short = _piece("good", [3, 2], rows=4, errors=1), _piece("short", [5], rows=4, errors=0)
    planned = ["s3://b/good-0.jsonl", "s3://b/good-1.jsonl", "s3://b/short-0.jsonl"]
    assert accounting_problems([good], {}, planned[:2]) == []
    problems = accounting_problems([good, short], {}, planned)
    assert problems == ["piece short: read 5 records from 1 shards, but 4 rows + 0 error rows were written (+1 missing)"]
    # the footers are the files' own count: a file that holds fewer rows than the sink recorded is caught too
    problems = accounting_problems([good], {"data/good.parquet": 3}, planned[:2])
    assert problems == ["piece good: the sink recorded 4 rows + 1 error rows but its files hold 3 + 1",
                        "piece good: read 5 records from 2 shards, but 3 rows + 1 error rows were written (+1 missing)"]
    # every listed shard in exactly one piece
    problems = accounting_problems([good, good], {}, planned)
    assert problems[-2:] == ["1 shards listed but in no piece: s3://b/short-0.jsonl",
                             "2 shards in more than one piece: s3://b/good-0.jsonl, s3://b/good-1.jsonl"]
    # a piece of an older manifest (no read counts) is not checked against reads, only against its files
    assert accounting_problems([_piece("old", [None], rows=4, errors=0)], {"data/old.parquet": 4}) == []
