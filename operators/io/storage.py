"""Object storage through fsspec: s3://, gs://, az://, file:// and plain paths.

Endpoints and credentials come from the standard places (``AWS_ENDPOINT_URL``,
``AWS_*`` variables, profiles, instance roles) or from config ``storage_options``.
They are never logged: :func:`redact` hides them in anything printed or saved.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from operators.errors import InputError, StorageError

_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "sas", "signature", "auth")
_PUBLIC_KEYS = {"endpoint_url", "region_name", "anon", "use_ssl", "client_kwargs", "config_kwargs", "profile", "account_name"}

T = TypeVar("T")


def redact(options: Any) -> Any:
    """Replace secret-looking values (keys, secrets, tokens, passwords) by '***'."""
    if isinstance(options, dict):
        out: dict[str, Any] = {}
        for k, v in options.items():
            lk = str(k).lower()
            if lk not in _PUBLIC_KEYS and any(w in lk for w in _SECRET_WORDS):
                out[k] = "***"
            else:
                out[k] = redact(v)
        return out
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for a URI."""
    try:
        return url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        proto = uri.split("://", 1)[0] if "://" in uri else "file"
        hint = {"gs": "pip install gcsfs", "gcs": "pip install gcsfs", "az": "pip install adlfs", "abfs": "pip install adlfs"}
        extra = f"; install its driver: {hint[proto]}" if proto in hint else ""
        raise InputError(f"cannot open storage for {uri!r} ({type(e).__name__}: {e}){extra}") from None


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI that :func:`get_fs` maps back to the same file."""
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    base = uri.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


RETRY_ATTEMPTS = 5  # featx's own tries per storage call (each on top of botocore's / the driver's own retries)
RETRY_BASE_S = 0.25  # backoff: full jitter, uniform in [0, min(cap, base x 2^try)]
RETRY_CAP_S = 8.0
_retries = {"count": 0}
_retries_lock = threading.Lock()


class ShortRead(OSError):
    """An object's body came back with fewer (or more) bytes than its listing said: retried, then a StorageError."""


def retries_done() -> int:
    """Storage retries this process has made so far (callers report the difference over their work)."""
    return _retries["count"]


# libraries whose own exceptions are storage failures (a checksum mismatch on a partial body, a client timeout),
# whatever their base class: never a record's fault
_STORAGE_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs", "google",
                      "azure", "fsspec"}


def is_storage_failure(e: BaseException) -> bool:
    """True for an error of the storage layer (I/O, network, timeouts, the cloud clients' own errors)."""
    if isinstance(e, (OSError, TimeoutError, ConnectionError, StorageError)):
        return True
    return any(c.__module__.split(".")[0] in _STORAGE_LIBRARIES for c in type(e).__mro__)


def _bucket_of(what: str) -> str:
    uri = next((w.strip("'\"") for w in what.split() if "://" in w), "")
    return uri.split("://", 1)[1].split("/", 1)[0] if uri else ""


