"""Reading a published table: ``featx.open(OUTPUT)``, and what `featx query` / `featx sql` run on.

Readers follow ``_manifest.json`` (or a kept numbered snapshot, for time travel), never a bare glob: a run
that is staging, or a commit half done, is invisible until its manifest is written, and then all of it is.
Search is exact and streams the snapshot's files in chunks (bounded memory at any size) unless a FAISS
index built for this very snapshot exists (``featx index``); a query given as text or an image is embedded
with the model, weights and preprocessing the table records, and a mismatch is refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C
from operators.errors import InputError
from operators.io.parquet import arrow_filesystem, open_parquet_file
from operators.io.storage import get_fs, is_local, retry
from operators.search.topk import ROW, TopK, query_matrix, row_norms, scores, vectors_from_arrow
from pipelines.publish.manifest import load_manifest, load_snapshot, published_files
from pipelines.read.stored_index import find_index

if TYPE_CHECKING:
    from pipelines.read.encoder import QueryEncoder

CHUNK_ROWS = 8192  # rows decoded and scored at a time: 8,192 x 384 float32 = 12 MiB
CACHE_BLOCK_ROWS = 131072  # cached vectors are scored in blocks this large (fewer, bigger matrix products)


@dataclass
class Hits:
    """One query's nearest rows (best first, a ``score`` column) and how they were found."""

    table: pa.Table
    method: str  # "exact" or "faiss-<kind>"
    note: str  # why an index was or was not used
    snapshot: int
    scanned: int  # rows scored (exact) or in the index
    seconds: float

    def to_pylist(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()

    @property
    def keys(self) -> list[str]:
        return self.table[C.KEY].to_pylist()


def open(output: str, snapshot: int | None = None, storage_options: dict[str, Any] | None = None,  # noqa: A001
         cache_mb: float = 0.0) -> "FeatxTable":
    """The published snapshot of a featx table (or snapshot number ``snapshot``, while its files are kept).

    ``cache_mb``: searches stream the files (memory bounded by one chunk) unless the snapshot's vectors fit
    in this many MiB: then the first search keeps them in memory and later ones score from there.
    """
    table = _open(output, snapshot, dict(storage_options or {}))
    table.cache_mb = cache_mb
    return table


def _open(output: str, snapshot: int | None, so: dict[str, Any]) -> "FeatxTable":
    current = load_manifest(output, so)
    if current is None:
        raise InputError(f"nothing is published at {output!r} (no _manifest.json); run `featx embed` first, "
                         "or check the URI and its storage options")
    if snapshot is None or snapshot == current["snapshot"]:
        return FeatxTable(output, current, so, latest=current["snapshot"])
    manifest = load_snapshot(output, snapshot, so)
    if manifest is None:
        raise InputError(f"{output!r} has no snapshot {snapshot}; the current one is {current['snapshot']} "
                         "(featx inspect lists the kept snapshots)")
    table = FeatxTable(output, manifest, so, latest=current["snapshot"])
    missing = [f for f in table.files[:1] if read_bytes_head(f, so) is None]
    if missing:
        raise InputError(f"snapshot {snapshot} of {output!r} is listed but its data files are gone (only the newest "
                         "keep_snapshots snapshots keep their files, and a Delta VACUUM removes those of older "
                         "versions); read a newer snapshot")
    return table


def read_bytes_head(uri: str, storage_options: dict[str, Any]) -> bytes | None:
    fs, path = get_fs(uri, storage_options)
    try:
        return retry(lambda: fs.cat_file(path, start=0, end=4), f"reading {uri!r}")
    except FileNotFoundError:
        return None


class FeatxTable:
    """A handle on one published snapshot. Cheap to create; reads happen in the methods.

    Its attributes are the public surface that the index lookup and the query encoder read
    (:class:`pipelines.read.snapshot.Snapshot`).
    """

    def __init__(self, output: str, manifest: dict[str, Any], storage_options: dict[str, Any], latest: int) -> None:
        self.output = output
        self.manifest = manifest
        self.storage_options = storage_options
        self.snapshot: int = int(manifest["snapshot"])
        self.latest_snapshot = latest
        self.dim: int = int(manifest["dim"] or 0)
        self.rows: int = int(manifest["rows"])
        self.model: dict[str, Any] = manifest.get("model") or {}
        self.files: list[str] = published_files(manifest, output)
        self._encoder: QueryEncoder | None = None
        self.cache_mb: float = 0.0  # > 0: keep the vectors in memory after the first search if they fit
        self._cache: list[tuple[np.ndarray, pa.Table, np.ndarray]] | None = None
        self.indexes: dict[Any, Any] = {}  # FAISS indexes loaded for this handle (pipelines.read.stored_index)

    @property
    def delta_version(self) -> int | None:
        """The Delta Lake version at ``output`` that shows this snapshot: ``deltalake.DeltaTable(output,
        version=t.delta_version)`` (Spark ``versionAsOf``) reads exactly these rows. None while the Delta log is
        behind (``featx status --repair``) or for tables without one (float16 vectors, stores delta-rs lacks)."""
        from pipelines.publish.delta import version_of

        return version_of(self.output, self.snapshot, self.storage_options)

    def __repr__(self) -> str:
        return (f"FeatxTable({self.output!r}, snapshot={self.snapshot}, rows={self.rows}, dim={self.dim}, "
                f"model={self.model.get('model')!r})")

    # ---- reading -----------------------------------------------------------------------------------

    @cached_property
    def schema(self) -> pa.Schema:
        """The data files' Arrow schema (the first file's footer, read once per handle)."""
        if not self.files:
            return pa.schema([pa.field(C.KEY, pa.string()), pa.field(C.SOURCE, pa.string())])
        return open_parquet_file(self.files[0], self.storage_options).schema_arrow

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def iter_batches(self, columns: list[str] | None = None, batch_rows: int = CHUNK_ROWS,
                     with_row_numbers: bool = False, prefetch: int = 0) -> Iterator[pa.Table]:
        """The snapshot's rows in chunks of at most ``batch_rows``, in manifest file order (bounded memory).

        ``prefetch``: chunks decoded ahead by a background thread while the caller works on the current one.
        """
        chunks = self._chunks(columns, batch_rows, with_row_numbers)
        return _prefetched(chunks, prefetch) if prefetch else chunks

    def _chunks(self, columns: list[str] | None, batch_rows: int, with_row_numbers: bool) -> Iterator[pa.Table]:
        start = 0
        for uri in self.files:
            f = open_parquet_file(uri, self.storage_options)
            for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
                t = pa.Table.from_batches([batch])
                if with_row_numbers:
                    t = t.append_column(ROW, pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))
                start += t.num_rows
                yield t

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        """The whole snapshot as one Arrow table (``columns`` to read fewer)."""
        parts = list(self.iter_batches(columns))
        if not parts:
            names = columns or self.columns
            return self.schema.empty_table().select(names)
        return pa.concat_tables(parts)

    def to_numpy(self) -> np.ndarray:
        """The vectors as float32 [rows, dim], in the order of :meth:`keys`."""
        out = np.empty((self.rows, self.dim), dtype=np.float32)
        at = 0
        for t in self.iter_batches([C.EMBEDDING]):
            out[at:at + t.num_rows] = vectors_from_arrow(t[C.EMBEDDING], self.dim)
            at += t.num_rows
        return out[:at]

    def keys(self) -> list[str]:
        return self.to_arrow([C.KEY])[C.KEY].to_pylist()

    def to_torch(self) -> Any:
        """The vectors as a float32 torch tensor [rows, dim] (shares memory with :meth:`to_numpy`'s array)."""
        import torch

        return torch.from_numpy(self.to_numpy())

    def arrow_dataset(self) -> Any:
        """A lazy pyarrow dataset over exactly the published files (projection pushdown, streaming scans)."""
        import pyarrow.dataset as pads

        paths = [get_fs(f, self.storage_options)[1] for f in self.files]
        return pads.dataset(paths, format="parquet", filesystem=arrow_filesystem(self.output, self.storage_options),
                            schema=self.schema)

    def duckdb(self) -> Any:
        """A DuckDB connection with an ``embeddings`` view whose ``embedding`` column is already ``FLOAT[dim]``.

        Local files are scanned by DuckDB itself; object-store files are streamed to DuckDB as a pyarrow
        dataset through fsspec (DuckDB's httpfs extension is not needed).
        """
        import duckdb

        con = duckdb.connect()
        fs, _ = get_fs(self.output, self.storage_options)
        if not self.files:
            con.register("raw_embeddings", self.schema.empty_table())
        elif is_local(fs):
            paths = [get_fs(f)[1] for f in self.files]
            con.execute(f"CREATE VIEW raw_embeddings AS SELECT * FROM read_parquet({paths!r})")
        else:
            con.register("raw_embeddings", self.arrow_dataset())
        cast = f"REPLACE (embedding::FLOAT[{self.dim}] AS embedding)" if self.dim else ""
        con.execute(f"CREATE VIEW embeddings AS SELECT * {cast} FROM raw_embeddings")
        return con

    # ---- search ------------------------------------------------------------------------------------

    def search(self, query: Any = None, k: int = 10, *, text: str | None = None, image: str | bytes | Path | None = None,
               like: str | None = None, metric: str = "cosine", where: Any = None, chunk_rows: int = CHUNK_ROWS,
               use_index: bool | None = None) -> Hits:
        """The k nearest rows to a vector, a text, an image (path, URI or bytes) or a stored row (``like=KEY``).

        A plain ``str`` query is text; ``bytes`` or a ``Path`` is an image. ``where`` filters on the other
        columns: a SQL condition (``"label = 'cat'"``, evaluated by DuckDB per chunk) or a pyarrow compute
        expression. ``use_index``: None = a FAISS index when one matches this snapshot and metric,
        False = always exact, True = an index or an error.
        """
        if isinstance(query, str) and text is None:
            query, text = None, query
        if isinstance(query, (bytes, Path)) and image is None:
            query, image = None, query
        given = [x is not None for x in (query, text, image, like)]
        if sum(given) != 1:
            raise InputError("give exactly one of: a vector, text=, image= or like=KEY")
        exclude = None
        if like is not None:
            query, exclude = self.vector_of(like), like
        elif text is not None or image is not None:
            query = self.embed_query(text=text, image=image)
        return self.search_many(query, k + (1 if exclude is not None else 0), metric=metric, where=where,
                                chunk_rows=chunk_rows, use_index=use_index, exclude=exclude, k_out=k)[0]

    def search_many(self, queries: Any, k: int = 10, *, metric: str = "cosine", where: Any = None,
                    chunk_rows: int = CHUNK_ROWS, use_index: bool | None = None, exclude: str | None = None,
                    k_out: int | None = None) -> list[Hits]:
        """A batch of query vectors (Q x dim) in one pass over the table: one :class:`Hits` per query."""
        t0 = time.perf_counter()
        q = query_matrix(queries, self.dim, metric)
        index, note = find_index(self, metric, where is not None, use_index)
        if index is not None:
            tables, scanned = index.search(self, q, k)
            method = f"faiss-{index.kind}"
        else:
            tables, scanned = self._exact(q, k, metric, where, chunk_rows), self.rows
            method = "exact"
        out = []
        for t in tables:
            if exclude is not None:
                t = t.filter(pc.not_equal(t[C.KEY], exclude))
            out.append(Hits(t.slice(0, k_out or k), method, note, self.snapshot, scanned, round(time.perf_counter() - t0, 4)))
        return out

    def _scored_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, pa.Table, np.ndarray]]:
        """(vectors, other columns, norms) per chunk: from the in-memory cache when it holds the snapshot."""
        if self._cache is not None:
            yield from self._cache
            return
        budget, held = self.cache_mb * (1 << 20), 0
        blocks: list[Any] | None = [] if budget else None
        group: list[tuple[np.ndarray, pa.Table, np.ndarray]] = []
        for chunk in self.iter_batches(batch_rows=chunk_rows, with_row_numbers=True, prefetch=2):
            if chunk[C.EMBEDDING].null_count:
                chunk = chunk.filter(chunk[C.EMBEDDING].is_valid())
            m = vectors_from_arrow(chunk[C.EMBEDDING], self.dim)
            item = (m, chunk.drop_columns([C.EMBEDDING]), row_norms(m))
            yield item
            if blocks is not None:
                held += m.nbytes + item[1].nbytes
                if held > budget:  # does not fit: keep streaming, drop what was gathered
                    blocks, group = None, []
                    continue
                group.append(item)
                if sum(g[1].num_rows for g in group) >= CACHE_BLOCK_ROWS:
                    blocks.append(_block(group))
                    group = []
        if blocks is not None:
            self._cache = blocks + ([_block(group)] if group else [])

    def _exact(self, q: np.ndarray, k: int, metric: str, where: Any, chunk_rows: int) -> list[pa.Table]:
        top = TopK(len(q), k)
        keep = _row_filter(where, self.schema)
        for m, rest, norms in self._scored_chunks(chunk_rows):
            if keep is not None:
                mask = np.asarray(pc.is_in(rest[ROW], keep(rest)[ROW]))
                m, rest, norms = m[mask], rest.filter(mask), norms[mask]
            if rest.num_rows:
                top.push(scores(m, q, metric, norms), rest)
        return top.results(metric)

    def vector_of(self, key: str) -> np.ndarray:
        """The stored vector of one row (streams the table once; DuckDB-free)."""
        for chunk in self.iter_batches([C.KEY, C.EMBEDDING]):
            hit = chunk.filter(pc.equal(chunk[C.KEY], key))
            if hit.num_rows:
                return vectors_from_arrow(hit[C.EMBEDDING], self.dim)[0]
        raise InputError(f"no row with key {key!r} in snapshot {self.snapshot} of {self.output!r}")

    def use_encoder(self, model: str | None = None, weights: str | None = None) -> None:
        """Embed queries with this model name / weights path (where the saved ones do not resolve on this
        machine); refused unless they fingerprint the same as the table's."""
        from pipelines.read.encoder import QueryEncoder  # the model machinery (torch) only when a query needs it

        self._encoder = QueryEncoder.for_table(self, model=model, weights=weights)

    def embed_query(self, text: str | None = None, image: str | bytes | Path | None = None) -> np.ndarray:
        """Embed a query exactly as the table's rows were: same model, weights, preprocessing."""
        if self._encoder is None:
            self.use_encoder()
        assert self._encoder is not None
        return self._encoder.embed(text=text, image=image)


