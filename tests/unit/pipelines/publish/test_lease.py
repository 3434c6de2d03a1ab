"""The output lease on a local disk and on a real S3 server: exclusive, renewed, released, stale ones taken over."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.publish.lease import LEASE, Lease, OutputBusyError, read_lease


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    s3_bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{s3_bucket}/out"


def test_one_holder_at_a_time(output: str) -> None:
    a = Lease(output, "run-a", ttl_s=60).acquire()
    with pytest.raises(OutputBusyError, match="run run-a") as e:
        Lease(output, "run-b", ttl_s=60).acquire()
    assert "delete" in str(e.value)  # says how to take over if that run is dead
    a.check()
    a.release()
    assert read_lease(output) is None
    with Lease(output, "run-b", ttl_s=60) as b:
        assert read_lease(output).run_id == "run-b"
        b.check()
    assert read_lease(output) is None


def test_renewal_pushes_the_expiry_and_a_lost_lease_blocks_commit(output: str) -> None:
    a = Lease(output, "run-a", ttl_s=60).acquire()
    first = read_lease(output).expires
    time.sleep(0.05)
    a.renew()
    assert read_lease(output).expires > first
    # someone deletes the lease and another run takes it: the first must not commit
    from operators.io.storage import delete, join

    delete([join(output, LEASE)])
    b = Lease(output, "run-b", ttl_s=60).acquire()
    with pytest.raises(OutputBusyError, match="lost its lease"):
        a.check()
    a.release()  # does not remove b's lease
    assert read_lease(output).run_id == "run-b"
    b.release()


def test_expired_lease_is_taken_over(output: str) -> None:
    from operators.io.storage import join, write_bytes

    old = {"run_id": "ghost", "host": "elsewhere", "pid": 1, "user": "x", "acquired": 0.0, "expires": time.time() - 1}
    write_bytes(join(output, LEASE), json.dumps(old).encode())
    lease = Lease(output, "run-c", ttl_s=60).acquire()
    assert lease.taken_over is not None and lease.taken_over.run_id == "ghost"
    lease.release()


def test_torn_lease_file_counts_as_expired(tmp_path: Path) -> Any:
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE).write_text("{not json")
    lease = Lease(str(out), "run-d", ttl_s=60).acquire()
    assert lease.taken_over is not None
    lease.release()
