"""Readers: one input shard (file) -> an Arrow table of records, each with a stable key.

Pure functions of (shard, options); Ray only schedules them. A record that
cannot be read becomes an error row (never dropped); a shard that cannot be
read at all becomes one error row naming the shard and its cause.

Keys are stable across runs: the shard's path relative to the input root,
plus the WebDataset sample key or the row number (or the ``key_column``).
"""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from operators import columns as C
from operators.errors import StorageError
from operators.io.storage import read_object
from operators.read.formats import input_format

WDS_TEXT_MEMBERS: tuple[str, ...] = ("cls", "json", "txt")


@dataclass(frozen=True)
class ReadOptions:
    format: str
    text_column: str = "text"
    image_column: str = "image"
    key_column: str | None = None
    passthrough: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Source:
    """One shard to read: its URI, and its size as listed (its bytes must match: see :func:`read_shard`)."""

    uri: str
    size: int | None
    opts: ReadOptions

    def read(self) -> bytes:
        return read_object(self.uri, self.opts.storage_options, self.size)


class _Rows:
    """Accumulates records column-wise; passthrough columns may appear on some rows only."""

    def __init__(self, payload_type: pa.DataType) -> None:
        self.payload_type = payload_type
        self.cols: dict[str, list[Any]] = {C.KEY: [], C.SOURCE: [], C.PAYLOAD: [], C.ERR_STAGE: [], C.ERR_TYPE: [], C.ERR_MSG: []}
        self.extra: dict[str, list[Any]] = {}
        self.n = 0

    def add(self, key: str, source: str, payload: Any, extra: dict[str, Any] | None = None,
            error: tuple[str, str, str] | None = None) -> None:
        self.cols[C.KEY].append(key)
        self.cols[C.SOURCE].append(source)
        self.cols[C.PAYLOAD].append(payload)
        stage, etype, msg = error or (None, None, None)
        self.cols[C.ERR_STAGE].append(stage)
        self.cols[C.ERR_TYPE].append(etype)
        self.cols[C.ERR_MSG].append(msg)
        for k, v in (extra or {}).items():
            self.extra.setdefault(k, [None] * self.n).append(v)
        self.n += 1
        for v in self.extra.values():
            if len(v) < self.n:
                v.append(None)

    def error(self, key: str, source: str, stage: str, exc: BaseException | str, etype: str | None = None) -> None:
        msg = exc if isinstance(exc, str) else f"{exc}"
        self.add(key, source, None, error=(stage, etype or type(exc).__name__, msg[:2000]))

    def table(self) -> pa.Table:
        arrays: dict[str, pa.Array] = {
            C.KEY: pa.array(self.cols[C.KEY], pa.string()),
            C.SOURCE: pa.array(self.cols[C.SOURCE], pa.string()),
            C.PAYLOAD: pa.array(self.cols[C.PAYLOAD], self.payload_type),
            C.ERR_STAGE: pa.array(self.cols[C.ERR_STAGE], pa.string()),
            C.ERR_TYPE: pa.array(self.cols[C.ERR_TYPE], pa.string()),
            C.ERR_MSG: pa.array(self.cols[C.ERR_MSG], pa.string()),
        }
        for k, v in self.extra.items():
            arrays[k] = _to_arrow(v)
        return pa.table(arrays)


