"""Record-level refresh: a content the published snapshot holds is not embedded again; identical contents in
one block are embedded once. Real local Ray, a tiny real BERT; counts asserted, vectors checked against a
clean full run on the same input (computed by a separate `featx embed` with reuse off)."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import build_config
from pipelines.embed.job import run_embed
from pipelines.publish.manifest import load_manifest
from pipelines.read.table import read_table

pytestmark = pytest.mark.usefixtures("ray_local")


def _line(i: str, text: str) -> str:
    return json.dumps({"id": i, "text": text, "label": text[:3]}) + "\n"


def _shards(folder: Path, shards: int, lines: int, grow: int = 0, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        body = [_line(f"{s}-{r}", f"shard {s} line {r}: the quick brown fox number {r * 7 + s}")
                for r in range(lines + grow)]
        (folder / f"s{s:02d}.jsonl").write_text("".join(body))


def _cfg(inp: Path, out: Path, tiny_bert: str, **extra: Any) -> Any:
    return build_config(None, {"input": str(inp), "format": "jsonl", "output": str(out), "model": f"hf:{tiny_bert}",
                               "key_column": "id", "passthrough": ["label"], "piece_max_shards": 2, **extra})


def _table(out: Path) -> dict[str, tuple[np.ndarray, bytes]]:
    t = read_table(str(out))
    keys = t["key"].to_pylist()
    assert len(keys) == len(set(keys))
    return {k: (np.asarray(v, np.float32), h) for k, v, h in
            zip(keys, t["embedding"].to_pylist(), t["content_hash"].to_pylist())}


def _clean(inp: Path, tmp: Path, tiny_bert: str, **extra: Any) -> dict[str, tuple[np.ndarray, bytes]]:
    out = tmp / "clean"
    run_embed(_cfg(inp, out, tiny_bert, reuse="none", **extra), progress=lambda m: None)
    return _table(out)


def _same_as_clean(got: dict, clean: dict) -> None:
    assert set(got) == set(clean)
    for k in clean:
        np.testing.assert_allclose(got[k][0], clean[k][0], atol=1e-5, err_msg=k)
        assert got[k][1] == clean[k][1]


def test_append_reexport_and_duplicates_embed_only_new_contents(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _shards(inp, 6, 10)
    first = run_embed(_cfg(inp, out, tiny_bert), progress=lambda m: None)
    assert first["rows_embedded"] == 60 and first["rows_reused"] == 0
    stored = _table(out)
    # the hash is BLAKE2b-128 of the text's UTF-8 (computed here with hashlib, not featx)
    row = json.loads((inp / "s00.jsonl").read_text().splitlines()[0])
    assert stored["s00.jsonl#0-0"][1] == hashlib.blake2b(row["text"].encode(), digest_size=16).digest()

    # append: every shard grows by 2 lines -> only those 12 lines reach the model
    _shards(inp, 6, 10, grow=2)
    appended = run_embed(_cfg(inp, out, tiny_bert), progress=lambda m: None, command="refresh")
    assert appended["shards_processed"] == 6 and appended["rows_in"] == 72
    assert (appended["rows_reused"], appended["rows_embedded"], appended["rows_deduped"]) == (60, 12, 0)
    after = _table(out)
    for k, (v, h) in stored.items():  # reused vectors are the stored ones, bit for bit
        assert after[k][1] == h and np.array_equal(after[k][0], v), k

    # re-export: the same rows under new file names, in another order, one line edited per file
    rng = random.Random(0)
    for f in sorted(inp.glob("*.jsonl")):
        lines = f.read_text().splitlines(keepends=True)
        rng.shuffle(lines)
        edited = json.loads(lines[0])
        lines[0] = _line(edited["id"], edited["text"] + " (edited)")
        (inp / f"export-{f.stem}.jsonl").write_text("".join(lines))
        f.unlink()
    reexported = run_embed(_cfg(inp, out, tiny_bert), progress=lambda m: None, command="refresh")
    assert reexported["changes"]["added_count"] == 6 and reexported["changes"]["removed_count"] == 6
    assert (reexported["rows_reused"], reexported["rows_embedded"]) == (66, 6)
    assert reexported["reuse"]["hits"] == 66 and reexported["reuse"]["partitions"] == 1

    # duplicates: a shard holding 10 copies of one sentence and 10 of another, plus one new sentence
    (inp / "dups.jsonl").write_text("".join(_line(f"d{i}", "the same sentence again" if i % 2 else "another one")
                                            for i in range(20)) + _line("d-new", "a brand new sentence"))
    duplicated = run_embed(_cfg(inp, out, tiny_bert), progress=lambda m: None, command="refresh")
    assert (duplicated["rows_embedded"], duplicated["rows_deduped"], duplicated["rows_reused"]) == (3, 18, 0)

    # after the sequence, the table equals a clean full run (reuse off) on the same input
    _same_as_clean(_table(out), _clean(inp, tmp_path, tiny_bert))
    st = load_manifest(str(out))
    assert st["rows"] == 72 + 21


def test_reuse_none_embeds_every_record_and_model_changes_reuse_nothing(tmp_path: Path, tiny_bert: str) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _shards(inp, 2, 5)
    run_embed(_cfg(inp, out, tiny_bert), progress=lambda m: None)
    _shards(inp, 2, 5, grow=1)
    off = run_embed(_cfg(inp, out, tiny_bert, reuse="none"), progress=lambda m: None, command="refresh")
    assert (off["rows_embedded"], off["rows_reused"]) == (12, 0) and off["reuse"] == {}
    other = run_embed(_cfg(inp, out, tiny_bert, pooling="cls"), progress=lambda m: None, command="refresh")
    assert (other["rows_embedded"], other["rows_reused"]) == (12, 0) and other["reembed_reason"]
    # error rows carry their content hash too (null where the record could not be read at all)
    files = [f["path"] for f in load_manifest(str(out))["files"]]
    assert pq.read_schema(out / files[0]).field("content_hash").type.byte_width == 16


def test_copies_in_other_blocks_of_one_run_are_embedded_once(tmp_path: Path, tiny_bert: str) -> None:
    """A first run (nothing to reuse): each distinct content reaches the model once, wherever its copies sit;
    the held-back copies get their representative's vector (or its error) and equal a clean run's rows."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    originals = [f"original sentence number {i} about foxes" for i in range(8)]
    (inp / "a0.jsonl").write_text("".join(_line(f"a0-{i}", t) for i, t in enumerate(originals)) + _line("a0-e", ""))
    for s in range(1, 5):  # later shards (other pieces, other blocks): copies of the first shard, one new line each
        body = [_line(f"a{s}-{i}", originals[(i + s) % 8]) for i in range(4)] + [_line(f"a{s}-n", f"new line {s}")]
        if s == 3:
            body.append(_line("a3-e", ""))  # a copy of a record that fails (empty text): it fails the same way
        (inp / f"a{s}.jsonl").write_text("".join(body))
    got = run_embed(_cfg(inp, out, tiny_bert, piece_max_shards=1, max_error_fraction=0.5), progress=lambda m: None)
    distinct = len(originals) + 4  # and the empty text, an error row twice
    assert got["rows_in"] == 9 + 4 * 5 + 1 and got["error_rows"] == 2
    assert got["reuse"]["held_for_fill"] > 0  # the copies sat in other blocks than their originals
    assert got["rows_embedded"] == distinct and got["rows_deduped"] == 16
    assert got["reuse"]["filled"] == got["reuse"]["held_for_fill"]
    errors = [r for f in load_manifest(str(out))["error_files"] for r in pq.read_table(out / f["path"]).to_pylist()]
    assert sorted(r["key"] for r in errors) == ["a0.jsonl#a0-e", "a3.jsonl#a3-e"]
    copy = next(r for r in errors if r["key"] == "a3.jsonl#a3-e")
    assert "the same content as 'a0.jsonl#a0-e', which failed" in copy["message"]
    _same_as_clean(_table(out), _clean(inp, tmp_path, tiny_bert, max_error_fraction=0.5))
