"""Incremental refresh and one writer per output, on a real local Ray, local folders and the S3 server."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from operators.errors import InputError
from operators.io.storage import list_files
from pipelines.config import build_config, config_from_output
from pipelines.demo.sample_data import write_text_shards
from pipelines.embed.job import run_embed
from pipelines.publish.lease import LEASE, OutputBusyError
from pipelines.publish.manifest import load_manifest, load_snapshot
from pipelines.publish.status import output_status
from pipelines.read.table import read_table
from tests.conftest import upload
from tests.integration.helpers import assert_delta_readers_agree

pytestmark = pytest.mark.usefixtures("ray_local")


def _write(folder: Path, name: str, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps({"id": i, "text": f"sentence {i} about refreshing tables",
                                                   "label": i[:1]}) + "\n" for i in ids))


def _keys(output: str, so: dict | None = None) -> set[str]:
    keys = read_table(output, so)["key"].to_pylist()
    assert len(keys) == len(set(keys))
    return set(keys)


def _vectors(output: str) -> dict[str, np.ndarray]:
    t = read_table(output)
    return dict(zip(t["key"].to_pylist(), np.array(t["embedding"].to_pylist())))


def _cfg(inp: str, out: str, tiny_bert: str, **extra: Any) -> Any:
    # piece_max_shards=16: pieces of ~4 shards, so a changed shard shares its piece with unchanged ones
    return build_config(None, {"input": inp, "format": "jsonl", "output": out, "model": f"hf:{tiny_bert}",
                               "key_column": "id", "passthrough": ["label"], "piece_max_shards": 16, **extra})


def test_refresh_embeds_only_new_and_changed_shards(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", str(tmp_path / "out")
    for s in range(20):
        _write(inp, f"s{s:02d}.jsonl", [f"{chr(97 + s % 26)}{s}-{r}" for r in range(3)])
    first = run_embed(_cfg(str(inp), out, tiny_bert), progress=lambda m: None)
    assert first["shards_processed"] == 20 and first["snapshot"] == 1
    before = _vectors(out)
    v1 = assert_delta_readers_agree(out, expected_keys=set(before))  # every Delta reader sees exactly snapshot 1
    pieces_before = len(load_manifest(out)["pieces"])
    assert pieces_before < 20  # small shards are grouped into scan-sized files

    _write(inp, "s20.jsonl", ["new-1", "new-2"])  # added
    time.sleep(0.01)
    _write(inp, "s03.jsonl", ["d3-0", "d3-changed"])  # changed: one row kept, one gone, one new
    os.remove(inp / "s07.jsonl")  # removed
    report = run_embed(_cfg(str(inp), out, tiny_bert), progress=lambda m: None, command="refresh")
    ch = report["changes"]
    assert (ch["added"], ch["changed"], ch["removed"]) == (["s20.jsonl"], ["s03.jsonl"], ["s07.jsonl"])
    assert ch["unchanged_count"] == 18
    assert report["shards_embedded"] == ["s03.jsonl", "s20.jsonl"] and report["shards_processed"] == 2
    assert report["rows_out"] == 4 and report["rows_carried"] > 0  # neighbours in rebuilt pieces: copied, not embedded
    expected = set(before) - {"s03.jsonl#d3-1", "s03.jsonl#d3-2"} - {f"s07.jsonl#h7-{r}" for r in range(3)}
    expected |= {"s20.jsonl#new-1", "s20.jsonl#new-2", "s03.jsonl#d3-changed"}
    assert _keys(out) == expected and report["snapshot"] == 2
    v2 = assert_delta_readers_agree(out, expected_keys=expected)  # added, changed and removed shards, in Delta too
    assert v2 == v1 + 1 and report["delta"]["in_sync"] and report["delta"]["written"] == [v2]
    after = _vectors(out)
    for k in set(before) & set(after):  # untouched rows keep their exact vectors
        np.testing.assert_array_equal(after[k], before[k])
    # the old snapshot is kept (time travel) and its files are still there
    assert load_snapshot(out, 1)["rows"] == 60 and all((Path(out) / f["path"]).exists()
                                                       for f in load_snapshot(out, 1)["files"])

    # nothing changed: nothing embedded, no new snapshot
    again = run_embed(_cfg(str(inp), out, tiny_bert), progress=lambda m: None, command="refresh")
    assert again["shards_processed"] == 0 and again["snapshot"] == 2 and again["rows_carried"] == 0
    assert again["delta"]["written"] == [] and again["delta"]["version"] == v2

    # a model change (pooling) re-embeds everything into a new snapshot: old vectors are never mixed in
    changed_model = run_embed(_cfg(str(inp), out, tiny_bert, pooling="cls"), progress=lambda m: None, command="refresh")
    assert changed_model["shards_processed"] == 20 and changed_model["reembed_reason"]
    m = load_manifest(out)
    assert m["snapshot"] == 3 and m["model"]["pooling"] == "cls"
    assert not {f["path"] for f in m["files"]} & {f["path"] for f in load_snapshot(out, 2)["files"]}
    assert _keys(out) == expected
    v3 = assert_delta_readers_agree(out, expected_keys=expected)
    # time travel: each kept snapshot's Delta version holds exactly its rows
    assert assert_delta_readers_agree(out, snapshot=1, every_reader=False) == v1
    assert assert_delta_readers_agree(out, snapshot=2, every_reader=False) == v2

    st = output_status(out)
    assert st["published"]["delta"] == {"version": v3, "snapshot": 3, "in_sync": True}
    assert [r["command"] for r in st["runs"]] == ["embed", "refresh", "refresh", "refresh"]
    assert [r["shards_processed"] for r in st["runs"]] == [20, 2, 0, 20]
    assert st["published"]["snapshot"] == 3 and st["running"] is None


def test_old_snapshot_files_are_deleted_beyond_keep_snapshots(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", str(tmp_path / "out")
    for s in range(3):
        _write(inp, f"s{s}.jsonl", [f"x{s}-{r}" for r in range(2)])
    run_embed(_cfg(str(inp), out, tiny_bert, keep_snapshots=1, piece_max_shards=1), progress=lambda m: None)
    first_files = {f["path"] for f in load_manifest(out)["files"]}
    _write(inp, "s1.jsonl", ["x1-changed"])
    run_embed(_cfg(str(inp), out, tiny_bert, keep_snapshots=1, piece_max_shards=1), progress=lambda m: None)
    m = load_manifest(out)
    on_disk = {f"data/{p}" for p in list_files(f"{out}/data")}
    assert on_disk == {f["path"] for f in m["files"]}  # only the current snapshot's files remain
    assert len(first_files - on_disk) == 1


def test_refresh_needs_a_published_table_and_can_use_the_saved_config(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", str(tmp_path / "out")
    _write(inp, "a.jsonl", ["a1", "a2"])
    with pytest.raises(InputError, match="run `featx embed`"):
        run_embed(_cfg(str(inp), out, tiny_bert), progress=lambda m: None, command="refresh")
    run_embed(_cfg(str(inp), out, tiny_bert), progress=lambda m: None)
    _write(inp, "b.jsonl", ["b1"])
    cfg = config_from_output(out)
    assert cfg.model == f"hf:{tiny_bert}" and cfg.input == str(inp)
    report = run_embed(cfg, progress=lambda m: None, command="refresh")
    assert report["shards_embedded"] == ["b.jsonl"] and _keys(out) == {"a.jsonl#a1", "a.jsonl#a2", "b.jsonl#b1"}


def test_refresh_on_s3_with_etags(tmp_path: Path, tiny_bert: str, s3_fs: Any, s3_bucket: str) -> None:
    inp = tmp_path / "in"
    write_text_shards(inp, fmt="jsonl", shards=6, max_per_topic=4, limit=24)
    src = upload(s3_fs, inp, s3_bucket, "in")
    out = f"s3://{s3_bucket}/out"
    cfg = _cfg(src, out, tiny_bert)
    run_embed(cfg, progress=lambda m: None)
    assert all(s["fingerprint"].startswith("ETag:") for p in load_manifest(out)["pieces"] for s in p["shards"])
    # rewrite one object with the same bytes: same ETag, nothing to do; new bytes: that shard only
    s3_fs.pipe_file(f"{s3_bucket}/in/part-00002.jsonl", (inp / "part-00002.jsonl").read_bytes())
    assert run_embed(cfg, progress=lambda m: None)["shards_processed"] == 0
    s3_fs.pipe_file(f"{s3_bucket}/in/part-00002.jsonl", b'{"id": "z", "text": "replaced", "label": "q"}\n')
    s3_fs.rm(f"{s3_bucket}/in/part-00004.jsonl")
    s3_fs.invalidate_cache()
    report = run_embed(cfg, progress=lambda m: None, command="refresh")
    assert report["shards_embedded"] == ["part-00002.jsonl"] and report["changes"]["removed"] == ["part-00004.jsonl"]
    keys = _keys(out)
    assert "part-00002.jsonl#z" in keys and not any(k.startswith(("part-00004", "part-00002.jsonl#t")) for k in keys)
    assert len(keys) == 24 - 4 - 4 + 1
    v2 = assert_delta_readers_agree(out, expected_keys=keys)  # on the S3 server, credentials from the environment
    # a model change on S3: a new schema version; the old snapshot stays readable at its version
    report = run_embed(_cfg(src, out, tiny_bert, pooling="cls"), progress=lambda m: None, command="refresh")
    assert report["snapshot"] == 3 and report["delta"]["in_sync"]
    assert assert_delta_readers_agree(out, expected_keys=keys) > v2
    assert assert_delta_readers_agree(out, snapshot=2, every_reader=False) == v2


def test_a_second_run_on_the_same_output_refuses_while_the_first_runs(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", str(tmp_path / "out")
    for s in range(8):
        _write(inp, f"s{s}.jsonl", [f"c{s}-{r}" for r in range(30)])
    cfg = _cfg(str(inp), out, tiny_bert, piece_max_shards=1)
    result: dict[str, Any] = {}
    first = threading.Thread(target=lambda: result.update(run_embed(cfg, progress=lambda m: None)))
    first.start()
    deadline = time.monotonic() + 60
    while not (Path(out) / LEASE).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.is_alive(), "the first run ended before the second could start"
    with pytest.raises(OutputBusyError, match="being written by run") as e:
        run_embed(cfg, progress=lambda m: None)
    assert socket.gethostname() in str(e.value) and str(os.getpid()) in str(e.value)
    running = output_status(out)["running"]
    assert running is not None and not running["stale"]
    first.join(timeout=300)
    assert result["status"] == "succeeded" and len(_keys(out)) == 240
    assert not (Path(out) / LEASE).exists()  # released at the end


def _fake_lease(out: Path, host: str, pid: int, expires_in: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE).write_text(json.dumps({"run_id": "other-run", "host": host, "pid": pid, "user": "someone",
                                         "acquired": time.time() - 100, "expires": time.time() + expires_in}))


def test_stale_leases_are_taken_over_live_ones_are_not(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _write(inp, "a.jsonl", ["a1"])
    cfg = _cfg(str(inp), str(out), tiny_bert)
    _fake_lease(out, "another-host", 1234, expires_in=600)  # alive elsewhere: refuse
    with pytest.raises(OutputBusyError, match="another-host"):
        run_embed(cfg, progress=lambda m: None)
    _fake_lease(out, "another-host", 1234, expires_in=-1)  # expired: its owner stopped renewing it
    report = run_embed(cfg, progress=lambda m: None)
    assert "other-run" in report["lease_taken_over"]
    dead = 2 ** 22 + 12345  # above pid_max on this machine: no such process
    _fake_lease(out, socket.gethostname(), dead, expires_in=600)  # this host, process gone: stale at once
    _write(inp, "b.jsonl", ["b1"])
    report = run_embed(cfg, progress=lambda m: None)
    assert "other-run" in report["lease_taken_over"] and report["shards_processed"] == 1