def _block(group: list[tuple[np.ndarray, pa.Table, np.ndarray]]) -> tuple[np.ndarray, pa.Table, np.ndarray]:
    """Cached chunks merged into one block (copies the vectors out of the Arrow buffers)."""
    return (np.concatenate([g[0] for g in group]), pa.concat_tables([g[1] for g in group]).combine_chunks(),
            np.concatenate([g[2] for g in group]))


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run an iterator ``depth`` items ahead in a thread (Arrow decoding releases the GIL)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer went away

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    threading.Thread(target=work, daemon=True, name="featx-prefetch").start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _row_filter(where: Any, schema: pa.Schema) -> Any:
    """A function chunk -> filtered chunk for a SQL condition or a pyarrow expression; checked once up front."""
    if where is None:
        return None
    if isinstance(where, pc.Expression):
        return lambda chunk: chunk.filter(where)
    if not isinstance(where, str) or not where.strip():
        raise InputError(f"where must be a SQL condition string or a pyarrow expression, got {where!r}")
    import duckdb

    con = duckdb.connect()
    cols = [f for f in schema if f.name != C.EMBEDDING]

    def keep(chunk: pa.Table) -> pa.Table:
        meta = chunk.select([f.name for f in cols] + [ROW])  # noqa: F841 (DuckDB scans the local variable)
        con.register("chunk", meta)
        try:
            rows = con.sql(f"SELECT {ROW} FROM chunk WHERE {where}").to_arrow_table()[ROW]
        except duckdb.Error as e:
            raise InputError(f"the filter {where!r} is not valid SQL over this table's columns "
                             f"({', '.join(f.name for f in cols)}): {e}") from None
        finally:
            con.unregister("chunk")
        return chunk.filter(pc.is_in(chunk[ROW], rows))

    keep(pa.table({**{f.name: pa.array([], f.type) for f in cols}, ROW: pa.array([], pa.int64())}))  # fail early
    return keep


def read_table(output: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """The published snapshot as one Arrow table."""
    return open(output, storage_options=storage_options).to_arrow(columns)


def duckdb_connection(output: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A DuckDB connection with an ``embeddings`` view (vector column already ``FLOAT[dim]``)."""
    return open(output, storage_options=storage_options).duckdb()
