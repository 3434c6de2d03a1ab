"""Exactly once, whatever dies when: real SIGKILLs of real `featx` processes, real local Ray, local disk and S3.

Each kill test runs `featx embed` in a child process (its own local Ray) that dies by SIGKILL at a named
step of the protocol (``FEATX_FAILPOINTS``, see operators/faults.py) or from outside, then reruns the job
and checks the table holds exactly one row per input record, with the same vectors as a clean run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from operators.faults import once_marker
from operators.io.storage import list_files
from pipelines.config import build_config
from pipelines.demo.sample_data import write_text_shards
from pipelines.embed.job import run_embed
from pipelines.publish.manifest import load_manifest
from pipelines.read.table import read_table
from tests.conftest import upload
from tests.integration.helpers import assert_delta_readers_agree
from tests.isolation import child_env, kill_group, popen, run

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

SHARDS, ROWS = 12, 48  # 4 records per shard; piece_max_shards=1: one piece per shard


def _input(folder: Path) -> set[str]:
    write_text_shards(folder, fmt="jsonl", shards=SHARDS, max_per_topic=8, limit=ROWS)
    keys = set()
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            keys.add(f"{f.name}#{json.loads(line)['id']}")
    return keys


def _cfg(input_uri: str, output: str, tiny_bert: str, **extra: Any) -> dict[str, Any]:
    return {"input": input_uri, "format": "jsonl", "output": output, "model": f"hf:{tiny_bert}", "key_column": "id",
            "passthrough": ["label"], "piece_max_shards": 1, "journal_interval_s": 0, "num_cpus": 1,
            "preprocess_num_cpus": 1, **extra}


def _child_env(failpoints: str | None) -> dict[str, str]:
    return child_env({"FEATX_FAILPOINTS": failpoints} if failpoints else None)  # own RAY_TMPDIR, no RAY_ADDRESS


def _featx(tmp_path: Path, cfg: dict[str, Any], failpoints: str | None = None, command: str = "embed",
           timeout: int = 300) -> subprocess.CompletedProcess:
    """``featx COMMAND`` in a child (its own local Ray); its whole process group is killed when it ends: the agents
    of a SIGKILLed driver's Ray would otherwise outlive it."""
    path = tmp_path / f"job-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run([sys.executable, "-m", "pipelines.cli", command, "--config", str(path)], timeout, _child_env(failpoints))


def _check_exact(output: str, keys: set[str], errors: set[str] = frozenset(), storage_options: dict | None = None) -> Any:
    m = load_manifest(output, storage_options)
    assert m is not None
    table = read_table(output, storage_options)
    got = table["key"].to_pylist()
    assert len(got) == len(set(got)), "a row was published twice"
    assert set(got) == keys - set(errors), "rows lost or foreign rows"
    assert m["rows"] == len(keys) - len(errors) and m["error_rows"] == len(errors)
    return table.sort_by("key")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> dict[str, Any]:
    """One uninterrupted run: the reference every interrupted run must end up equal to."""
    root = tmp_path_factory.mktemp("clean")
    keys = _input(root / "in")
    run_embed(build_config(None, _cfg(str(root / "in"), str(root / "out"), tiny_bert)), progress=lambda m: None)
    return {"keys": keys, "table": read_table(str(root / "out")).sort_by("key")}


def _same_vectors(table: Any, clean: Any) -> None:
    assert table["key"].to_pylist() == clean["key"].to_pylist()
    np.testing.assert_allclose(np.array(table["embedding"].to_pylist()), np.array(clean["embedding"].to_pylist()),
                               atol=1e-5)