def retry(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS, base_delay: float = RETRY_BASE_S) -> T:
    """Run a storage call; retry transient errors (OSError, timeouts, 5xx, resets) with capped exponential
    backoff and full jitter, a bounded number of times; counted (:func:`retries_done`).

    Missing objects (FileNotFoundError) pass through for the caller to decide. Access denied fails at once,
    naming the bucket and the operation. Anything still failing after ``attempts`` tries is a
    :class:`StorageError`: never a record's fault, and never read as "no data".
    """
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StorageError):
            raise  # missing objects are the caller's to judge; a StorageError was retried already
        except PermissionError as e:
            bucket = _bucket_of(what)
            raise StorageError(
                f"{what}: access denied{f' to bucket {bucket!r}' if bucket else ''} ({e}). Permanent, not retried: "
                "check the credentials (AWS_* variables, profile, role or storage_options) and the bucket policy "
                "for this operation."
            ) from e
        except Exception as e:
            if not is_storage_failure(e):
                raise
            if i == attempts - 1:
                raise StorageError(
                    f"{what}: storage error after {attempts} tries: {type(e).__name__}: {e}. The store failed or "
                    "throttled repeatedly; nothing was lost. Rerun when it is healthy (finished pieces are adopted)."
                ) from e
            with _retries_lock:
                _retries["count"] += 1
            time.sleep(random.uniform(0, min(RETRY_CAP_S, base_delay * (2**i))))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Shard:
    """One input file. Its fingerprint changes when its content may have changed."""

    uri: str
    rel: str  # path relative to the input root: the stable part of every record key
    size: int
    fingerprint: str  # ETag, generation/md5 or mtime, from one listing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "generation", "content_md5", "LastModified", "last_modified", "mtime", "created"):
        v = info.get(k)
        if v not in (None, ""):
            if isinstance(v, (bytes, bytearray)):
                v = v.hex()
            return f"{k}:{str(v).strip(chr(34))}"
    return f"size:{info.get('size')}"


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def list_shards(
    uri: str, extensions: tuple[str, ...], storage_options: dict[str, Any] | None = None,
    fingerprint: str = "auto",
) -> list[Shard]:
    """List input files once, with size and fingerprint, sorted by URI.

    ``uri`` is a folder/prefix (searched recursively), a glob, or one file.
    Only names ending in one of ``extensions`` are kept (case-insensitive).
    ``fingerprint``: ``auto`` takes the ETag (or generation, or mtime) from the one listing, and hashes the
    content only where the store gives neither; ``content`` always hashes the bytes (for copies whose mtime
    changes while the content does not).
    """
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache()  # fsspec keeps listings per instance: a nightly run in a long process must see today's
    exts = tuple(e.lower() for e in extensions)
    if _has_glob(path):
        root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        root = root if root.endswith("/") else posixpath.dirname(root)
        entries = retry(lambda: fs.glob(path, detail=True), f"listing {uri!r}")
    else:
        if not retry(lambda: fs.exists(path), f"listing {uri!r}"):
            raise InputError(f"input {uri!r} does not exist (check the path/bucket name and your credentials)")
        if retry(lambda: fs.isfile(path), f"listing {uri!r}"):
            info = retry(lambda: fs.info(path), f"listing {uri!r}")
            root = posixpath.dirname(path)
            entries = {path: info}
        else:
            root = path
            entries = retry(lambda: fs.find(path, detail=True), f"listing {uri!r}")
    shards: list[Shard] = []
    root = root.rstrip("/")
    for p, info in sorted(entries.items()):
        if info.get("type", "file") != "file" or not p.lower().endswith(exts):
            continue
        rel = posixpath.relpath(p, root) if root else p
        if any(part.startswith((".", "_")) for part in rel.split("/")):  # hidden, and featx's own _files
            continue
        fp = _fingerprint(info)
        if fingerprint == "content" or fp.startswith("size:"):
            fp = content_hash(full_uri(fs, p), storage_options)
        shards.append(Shard(uri=full_uri(fs, p), rel=rel, size=int(info.get("size") or 0), fingerprint=fp))
    if not shards:
        raise InputError(
            f"no input files matching {', '.join(extensions)} under {uri!r}; "
            "check --input and --format (images: .jpg/.jpeg/.png/.webp; webdataset: .tar; parquet; jsonl)"
        )
    return shards


