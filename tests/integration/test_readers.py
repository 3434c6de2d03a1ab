"""Readers under a stream of commits: every read is exactly one committed snapshot.

While refreshes commit snapshot after snapshot (each adds a shard, removes one and changes one), a reader
process (tests/integration/reader_loop.py) reads the table over and over, in turn with ``featx.open``, DuckDB
through featx and pyarrow over the manifest's files. Every read's key set must be one committed snapshot's:
same rows, no key twice. On local disk, and on the S3 server through the fault-injecting front (faults on the
readers' and the writer's requests alike; a refresh the faults fail publishes nothing and is run again).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from operators.errors import StorageError
from pipelines.config import build_config
from pipelines.embed.job import run_embed
from pipelines.read.table import read_table
from tests.flaky_s3 import FaultPlan
from tests.integration.reader_loop import digest
from tests.isolation import child_env, kill_group, popen

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

REFRESHES = 2


def _shard(folder: Path, name: str, lines: int, tag: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps({"id": f"r{i}", "text": f"{name} line {i} {tag}"}) + "\n"
                                       for i in range(lines)))


def _change(folder: Path, i: int) -> None:
    """Refresh i: one shard added, the oldest removed, one changed (a line more)."""
    _shard(folder, f"s{i + 4:02d}.jsonl", 3)
    (folder / f"s{i:02d}.jsonl").unlink()
    _shard(folder, f"s{i + 2:02d}.jsonl", 4, tag=f"v{i}")


def _snapshot(output: str, so: dict[str, Any]) -> tuple[int, str]:
    keys = read_table(output, so, columns=["key"])["key"].to_pylist()
    return len(keys), digest(keys)


@pytest.mark.parametrize("where", ["local", "s3-flaky"])
def test_every_read_is_one_committed_snapshot(where: str, tmp_path: Path, tiny_bert: str, s3_fs: Any,
                                              front: Any) -> None:
    local_in = tmp_path / "in"
    for s in range(4):
        _shard(local_in, f"s{s:02d}.jsonl", 3)
    if where == "local":
        inp, out, so = str(local_in), str(tmp_path / "out"), {}
    else:
        bucket = f"featx-readers-{tmp_path.name[-20:].lower().replace('_', '-')}"
        s3_fs.mkdir(bucket)
        inp, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
        so = {"endpoint_url": front.endpoint}
    cfg = {"input": inp, "format": "jsonl", "output": out, "model": f"hf:{tiny_bert}", "key_column": "id",
           "piece_max_shards": 2, "journal_interval_s": 0, "num_cpus": 0.5, "preprocess_num_cpus": 0.5,
           "storage_options": so}

    def sync_input() -> None:
        if where != "local":
            s3_fs.rm(f"{inp[5:]}", recursive=True) if s3_fs.exists(inp[5:]) else None
            s3_fs.put(str(local_in) + "/", f"{inp[5:]}/", recursive=True)
            s3_fs.invalidate_cache()

    def refresh(command: str) -> None:
        for _ in range(4):  # a run the faults fail publishes nothing; the next one carries on
            try:
                run_embed(build_config(None, cfg), progress=lambda m: None, command=command)
                break
            except StorageError:
                continue
        else:
            pytest.fail(f"{command} failed four times in a row under 5% faults")
        committed.add(_snapshot(out, {}))  # read straight from the store, not through the front

    committed: set[tuple[int, str]] = set()
    sync_input()
    refresh("embed")
    if where != "local":  # faults from now on, for the writer and the reader alike
        front.set_plan(FaultPlan(rate=0.05, delay_s=0.2, seed=7))
    results, stop = tmp_path / "reads.jsonl", tmp_path / "stop"
    reader = popen([sys.executable, "-m", "tests.integration.reader_loop", out, str(results), str(stop), json.dumps(so)],
                   child_env(), cwd=str(Path(__file__).resolve().parents[2]))
    try:
        time.sleep(1)  # the reader is reading before the first refresh commits
        for i in range(REFRESHES):
            _change(local_in, i)
            sync_input()
            refresh("refresh")
        time.sleep(1)
    finally:
        stop.write_text("")
        try:
            reader.wait(timeout=60)
        finally:
            kill_group(reader)
    injected = front.faults()
    front.clear()
    reads = [json.loads(line) for line in results.read_text().splitlines()]
    good = [r for r in reads if "error" not in r]
    anomalies = [r for r in good if (r["rows"], r["digest"]) not in committed or r["distinct"] != r["rows"]]
    errors = [r for r in reads if "error" in r]
    print(f"{where}: {len(reads)} reads ({len(good)} complete, {len(errors)} failed), {len(committed)} snapshots "
          f"committed, {injected} storage faults injected, anomalies {len(anomalies)}")
    assert len(committed) == REFRESHES + 1
    assert not anomalies, anomalies[:5]  # every read is exactly one committed snapshot
    assert {r["path"] for r in good} == {"featx", "duckdb", "pyarrow"} and len(good) >= 20
    assert len({r["digest"] for r in good}) >= 2  # the reads saw the snapshots change under them
    if where == "local":
        assert not errors, errors[:3]
    else:  # a read may fail under faults (an error, never a wrong answer); most get through
        assert injected > 0
        assert len(errors) <= len(reads) // 4, errors[:3]