def test_driver_killed_during_embedding_resumes_without_redoing_finished_pieces(
        tmp_path: Path, tiny_bert: str, clean_run: dict[str, Any]) -> None:
    keys = _input(tmp_path / "in")
    out = str(tmp_path / "out")
    cfg = _cfg(str(tmp_path / "in"), out, tiny_bert)
    killed = _featx(tmp_path, cfg, failpoints="driver:journal@4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_manifest(out) is None  # nothing published by the dead run
    journal = [f for f in list_files(f"{out}/_staging") if "/journal/" in f]
    assert len(journal) == 4
    report = run_embed(build_config(None, cfg), progress=lambda m: None)
    assert report["pieces_adopted"] == 4 and report["shards_adopted"] == 4
    assert report["shards_processed"] == SHARDS - 4  # the finished pieces were not embedded again
    assert report["lease_taken_over"]  # the dead driver's lease, taken over at once (same host, pid gone)
    _same_vectors(_check_exact(out, keys), clean_run["table"])
    assert list_files(f"{out}/_staging") == []  # the crashed run's garbage is gone


def test_driver_killed_from_outside_mid_run_on_s3(tmp_path: Path, tiny_bert: str, s3_fs: Any, s3_bucket: str,
                                                  clean_run: dict[str, Any]) -> None:
    keys = _input(tmp_path / "in")
    src = upload(s3_fs, tmp_path / "in", s3_bucket, "in")
    out = f"s3://{s3_bucket}/out"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_cfg(src, out, tiny_bert)))
    # the driver holds 20 s once it has journalled its first piece (failpoint driver-pause): the kill from outside
    # lands while the run is certainly running, whatever the machine's load (no race with the run's end)
    proc = popen([sys.executable, "-m", "pipelines.cli", "embed", "--config", str(path)],
                 _child_env("driver-pause:journal:20"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            s3_fs.invalidate_cache()
            if any("/journal/" in f for f in list_files(f"{out}/_staging")):
                proc.send_signal(signal.SIGKILL)  # a real kill, from outside, in the middle of the streaming pass
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, "the run was not killed (it ended or never journalled in 240 s)"
    s3_fs.invalidate_cache()
    report = run_embed(build_config(None, _cfg(src, out, tiny_bert)), progress=lambda m: None)
    assert report["pieces_adopted"] >= 1 and report["shards_processed"] + report["shards_adopted"] == SHARDS
    table = _check_exact(out, keys)
    _same_vectors(table, clean_run["table"])
    s3_fs.invalidate_cache()
    assert not s3_fs.exists(f"{s3_bucket}/out/_staging") or s3_fs.find(f"{s3_bucket}/out/_staging") == []


# commit-before-delta: after the manifest, inside the Delta step (the later of the two kills after the commit
# point; commit-after-manifest, just before the Delta step, leaves the same state)
@pytest.mark.parametrize("point,where", [("commit-mid-move", "s3"), ("commit-before-manifest", "s3"),
                                         ("commit-before-delta", "local"), ("commit-before-delta", "s3")])
def test_driver_killed_during_commit(point: str, where: str, tmp_path: Path, tiny_bert: str, s3_fs: Any,
                                     s3_bucket: str, clean_run: dict[str, Any]) -> None:
    keys = _input(tmp_path / "in")
    out = str(tmp_path / "out") if where == "local" else f"s3://{s3_bucket}/out"
    # a first snapshot, then a refresh that adds two shards is killed while committing
    for extra in ("part-00010.jsonl", "part-00011.jsonl"):
        (tmp_path / extra).write_bytes((tmp_path / "in" / extra).read_bytes())
        (tmp_path / "in" / extra).unlink()
    src = str(tmp_path / "in") if where == "local" else upload(s3_fs, tmp_path / "in", s3_bucket, "in")
    cfg = _cfg(src, out, tiny_bert)
    first = run_embed(build_config(None, cfg), progress=lambda m: None)
    old_keys = {k for k in keys if not k.startswith(("part-00010", "part-00011"))}
    _check_exact(out, old_keys)
    for extra in ("part-00010.jsonl", "part-00011.jsonl"):
        (tmp_path / "in" / extra).write_bytes((tmp_path / extra).read_bytes())
    if where == "s3":
        upload(s3_fs, tmp_path / "in", s3_bucket, "in")
    killed = _featx(tmp_path, cfg, failpoints=f"driver:{point}", command="refresh")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if where == "s3":
        s3_fs.invalidate_cache()
    m = load_manifest(out)
    committed = point in ("commit-after-manifest", "commit-before-delta")
    if committed:
        assert m["snapshot"] == 2  # the commit itself was done: published, garbage left behind
        _check_exact(out, keys)
        # killed between the manifest and the Delta commit: Delta readers still see exactly snapshot 1, never a mix
        assert _delta_keys(out) == (1, old_keys)
    else:
        # readers that follow the manifest still see exactly the first snapshot, though new files exist
        assert m["snapshot"] == first["snapshot"] == 1
        _check_exact(out, old_keys)
        if point == "commit-mid-move":
            assert len(list_files(f"{out}/data")) > len(m["files"])  # moved, unlisted, invisible
        assert _delta_keys(out) == (1, old_keys)
    report = run_embed(build_config(None, cfg), progress=lambda m: None)
    if committed:
        assert report["shards_processed"] == 0 and report["snapshot"] == 2 and report["lease_taken_over"]
        assert len(report["delta"]["written"]) == 1  # the rerun wrote the missing Delta version first
    else:
        assert report["pieces_adopted"] == 2 and report["shards_processed"] == 0 and report["snapshot"] == 2
    _same_vectors(_check_exact(out, keys), clean_run["table"])
    # Delta, featx and the manifest agree row for row (every Delta reader, where the kill was at the Delta step)
    assert _delta_keys(out) == (2, keys)
    if point == "commit-before-delta":
        assert_delta_readers_agree(out, expected_keys=keys)
    if where == "s3":
        s3_fs.invalidate_cache()
    assert list_files(f"{out}/_staging") == []
    published = {f["path"] for f in load_manifest(out)["files"]}
    first_files = {f["path"] for f in json.loads(_read(out, "_manifests/00000001.json"))["files"]}
    assert {f"data/{p}" for p in list_files(f"{out}/data")} == published | first_files  # no garbage data files


def test_driver_killed_mid_refresh_while_reuse_and_copies_are_in_play(tmp_path: Path, tiny_bert: str,
                                                                     clean_run: dict[str, Any]) -> None:
    """A refresh where every shard grows by a line (the old lines take their stored vectors) and two new shards
    hold the same three sentences in two blocks (the second's rows are held for the first's representative).
    SIGKILL after the stream, before the fill pass: every piece but the one with held rows is journalled. The
    rerun adopts them, redoes that one, and the table equals a clean full run, every row exactly once."""
    keys = _input(tmp_path / "in")
    out = str(tmp_path / "out")
    cfg = _cfg(str(tmp_path / "in"), out, tiny_bert)
    full = {f: f.read_text() for f in sorted((tmp_path / "in").glob("*.jsonl"))}
    for f, body in full.items():  # the first snapshot: each shard without its last line
        f.write_text("".join(body.splitlines(keepends=True)[:-1]))
    run_embed(build_config(None, cfg), progress=lambda m: None)
    for f, body in full.items():  # each shard grows by one line: the refresh reuses the other three
        f.write_text(body)
    same = ["a sentence that two shards hold", "and a second one like it", "and a third, the last"]
    for name in ("aa-copies.jsonl", "zz-copies.jsonl"):  # first and last in the listing: other blocks
        (tmp_path / "in" / name).write_text("".join(json.dumps({"id": f"c{i}", "text": t, "label": "copy"}) + "\n"
                                                    for i, t in enumerate(same)))
        keys |= {f"{name}#c{i}" for i in range(len(same))}
    killed = _featx(tmp_path, cfg, failpoints="driver:fill", command="refresh")  # reached only with held rows
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_manifest(out)["snapshot"] == 1
    report = run_embed(build_config(None, cfg), progress=lambda m: None, command="refresh")
    assert report["pieces_adopted"] == SHARDS + 1 and report["shards_processed"] == 1  # zz-copies, redone
    assert report["rows_embedded"] == len(same)  # its representative's piece was adopted, not in the snapshot
    table = _check_exact(out, keys)
    copies = [k for k in table["key"].to_pylist() if "copies" in k]
    base = table.filter(pc.invert(pc.is_in(table["key"], value_set=pa.array(copies))))
    _same_vectors(base, clean_run["table"])  # equal to a clean full run
    vec = dict(zip(table["key"].to_pylist(), np.array(table["embedding"].to_pylist())))
    for i in range(len(same)):  # each copy has its content's vector
        np.testing.assert_allclose(vec[f"zz-copies.jsonl#c{i}"], vec[f"aa-copies.jsonl#c{i}"], atol=1e-5)


def test_records_that_kill_or_hang_their_worker_are_quarantined(tmp_path: Path, tiny_bert: str,
                                                                clean_run: dict[str, Any]) -> None:
    """failpoints crash-key (preprocessing one record kills its worker, every time) and hang-key (preprocessing
    another never returns). The crashing block is isolated; the hanging read task is killed at its
    deadline (task_timeout_s 2 s), then isolated. Each record is quarantined, as WorkerCrashed and
    WorkerHung, the rest of their shards published, and the progress line named the stuck block while it ran."""
    keys = _input(tmp_path / "in")
    out = str(tmp_path / "out")
    # the hanging record in the first piece (a block of its own: its read task's watchdog kills it), the
    # crashing one in a later piece (the blocks between are packed together)
    stuck, poison = sorted(keys)[1], sorted(keys)[30]
    cfg = _cfg(str(tmp_path / "in"), out, tiny_bert, max_error_fraction=0.05, max_task_retries=0,
               max_record_attempts=1, task_timeout_s=2)
    done = _featx(tmp_path, cfg, failpoints=f"crash-key:{poison},hang-key:{stuck}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(Path(out, "_report.json").read_text())
    assert report["quarantined"] == 2 and report["error_rows"] == 2 and report["rows_out"] == len(keys) - 2
    assert report["isolation_hangs"] >= 2  # the hanging record's slices, then the record alone
    table = _check_exact(out, keys, errors={poison, stuck})
    clean = clean_run["table"]
    _same_vectors(table, clean.filter(np.array([k not in (poison, stuck) for k in clean["key"].to_pylist()])))
    import pyarrow.parquet as pq

    errs = {r["key"]: r for f in load_manifest(out)["error_files"] for r in pq.read_table(Path(out) / f["path"]).to_pylist()}
    assert {k: (e["stage"], e["error_type"]) for k, e in errs.items()} == {poison: ("worker", "WorkerCrashed"),
                                                                         stuck: ("worker", "WorkerHung")}
    assert all("failed 1 times alone" in e["message"] for e in errs.values()) and "hung" in errs[stuck]["message"]
    said = done.stdout + done.stderr  # the stuck block was named while the run went on
    assert "slow tail: block of piece" in said and "was stuck: killed after" in said, said[-3000:]
    assert report["slow_blocks"] and report["slow_blocks"][0]["stage"] == "read"


def test_runs_longer_than_the_lease_ttl_keep_it_and_a_run_whose_heartbeat_stops_loses_it(
        tmp_path: Path, tiny_bert: str, clean_run: dict[str, Any]) -> None:
    """Run A (a real ``featx embed``) never renews its 1.5 s lease (failpoint lease-stop) and waits before it
    journals or commits anything. Once A's lease has expired, run B takes it over and, though it runs longer
    than its own 1.5 s TTL, keeps it by its heartbeat and publishes. Then A goes on: it refuses to commit (its
    lease is gone), so the output holds B's snapshot only, every row exactly once."""
    from pipelines.publish.lease import read_lease

    keys = _input(tmp_path / "in")
    out = str(tmp_path / "out")
    cfg = _cfg(str(tmp_path / "in"), out, tiny_bert, lease_ttl_s=1.5)
    go = tmp_path / "go-on"
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    a = popen([sys.executable, "-m", "pipelines.cli", "embed", "--config", str(path)],
              _child_env(f"lease-stop,driver-wait:journal:{go},driver-wait:commit-start:{go}"),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # A's lease appears, then expires unrenewed
            held = read_lease(out)
            if held is not None and held.expires < time.time():
                break
            assert time.monotonic() < deadline and a.poll() is None, "run A never took (or outlived) its lease"
            time.sleep(0.2)
        t0 = time.monotonic()
        b = run_embed(build_config(None, cfg), progress=lambda m: None)
        assert b["lease_taken_over"].startswith(f"run {held.run_id} ")
        assert time.monotonic() - t0 > 1.5 and b["lease_renewals"] >= 2  # longer than its TTL, kept by renewals
        go.write_text("")
        _, err = a.communicate(timeout=300)
    finally:
        kill_group(a)
    assert a.returncode == 1 and "lost its lease" in err.decode(), err.decode()[-2000:]  # a failed run, exit 1
    assert load_manifest(out)["snapshot"] == 1 and load_manifest(out)["run_id"] == b["run_id"]
    _same_vectors(_check_exact(out, keys), clean_run["table"])


def _delta_keys(output: str) -> tuple[int | None, set[str]]:
    """The snapshot the Delta table's latest version shows, and its keys (read by deltalake)."""
    from deltalake import DeltaTable

    from pipelines.publish.delta import location

    uri, dso = location(output, None)
    dt = DeltaTable(uri, storage_options=dso)
    keys = dt.to_pyarrow_dataset().to_table(columns=["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key twice in the Delta table"
    return dt.transaction_version("featx"), set(keys)


def _read(output: str, rel: str) -> bytes:
    from operators.io.storage import read_bytes

    body = read_bytes(f"{output}/{rel}")
    assert body is not None, rel
    return body


def test_embedding_actor_killed_mid_run_is_replaced(tmp_path: Path, tiny_bert: str, clean_run: dict[str, Any]) -> None:
    keys = _input(tmp_path / "in")
    out = str(tmp_path / "out")
    victim = sorted(keys)[20]
    marker = once_marker(victim)
    if os.path.exists(marker):
        os.remove(marker)
    done = _featx(tmp_path, _cfg(str(tmp_path / "in"), out, tiny_bert), failpoints=f"crash-embed-once:{victim}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.exists(marker)  # the actor really died once
    os.remove(marker)
    report = json.loads(Path(out, "_report.json").read_text())
    assert report["quarantined"] == 0 and report["rows_out"] == len(keys)
    _same_vectors(_check_exact(out, keys), clean_run["table"])