def still_present(uris: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Those of ``uris`` that exist (one HEAD each, in parallel): a shard missing from a listing is only
    removed when the store confirms it is gone; a listing that came back short must not drop rows."""
    if not uris:
        return []
    from concurrent.futures import ThreadPoolExecutor

    def exists(uri: str) -> bool:
        fs, path = get_fs(uri, storage_options)
        fs.invalidate_cache(path)
        return bool(retry(lambda: fs.exists(path), f"checking {uri!r}"))

    with ThreadPoolExecutor(16) as pool:
        return [u for u, ok in zip(uris, pool.map(exists, uris)) if ok]


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object atomically: object stores PUT whole objects; local files go through rename."""
    fs, path = get_fs(uri, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    retry(lambda: fs.pipe_file(path, data), f"writing {uri!r}")


def short_hash(*parts: str, n: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk's filesystem (protocols "file" / "local")."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def create_exclusive(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Write ``uri`` only if it does not exist yet; False when it already does.

    Atomic on local disks (O_EXCL) and on S3 (conditional PUT, ``If-None-Match: *``). Stores without
    conditional writes fall back to check-then-write; callers re-read to confirm they won.
    """
    fs, path = get_fs(uri, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        retry(lambda: fs.pipe_file(path, data, mode="create"), f"writing {uri!r}")
    except FileExistsError:
        return False
    except TypeError:  # an fsspec driver without the mode argument
        if retry(lambda: fs.exists(path), f"checking {uri!r}"):
            return False
        retry(lambda: fs.pipe_file(path, data), f"writing {uri!r}")
    return True


def read_object(uri: str, storage_options: dict[str, Any] | None = None, expected_size: int | None = None) -> bytes:
    """The whole object. With ``expected_size`` (the listing's size), a body of any other length is a
    storage fault (retried, then :class:`StorageError`): a reader never takes a short body for fewer records."""
    fs, path = get_fs(uri, storage_options)

    def run() -> bytes:
        data = fs.cat_file(path)
        if expected_size is not None and len(data) != expected_size:
            fs.invalidate_cache(path)
            raise ShortRead(f"read {len(data)} bytes of {uri!r} but the listing said {expected_size}")
        return data

    try:
        return retry(run, f"reading {uri!r}")
    except StorageError as e:
        if isinstance(e.__cause__, ShortRead):
            raise StorageError(
                f"{e.__cause__} on every try: the object changed after it was listed, or the store returned a "
                "partial body. Nothing was published; rerun (a changed shard is then listed and read anew)."
            ) from e
        raise


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes | None:
    """The whole object, or None when it does not exist."""
    try:
        return read_object(uri, storage_options)
    except FileNotFoundError:
        return None


def list_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Paths relative to ``uri`` of every file under it (recursively); empty when it does not exist."""
    fs, path = get_fs(uri, storage_options)
    path = path.rstrip("/")
    fs.invalidate_cache()  # the protocol decides from listings: never from a stale cached one
    try:
        found = retry(lambda: fs.find(path), f"listing {uri!r}")
    except FileNotFoundError:
        return []
    return sorted(posixpath.relpath(p, path) for p in found)


def move(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> None:
    """Move one object (rename on local disks; server-side copy + delete on object stores).

    Idempotent: when ``src`` is gone and ``dst`` exists (a move already done by a crashed run), nothing to do.
    """
    fs, spath = get_fs(src, storage_options)
    _, dpath = get_fs(dst, storage_options)
    if is_local(fs):
        try:
            os.makedirs(os.path.dirname(dpath), exist_ok=True)
            os.replace(spath, dpath)
        except FileNotFoundError:
            if not os.path.exists(dpath):
                raise
        return
    try:
        retry(lambda: fs.copy(spath, dpath), f"copying {src!r} to {dst!r}")
    except FileNotFoundError:
        fs.invalidate_cache()
        if not retry(lambda: fs.exists(dpath), f"checking {dst!r}"):
            raise
        return
    delete([src], storage_options)


def delete(uris: list[str], storage_options: dict[str, Any] | None = None) -> int:
    """Delete objects (missing ones are fine); returns how many were asked for."""
    if not uris:
        return 0
    fs, _ = get_fs(uris[0], storage_options)
    paths = [get_fs(u, storage_options)[1] for u in uris]
    if is_local(fs):
        for p in paths:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        return len(paths)
    for i in range(0, len(paths), 1000):
        chunk = paths[i:i + 1000]
        try:
            retry(lambda c=chunk: fs.rm(c), f"deleting {len(chunk)} objects under {uris[0]!r}")
        except FileNotFoundError:
            pass
    return len(paths)


def content_hash(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """blake2b of an object's bytes, streamed: the fingerprint for stores without ETag or mtime."""
    fs, path = get_fs(uri, storage_options)

    def run() -> str:
        h = hashlib.blake2b(digest_size=16)
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()

    return "blake2b:" + retry(run, f"hashing {uri!r}")
