"""Listing shards once with fingerprints, on local folders and a real S3 server; secrets redacted."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from operators.errors import InputError, StorageError
from operators.io.storage import (
    get_fs,
    is_storage_failure,
    list_shards,
    read_object,
    redact,
    retries_done,
    still_present,
    write_bytes,
)
from tests.conftest import upload


def _files(root: Path) -> None:
    for rel in ("a/1.jpg", "a/2.PNG", "b/3.webp", "b/notes.txt", "_errors/x.jpg", ".hidden.jpg"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)


def test_prefix_glob_and_single_file(tmp_path: Path) -> None:
    _files(tmp_path)
    exts = (".jpg", ".jpeg", ".png", ".webp")
    shards = list_shards(str(tmp_path), exts)
    assert [s.rel for s in shards] == ["a/1.jpg", "a/2.PNG", "b/3.webp"]
    assert all(s.size == 10 and s.fingerprint.startswith(("mtime:", "created:")) for s in shards)
    assert [s.rel for s in list_shards(str(tmp_path / "a" / "*.jpg"), exts)] == ["1.jpg"]
    assert [s.rel for s in list_shards(f"file://{tmp_path}/b/3.webp", exts)] == ["3.webp"]
    with pytest.raises(InputError, match="no input files matching"):
        list_shards(str(tmp_path / "b"), (".tar",))


def test_s3_listing_has_etags_and_changes_with_content(tmp_path: Path, s3_fs: Any, s3_bucket: str) -> None:
    _files(tmp_path)
    uri = upload(s3_fs, tmp_path, s3_bucket, "photos")
    shards = list_shards(uri, (".jpg", ".png", ".webp"))
    assert [s.rel for s in shards] == ["a/1.jpg", "a/2.PNG", "b/3.webp"]
    assert all(s.uri.startswith(f"s3://{s3_bucket}/photos/") and s.fingerprint.startswith("ETag:") for s in shards)
    write_bytes(shards[0].uri, b"y" * 10)
    s3_fs.invalidate_cache()
    again = list_shards(uri, (".jpg", ".png", ".webp"))
    assert again[0].fingerprint != shards[0].fingerprint and again[1:] == shards[1:]


def test_missing_driver_says_what_to_install() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install gcsfs"):
            get_fs("gs://bucket/x")
    else:
        fs, path = get_fs("gs://bucket/x")
        assert path == "bucket/x"


def test_redact_hides_secret_values_only() -> None:
    opts = {"key": "AKIA", "secret": "s", "token": "t", "client_kwargs": {"endpoint_url": "http://h:1"},
            "config_kwargs": {"aws_session_token": "z"}, "anon": False, "account_key": "k", "sas_token": "q"}
    red = redact(opts)
    assert red["key"] == red["secret"] == red["token"] == red["account_key"] == red["sas_token"] == "***"
    assert red["client_kwargs"] == {"endpoint_url": "http://h:1"} and red["anon"] is False
    assert red["config_kwargs"]["aws_session_token"] == "***"


def test_exclusive_create_move_and_delete_local_and_s3(tmp_path: Path, s3_fs: Any, s3_bucket: str) -> None:
    from operators.io.storage import create_exclusive, delete, list_files, move, read_bytes

    for root in (str(tmp_path / "o"), f"s3://{s3_bucket}/o"):
        assert create_exclusive(f"{root}/lock", b"1") is True
        assert create_exclusive(f"{root}/lock", b"2") is False  # refused, not overwritten, not retried
        assert read_bytes(f"{root}/lock") == b"1"
        write_bytes(f"{root}/stage/a.bin", b"abc")
        move(f"{root}/stage/a.bin", f"{root}/final/a.bin")
        move(f"{root}/stage/a.bin", f"{root}/final/a.bin")  # done already (a crashed commit): fine
        assert read_bytes(f"{root}/final/a.bin") == b"abc" and read_bytes(f"{root}/stage/a.bin") is None
        with pytest.raises(FileNotFoundError):
            move(f"{root}/stage/missing.bin", f"{root}/final/missing.bin")
        assert list_files(root) == ["final/a.bin", "lock"]
        delete([f"{root}/final/a.bin", f"{root}/lock", f"{root}/never-there"])
        assert list_files(root) == []


def test_content_fingerprint_ignores_mtime(tmp_path: Path) -> None:
    import os

    (tmp_path / "a.jsonl").write_text("same\n")
    first = list_shards(str(tmp_path), (".jsonl",), fingerprint="content")[0]
    os.utime(tmp_path / "a.jsonl", (1, 1))  # a copy without -t: new mtime, same bytes
    again = list_shards(str(tmp_path), (".jsonl",), fingerprint="content")[0]
    assert first.fingerprint == again.fingerprint and first.fingerprint.startswith("blake2b:")
    (tmp_path / "a.jsonl").write_text("different\n")
    assert list_shards(str(tmp_path), (".jsonl",), fingerprint="content")[0].fingerprint != first.fingerprint


def _through(front: Any) -> dict[str, Any]:
    """Storage options that reach the server through the flaky front, with botocore's own retries off."""
    return {"endpoint_url": front.endpoint,
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                              "response_checksum_validation": "when_required"}}


def test_retries_are_bounded_counted_and_a_short_body_is_never_taken(s3_fs: Any, s3_bucket: str, front: Any) -> None:
    from tests.flaky_s3 import FaultPlan, Rule

    s3_fs.pipe(f"{s3_bucket}/a.jsonl", b'{"text": "x"}\n' * 10)
    uri, so = f"s3://{s3_bucket}/a.jsonl", _through(front)
    front.set_plan(FaultPlan(rules=[Rule("read", "a.jsonl", "short", 2)]))
    before = retries_done()
    assert read_object(uri, so, expected_size=140) == b'{"text": "x"}\n' * 10
    assert retries_done() - before == 2 and front.injected[("read", "short")] == 2
    front.set_plan(FaultPlan(rules=[Rule("read", "a.jsonl", "short", 10**6)]))
    with pytest.raises(StorageError, match=r"read 70 bytes of .* but the listing said 140 on every try"):
        read_object(uri, so, expected_size=140)
    assert front.injected[("read", "short")] == 5  # featx's 5 tries, no more


def test_access_denied_fails_at_once_naming_the_bucket_and_operation(s3_fs: Any, s3_bucket: str, front: Any) -> None:
    from tests.flaky_s3 import FaultPlan, Rule

    front.set_plan(FaultPlan(rules=[Rule("write", s3_bucket, "403", 10**6)]))
    with pytest.raises(StorageError, match=rf"writing 's3://{s3_bucket}/x.json': access denied to bucket '{s3_bucket}'"):
        write_bytes(f"s3://{s3_bucket}/x.json", b"{}", _through(front))
    assert front.injected[("write", "403")] == 1


def test_storage_failures_are_told_from_data_errors(s3_fs: Any, s3_bucket: str) -> None:
    from botocore.exceptions import FlexibleChecksumError

    assert is_storage_failure(FlexibleChecksumError(error_msg="checksum mismatch"))
    assert is_storage_failure(ConnectionResetError()) and is_storage_failure(TimeoutError())
    assert not is_storage_failure(ValueError("bad JSON")) and not is_storage_failure(KeyError("column"))
    s3_fs.pipe(f"{s3_bucket}/here.jsonl", b"x")
    uris = [f"s3://{s3_bucket}/here.jsonl", f"s3://{s3_bucket}/gone.jsonl"]
    assert still_present(uris) == uris[:1]
