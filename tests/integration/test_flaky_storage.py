"""Flaky object storage, for real: a fault-injecting HTTP front (tests/flaky_s3.py) before moto's S3 server.

Every run either publishes exactly the clean run's rows (same keys, same vectors) or fails with a storage
error and publishes nothing; never fewer rows. Faults: 503 SlowDown, 500 InternalError, reset connections
and slow answers at 5% and 20% of reads, writes, listings and the commit, plus named operations failed on
purpose (a shard's reads, the manifest's PUT, a listing, access denied, a short body or listing).

featx's runs reach the store through the front (``storage_options.endpoint_url``); the test itself checks
the results on the server directly. botocore's own retries are off in these runs (``max_attempts: 1``), so
every retry is featx's own: bounded, with backoff and jitter, and counted in the run report; so is its
check of responses against checksums, so that featx's own check of every body against the listed size is
what catches a short body.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from operators.errors import StorageError
from pipelines.config import build_config
from pipelines.demo.sample_data import write_text_shards
from pipelines.embed.job import run_embed
from pipelines.publish.manifest import load_manifest
from pipelines.read.inspect import check_files
from pipelines.read.table import read_table
from tests.conftest import upload
from tests.flaky_s3 import RANDOM_KINDS, FaultPlan, FlakyS3, Rule
from tests.isolation import child_env, run

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

SHARDS, ROWS = 6, 36
ALWAYS = 10**6  # a rule that fires on every matching request


def _input(s3_fs: Any, bucket: str, tmp: Path) -> tuple[str, set[str]]:
    folder = tmp / "in"
    write_text_shards(folder, fmt="jsonl", shards=SHARDS, max_per_topic=8, limit=ROWS)
    keys = {f"{f.name}#{json.loads(line)['id']}" for f in sorted(folder.glob("*.jsonl"))
            for line in f.read_text().splitlines()}
    return upload(s3_fs, folder, bucket, "in"), keys


def _cfg(front: FlakyS3, inp: str, out: str, tiny_bert: str) -> dict[str, Any]:
    return {"input": inp, "format": "jsonl", "output": out, "model": f"hf:{tiny_bert}", "key_column": "id",
            "passthrough": ["label"], "piece_max_shards": 2, "journal_interval_s": 0, "num_cpus": 0.5,
            "preprocess_num_cpus": 0.5,
            "storage_options": {"endpoint_url": front.endpoint,
                                # botocore's own retries and response checksums off: featx's retries and its
                                # check of every body against the listed size are what is tested
                                "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                                                  "response_checksum_validation": "when_required"}}}


def _run(cfg: dict[str, Any], command: str = "embed") -> dict[str, Any]:
    return run_embed(build_config(None, cfg), progress=lambda m: None, command=command)


def _table(out: str) -> Any:
    return read_table(out).sort_by("key")  # straight from the server, not through the front


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, s3_fs: Any, flaky_front: FlakyS3, tiny_bert: str) -> dict[str, Any]:
    """A run with no faults: the rows every faulty run must publish, or publish nothing."""
    bucket = f"featx-flaky-clean-{os.getpid()}"
    s3_fs.mkdir(bucket)
    inp, keys = _input(s3_fs, bucket, tmp_path_factory.mktemp("flaky-clean"))
    flaky_front.clear()
    report = _run(_cfg(flaky_front, inp, f"s3://{bucket}/out", tiny_bert))
    table = _table(f"s3://{bucket}/out")
    assert report["published_rows"] == len(keys) == table.num_rows
    return {"input": inp, "keys": keys, "table": table}


def _assert_same(table: Any, clean_table: Any) -> None:
    assert table["key"].to_pylist() == clean_table["key"].to_pylist()
    np.testing.assert_allclose(np.array(table["embedding"].to_pylist()),
                               np.array(clean_table["embedding"].to_pylist()), atol=1e-5)


def test_a_shard_that_keeps_failing_stops_the_run_as_a_storage_error(
        s3_bucket: str, front: FlakyS3, tiny_bert: str, clean: dict[str, Any]) -> None:
    """The reproduction of the issue: a shard whose reads keep failing used to become one error row standing
    for its whole shard (or, with a short body, zero records) and the run reported success with fewer rows."""
    out = f"s3://{s3_bucket}/out"
    cfg = _cfg(front, clean["input"], out, tiny_bert)
    front.set_plan(FaultPlan(rules=[Rule("read", "in/part-00003", "500", ALWAYS)]))
    with pytest.raises(StorageError, match=r"part-00003.*storage error after 5 tries"):
        _run(cfg)
    assert load_manifest(out) is None, "a run that failed to read a shard published something"

    # a body shorter than the listing said (the store served a partial or different object): never fewer records
    front.set_plan(FaultPlan(rules=[Rule("read", "in/part-00001", "short", ALWAYS)]))
    with pytest.raises(StorageError, match=r"part-00001.*listing said"):
        _run(cfg)
    assert load_manifest(out) is None

    # the same faults, a few times only: retried, and the run publishes exactly the clean rows
    front.set_plan(FaultPlan(rules=[Rule("read", "in/part-00003", "500", 2), Rule("read", "in/part-00001", "short", 2),
                                    Rule("head", ".jsonl", "short", ALWAYS)]))
    report = _run(cfg)
    _assert_same(_table(out), clean["table"])
    assert report["storage_retries"] >= 2  # the short bodies: only featx sees them (s3fs retries some 5xx itself)
    m = load_manifest(out)
    assert all(p["read_rows"] == p["rows"] + p["error_rows"] for p in m["pieces"])
    assert sum(s["records"] for p in m["pieces"] for s in p["shards"]) == ROWS


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_random_faults_publish_exactly_the_clean_rows_or_nothing(
        rate: float, s3_bucket: str, front: FlakyS3, tiny_bert: str, clean: dict[str, Any]) -> None:
    out = f"s3://{s3_bucket}/out"
    cfg = _cfg(front, clean["input"], out, tiny_bert)
    # every kind of fault, on every operation; and the commit's own PUTs (snapshot, manifest) fail twice each
    plan = FaultPlan(rate=rate, kinds=RANDOM_KINDS, seed=int(rate * 100), delay_s=0.3,
                     rules=[Rule("write", "out/_manifests/", "503", 2), Rule("write", "out/_manifest.json", "drop", 2),
                            # a short body: the one fault only featx itself can see and retry (s3fs retries most)
                            Rule("read", "in/part-00002", "short", 1)])
    front.set_plan(plan)
    outcomes = []
    for attempt in range(3):  # a run that fails publishes nothing; the rerun (faults still on) carries on
        try:
            report = _run(cfg)
        except StorageError as e:
            outcomes.append(f"failed: {e}"[:200])
            assert load_manifest(out) is None, "a failed run published"
            continue
        outcomes.append("published")
        break
    assert outcomes[-1] == "published", outcomes
    injected_ops = {op for op, _ in front.injected}
    injected_kinds = {kind for _, kind in front.injected}
    assert {"read", "write", "list"} <= injected_ops, dict(front.injected)
    assert set(RANDOM_KINDS) <= injected_kinds | ({"delay"} if rate < 0.1 else set()), dict(front.injected)
    assert plan.rules[0].fired == 2 and plan.rules[1].fired == 2  # the commit itself met faults
    front.clear()
    _assert_same(_table(out), clean["table"])
    m = load_manifest(out)
    assert m["snapshot"] == 1 and m["rows"] == ROWS and m["error_rows"] == 0
    assert report["storage_retries"] >= 1  # counted where they happen (a read task) and summed in the report
    assert check_files(out, m, {})["ok"]


def _published(tmp: Path, s3_fs: Any, bucket: str, front: FlakyS3, tiny_bert: str) -> tuple[dict, str, set, Any]:
    """A table published from fresh input with no faults: (config, output, input keys, its rows)."""
    inp, keys = _input(s3_fs, bucket, tmp)
    out = f"s3://{bucket}/out"
    cfg = _cfg(front, inp, out, tiny_bert)
    _run(cfg)
    return cfg, out, keys, _table(out)


def test_a_failed_commit_keeps_the_previous_snapshot_and_the_next_run_completes(
        tmp_path: Path, s3_fs: Any, s3_bucket: str, front: FlakyS3, tiny_bert: str) -> None:
    cfg, out, keys, first = _published(tmp_path, s3_fs, s3_bucket, front, tiny_bert)
    # a changed shard, then a refresh whose manifest PUT keeps failing
    s3_fs.pipe(f"{s3_bucket}/in/part-00002.jsonl",
               b'{"id": "new1", "text": "a brand new line", "label": "x"}\n')
    s3_fs.invalidate_cache()
    front.set_plan(FaultPlan(rules=[Rule("write", "out/_manifest.json", "500", ALWAYS)]))
    with pytest.raises(StorageError, match="_manifest.json"):
        _run(cfg, "refresh")
    assert load_manifest(out)["snapshot"] == 1
    _assert_same(_table(out), first)  # readers still see snapshot 1, whole
    front.clear()
    report = _run(cfg, "refresh")
    want = {k for k in keys if not k.startswith("part-00002.jsonl#")} | {"part-00002.jsonl#new1"}
    table = _table(out)
    assert set(table["key"].to_pylist()) == want and table.num_rows == len(want)
    assert report["snapshot"] == 2 and check_files(out, load_manifest(out), {})["ok"]


def test_access_denied_fails_fast_naming_bucket_and_operation(
        s3_bucket: str, front: FlakyS3, tiny_bert: str, clean: dict[str, Any]) -> None:
    out = f"s3://{s3_bucket}/out"
    plan = FaultPlan(rules=[Rule("write", f"{s3_bucket}/out/_staging", "403", ALWAYS)])
    front.set_plan(plan)
    with pytest.raises(StorageError, match=rf"writing .*access denied to bucket '{s3_bucket}'.*not retried"):
        _run(_cfg(front, clean["input"], out, tiny_bert))
    assert plan.rules[0].fired == 1, "a permanent 403 was retried"
    assert load_manifest(out) is None


def test_a_listing_that_fails_or_comes_back_short_removes_nothing(
        tmp_path: Path, s3_fs: Any, s3_bucket: str, front: FlakyS3, tiny_bert: str) -> None:
    cfg, out, keys, first = _published(tmp_path, s3_fs, s3_bucket, front, tiny_bert)
    front.set_plan(FaultPlan(rules=[Rule("list", f"{s3_bucket}/in", "500", ALWAYS)]))
    with pytest.raises(StorageError, match="listing"):
        _run(cfg, "refresh")
    # a listing page that silently leaves entries out (and says it is complete)
    front.set_plan(FaultPlan(rules=[Rule("list", f"{s3_bucket}/in", "short", ALWAYS)]))
    with pytest.raises(StorageError, match="came back short: 3 of the 3"):
        _run(cfg, "refresh")
    assert load_manifest(out)["snapshot"] == 1
    _assert_same(_table(out), first)
    # a shard really removed is removed
    front.clear()
    s3_fs.rm(f"{s3_bucket}/in/part-00005.jsonl")
    s3_fs.invalidate_cache()
    report = _run(cfg, "refresh")
    assert report["changes"]["removed"] == ["part-00005.jsonl"]
    assert set(_table(out)["key"].to_pylist()) == {k for k in keys if not k.startswith("part-00005.jsonl#")}


def test_commit_refuses_when_rows_are_lost_between_read_and_write(tmp_path: Path, tiny_bert: str) -> None:
    """A failpoint drops a row in the sink (a bug no other check sees): the commit refuses, exit code 1, and
    `featx inspect` re-checks the accounting from the files."""
    folder = tmp_path / "in"
    write_text_shards(folder, fmt="jsonl", shards=4, max_per_topic=8, limit=24)
    out = tmp_path / "out"
    cfg = {"input": str(folder), "format": "jsonl", "output": str(out), "model": f"hf:{tiny_bert}",
           "key_column": "id", "piece_max_shards": 2, "num_cpus": 0.5, "preprocess_num_cpus": 0.5}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    featx = str(Path(sys.executable).with_name("featx"))
    env = child_env({"FEATX_FAILPOINTS": "drop-rows:1"})  # own RAY_TMPDIR, no RAY_ADDRESS
    r = run([featx, "embed", "--config", str(path)], 400, env)  # killed with its process group when it ends
    text = " ".join(r.stderr.split())
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert "refused to publish" in text and re.search(r"read \d+ records from \d+ shards, but \d+ rows \+ 0 error rows "
                                                     r"were written \(\+1 missing\)", text), text[-3000:]
    assert not (out / "_manifest.json").exists()

    # the same job without the failpoint publishes; inspect agrees, then catches a data file that lost a row
    report = run_embed(build_config(None, cfg), progress=lambda m: None)
    assert report["published_rows"] + report["published_error_rows"] == 24
    m = load_manifest(str(out))
    good = check_files(str(out), m, {})
    assert good["ok"] and good["rows_read"] == good["rows_in_files"] == 24 and good["pieces_checked"] == len(m["pieces"])
    victim = out / m["files"][0]["path"]
    t = pq.read_table(victim)
    pq.write_table(t.slice(0, t.num_rows - 1), victim)
    bad = check_files(str(out), m, {})
    assert not bad["ok"] and any("+1 missing" in p for p in bad["problems"]), bad
    r = run([featx, "inspect", str(out), "--json"], 300, env)
    assert r.returncode == 1 and json.loads(r.stdout)["accounting"]["ok"] is False, r.stderr[-2000:]

