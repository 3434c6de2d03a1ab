"""Shared fixtures: a real S3-protocol server on loopback (moto), a real local Ray, tiny real models."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# numpy's and scipy's OpenBLAS threads spin while they wait; beside two pytest workers' Rays on 2 cores they took
# LogisticRegressionCV on 168 rows from 2.8 s to 24 s (tests/integration/test_linear_probe.py). One thread per
# process (set before numpy loads; Ray's workers inherit it; torch's threads are set by featx itself).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest process (each xdist worker) gets its own RAY_TMPDIR before any Ray starts (tests/isolation.py)."""
    from tests.isolation import own_ray_tmpdir

    own_ray_tmpdir()


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.isolation import remove_temp_dirs

    remove_temp_dirs()

S3_KEY, S3_SECRET = "featx-test-key", "featx-test-secret-CANARY"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's real S3-protocol HTTP server on 127.0.0.1; env vars point boto/s3fs at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks and binds at once
    server.start()
    port = int(server.get_host_and_port()[1])
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET, "port": port}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def flaky_front(s3_server: dict[str, Any]) -> Iterator[Any]:
    """A fault-injecting front before the S3 server (tests/flaky_s3.py); no faults until a test sets a plan."""
    from tests.flaky_s3 import FlakyS3

    proxy = FlakyS3(s3_server["port"]).start()
    yield proxy
    proxy.stop()


@pytest.fixture()
def front(flaky_front: Any) -> Iterator[Any]:
    """The flaky front, with its faults cleared before and after the test."""
    flaky_front.clear()
    yield flaky_front
    flaky_front.clear()


@pytest.fixture(scope="session")
def s3_fs(s3_server: dict[str, Any]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_server["endpoint"]})


_bucket_counter = [0]


@pytest.fixture()
def s3_bucket(s3_fs: Any) -> str:
    """A fresh bucket for one test."""
    _bucket_counter[0] += 1
    name = f"featx-test-{os.getpid()}-{_bucket_counter[0]}"
    s3_fs.mkdir(name)
    s3_fs.invalidate_cache()
    return name


def upload(s3_fs: Any, local: str | Path, bucket: str, prefix: str) -> str:
    s3_fs.put(str(local).rstrip("/") + "/", f"{bucket}/{prefix}/", recursive=True)
    s3_fs.invalidate_cache()
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def ray_local(s3_server: dict[str, Any]) -> Iterator[Any]:
    """One real local Ray for the session (started after the S3 env vars are set, so workers inherit them)."""
    import ray

    from tests.isolation import LocalCluster

    cluster = None
    if not ray.is_initialized():
        # one logical GPU: actors asking for num_gpus are scheduled as on a GPU node (CUDA stays unavailable);
        # its own ports and temp dir (tests/isolation.py)
        cluster = LocalCluster(num_cpus=2, num_gpus=1, object_store_memory=2 * 1024**3)
        ray.init(address=cluster.address, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield cluster  # its ports: a test may read Ray's metrics endpoint (None: a Ray this process had already)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


@pytest.fixture(autouse=True)
def _session_ray_stays_connected(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the session's Ray: if the test left this process disconnected from it (a
    ray.shutdown, a lost driver connection), reconnect, so that the next test meets the session's Ray and not
    whatever other Ray runs on the machine, and say which test it was."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import ray

    cluster = request.getfixturevalue("ray_local")
    if cluster is not None and not ray.is_initialized():
        import warnings

        ray.init(address=cluster.address, log_to_driver=False)
        warnings.warn(f"{request.node.nodeid} left this process disconnected from the session's Ray; reconnected")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny real BERT (random init, seed 0) with MiniLM's tokenizer, saved as safetensors in a folder."""
    import torch
    from transformers import BertConfig, BertModel

    from operators.models.packaged import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    src = Path(minilm_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, folder / f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """ResNet-18 weights (random init, seed 0) saved with safetensors: a real model, no download."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("tiny-resnet") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)