def _to_arrow(values: list[Any]) -> pa.Array:
    """Infer a column type; values of mixed types fall back to JSON strings (nothing is lost)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values], pa.string())


def payload_type(fmt: str) -> pa.DataType:
    return pa.binary() if input_format(fmt).is_image else pa.string()


def read_shard(uri: str, rel: str, opts: ReadOptions, size: int | None = None) -> pa.Table:
    """All records of one shard. Never raises for bad data: errors become rows.

    Storage is another matter: the shard's bytes are read whole with bounded retries, and must number
    ``size`` (its listed size) when given; a store that keeps failing, denies access or serves a body of
    another length raises :class:`StorageError`. A storage fault is never turned into fewer records or
    into an error row standing for a whole shard: the run stops and publishes nothing.
    """
    rows = _Rows(payload_type(opts.format))
    reader = _READERS[input_format(opts.format).name]
    try:
        reader(_Source(uri, size, opts), rel, opts, rows)
    except StorageError:
        raise
    except Exception as e:  # the whole (rest of the) shard is unreadable: one row says so
        rows.error(f"{rel}#shard", uri, "read", f"shard {uri} could not be read: {type(e).__name__}: {e}", type(e).__name__)
    return rows.table()


def _read_image_file(src: _Source, rel: str, opts: ReadOptions, rows: _Rows) -> None:
    rows.add(rel, src.uri, src.read())


def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset convention: the sample key is the path up to the first dot of the basename."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _wds_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    current: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _wds_split(m.name)
            if posixpath.basename(key).startswith((".", "_")) and not ext:
                continue
            if current is not None and key != current:
                yield current, members
                members = {}
            current = key
            f = tar.extractfile(m)
            members[ext] = f.read() if f is not None else b""
    if current is not None:
        yield current, members


def _read_webdataset(src: _Source, rel: str, opts: ReadOptions, rows: _Rows) -> None:
    wanted = set(opts.passthrough) or set(WDS_TEXT_MEMBERS)
    uri = src.uri
    with io.BytesIO(src.read()) as stream:
        try:
            for skey, members in _wds_samples(stream):
                key = f"{rel}/{skey}"
                img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
                extra: dict[str, Any] = {}
                for ext in WDS_TEXT_MEMBERS:
                    if ext in members and ext in wanted:
                        raw = members[ext].decode("utf-8", errors="replace").strip()
                        if ext == "cls":
                            extra["cls"] = int(raw) if raw.lstrip("-").isdigit() else None
                            if extra["cls"] is None:
                                extra["cls_text"] = raw
                        else:
                            extra[ext] = raw
                if img_ext is None:
                    rows.add(key, uri, None, extra, ("read", "MissingImage",
                             f"sample {skey!r} in {uri} has no image member (.jpg/.jpeg/.png/.webp); members: {sorted(members)}"))
                else:
                    rows.add(key, uri, members[img_ext], extra)
        except (tarfile.TarError, EOFError, OSError) as e:
            rows.error(f"{rel}#truncated", uri, "read",
                       f"tar shard {uri} is truncated or corrupt after {rows.n} records: {type(e).__name__}: {e}",
                       "TruncatedShard")


def _check_columns(uri: str, names: list[str], needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in names]
    if missing:
        raise KeyError(
            f"{uri} has no column {', '.join(map(repr, missing))} ({what}); its columns are: {', '.join(names)}. "
            "Set text_column / image_column / key_column / passthrough in the config to match."
        )


def _key_for(rel: str, i: int, key_value: Any) -> str:
    return f"{rel}#{i}" if key_value is None else f"{rel}#{key_value}"


def _read_parquet(src: _Source, rel: str, opts: ReadOptions, rows: _Rows) -> None:
    text = opts.format == "parquet"
    col = opts.text_column if text else opts.image_column
    uri = src.uri
    with pa.BufferReader(src.read()) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        needed = [col] + ([opts.key_column] if opts.key_column else []) + list(opts.passthrough)
        _check_columns(uri, names, needed, "text_column" if text else "image_column")
        i = 0
        for batch in pf.iter_batches(batch_size=8192, columns=list(dict.fromkeys(needed))):
            payloads = batch.column(col)
            if not text and pa.types.is_struct(payloads.type):  # Hugging Face Image feature: {bytes, path}
                payloads = payloads.field("bytes")
            keys = batch.column(opts.key_column).to_pylist() if opts.key_column else [None] * batch.num_rows
            extras = {c: batch.column(c).to_pylist() for c in opts.passthrough}
            for j, value in enumerate(payloads.to_pylist()):
                extra = {c: v[j] for c, v in extras.items()}
                rows.add(_key_for(rel, i, keys[j]), uri, value, extra)
                i += 1


def _read_jsonl(src: _Source, rel: str, opts: ReadOptions, rows: _Rows) -> None:
    uri, data = src.uri, src.read()
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"line holds a JSON {type(obj).__name__}, expected an object")
        except (ValueError, UnicodeDecodeError) as e:
            rows.error(f"{rel}#{lineno}", uri, "read", f"line {lineno} of {uri} is not a JSON object: {e}", type(e).__name__)
            continue
        key_value = obj.get(opts.key_column) if opts.key_column else None
        value = obj.get(opts.text_column)
        extra = {c: obj.get(c) for c in opts.passthrough}
        rows.add(_key_for(rel, lineno, key_value), uri, value if isinstance(value, str) or value is None else str(value), extra)


_READERS = {
    "images": _read_image_file,
    "webdataset": _read_webdataset,
    "parquet": _read_parquet,
    "parquet-images": _read_parquet,
    "jsonl": _read_jsonl,
}

