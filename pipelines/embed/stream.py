"""The streaming pass: piece descriptors -> read + preprocess tasks -> embedding actor pool -> sink, with
carry-over tasks beside it; and how pieces are sliced and packed into blocks so that every actor has work."""
from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pyarrow as pa

from operators.embed.embedder import EmbedActor
from operators.errors import PipelineError, StorageError
from operators.models.specs import ImagePreprocess, ModelSpec, TextPreprocess
from operators.read.loading import load_pieces
from operators.write.sink import SinkOptions, carry_piece, write_piece
from pipelines.config import EmbedConfig, read_options
from pipelines.embed.plan import PieceWork
from pipelines.embed.report import RunReport
from pipelines.embed.tracker import Tracker
from pipelines.embed.watch import RunWatch
from pipelines.runtime import actor_streams, batch_autotune, check_resources, init_ray

MIN_ACTORS_WAIT_S = 1800  # min_actors > 1: work starts once they are all up; not up in this long -> the run fails


def read_preprocessing(cfg: EmbedConfig, spec: ModelSpec) -> ImagePreprocess | TextPreprocess | None:
    """What the read tasks do to records: the model's preprocessing, or nothing when the actors decode."""
    return None if cfg.image_decode == "actors" else spec.preprocessing


def embed_actor_args(cfg: EmbedConfig, spec: ModelSpec, torch_threads: int, board: str | None = None) -> dict[str, Any]:
    """EmbedActor's constructor arguments (the streaming pool and the isolator build the same actor)."""
    return {"task_timeout_s": cfg.task_timeout_s, "board": board,
            "spec": spec, "batch_size": cfg.batch_size, "precision": cfg.precision, "num_gpus": cfg.num_gpus,
            "torch_threads": torch_threads, "decode_images": cfg.image_decode == "actors",
            "streams": actor_streams(cfg, torch_threads), "autotune": batch_autotune(cfg),
            "max_batch_size": cfg.max_batch_size, "torch_compile": cfg.torch_compile, "dedupe": cfg.reuse == "content"}


def stream_pieces(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, todo: list[PieceWork], sink: SinkOptions,
                  tracker: Tracker, t_start: float, base: dict[str, Any] | None = None,
                  progress: Callable[[str], None] = print) -> None:
    """The streaming pass: embed the new/changed shards of each piece; carry-over tasks run beside it.
    ``base``: the published manifest with this run's content fingerprint (its vectors can be reused)."""
    start_ray(cfg, report, t_start)
    carry = CarryOver(todo, sink, tracker, cfg.max_task_retries)
    blocks = piece_blocks(todo, report.resources["max_actors"], isinstance(spec.preprocessing, ImagePreprocess))
    stored = base if base is not None and base.get("rows") else None
    if blocks and cfg.reuse == "content" and (stored is not None or len(blocks) > 1):
        # contents the snapshot holds, and contents that several blocks of this run share (one block's own
        # duplicates are the actor's: embed_distinct)
        from pipelines.embed.reuse import plan_reuse

        blocks, report.reuse = plan_reuse(cfg, blocks, stored, sink.staged("reuse"))
        report.storage_retries += report.reuse["storage_retries"]
    with data_context(cfg), RunWatch(cfg, report, progress, tracker, t_start) as watch:
        try:
            if blocks:
                watch.planned(blocks)
                ds = embedding_dataset(cfg, spec, report.resources, blocks, sink, watch.name)
                carry.pump(block=False)
                collect(ds, report, tracker, carry, t_start)
                report.operators = operator_names(ds)
            carry.pump(block=True)
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            kind = StorageError if isinstance(cause, StorageError) else PipelineError
            raise kind(f"embedding run {report.run_id} failed; nothing new was published "
                       f"(finished pieces are journalled and a rerun adopts them): {cause}") from e


def start_ray(cfg: EmbedConfig, report: RunReport, t_start: float) -> None:
    """Join (or start) the Ray cluster and record the resources the run may use (checked against the config)."""
    init_ray(cfg.ray_address, {k: 10_000.0 for k in {**cfg.preprocess_resources, **cfg.embed_resources}})
    report.startup["ray_ready"] = round(time.perf_counter() - t_start, 3)
    report.resources = check_resources(cfg)


class CarryOver:
    """The carry-over tasks (the rows of a piece's unchanged shards copied into its new files), a few at a
    time beside the stream: each holds one old piece's rows."""

    MAX_PENDING = 4

    def __init__(self, todo: list[PieceWork], sink: SinkOptions, tracker: Tracker, max_retries: int) -> None:
        import ray

        self.task = ray.remote(num_cpus=0, max_retries=max_retries)(carry_piece)
        self.queue = [(w.piece.id, list(w.carry)) for w in todo if w.carry]
        self.pending: dict[Any, str] = {}  # task ref -> piece id
        self.sink = sink
        self.tracker = tracker

    def _submit(self) -> None:
        while self.queue and len(self.pending) < self.MAX_PENDING:
            pid, sources = self.queue.pop(0)
            self.pending[self.task.remote(pid, sources, self.sink)] = pid

    def pump(self, block: bool) -> None:
        """Start queued tasks up to the limit and record the finished ones; ``block``: until none is left."""
        import ray

        self._submit()
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            self.pending.pop(ready[0])
            self.tracker.add_carried(ray.get(ready[0]))
            self._submit()


def piece_blocks(todo: list[PieceWork], actors: int, images: bool) -> list[pa.Table]:
    """The Ray Data input: one Arrow table per block, each row a piece (or a slice of one) to read and embed.

    Big pieces are sliced (:func:`piece_slices`) and the items packed into blocks (:func:`block_groups`),
    not split evenly by count, so that every actor has work from the start to the end.
    """
    work = [w for w in todo if w.embed]
    sizes = [sum(s.size for s in w.embed) for w in work]
    items, item_sizes = [], []
    for w, size, k in zip(work, sizes, piece_slices(sizes, actors)):
        shards_json = json.dumps([s.to_dict() for s in w.embed])
        items += [{"piece": w.piece.id, "shards": shards_json, "slice": [i, k]} for i in range(k)]
        item_sizes += [size // k] * k
    packing = block_groups(item_sizes, actors, IMAGE_BLOCK_BYTES if images else TEXT_BLOCK_BYTES)
    bounds = [0, *itertools.accumulate(packing)]
    return [pa.Table.from_pylist(items[a:b]) for a, b in zip(bounds, bounds[1:])]


@contextmanager
def data_context(cfg: EmbedConfig) -> Iterator[None]:
    """Ray Data's settings for the run, restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved_errored, saved_wait = ctx.max_errored_blocks, ctx.wait_for_min_actors_s
    ctx.max_errored_blocks = -1  # a block that fails after its retries comes back to isolation, not a crash
    if cfg.min_actors > 1 and cfg.num_gpus:
        # GPU actors: the start waits until they are all up, else the first one up would queue the first
        # windows while the others load
        ctx.wait_for_min_actors_s = MIN_ACTORS_WAIT_S
    saved_filters = warnings.filters[:]
    if cfg.num_gpus:
        # GPU actors put out windows of rows, not one output per block: the write pool's bound (see
        # write_pool_size) may exceed the outputs that reach it, which Ray Data warns of; a bound, not a need
        warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(write_piece",
                                category=UserWarning)
    try:
        yield
    finally:
        ctx.max_errored_blocks, ctx.wait_for_min_actors_s = saved_errored, saved_wait
        warnings.filters[:] = saved_filters


def embedding_dataset(cfg: EmbedConfig, spec: ModelSpec, resources: dict[str, Any], blocks: list[pa.Table],
                      sink: SinkOptions, board: str | None = None) -> Any:
    """The Ray Data pipeline: read + preprocess tasks -> the embedding actor pool -> write tasks."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    # CPU actors take one block at a time (a block is a piece or more: seconds of work, so nothing is lost
    # between blocks): an actor that is up first cannot queue the blocks of one still loading, and reads
    # start at once, decoding while the models load. GPU actors get windows of rows, two in flight each
    # (the next window's fetch overlaps the forward pass).
    in_flight = 1 if not cfg.num_gpus else None
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for retry counts yet; ray_remote_args still carry them
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            load_pieces, fn_args=(read_options(cfg), read_preprocessing(cfg, spec), cfg.output, dict(cfg.storage_options),
                                  (cfg.task_timeout_s, board)),
            batch_size=None,
            batch_format="pyarrow", num_cpus=cfg.preprocess_num_cpus,
            # declared memory per task; differing from the actors' it also keeps Ray Data from fusing
            # this CPU stage into the embedding actors, so the two stages scale apart
            memory=cfg.preprocess_memory_mb * (1 << 20), resources=cfg.preprocess_resources or None,
            max_retries=cfg.max_task_retries,  # a worker that dies on every try is not retried forever
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs=embed_actor_args(cfg, spec, resources["torch_threads"], board),
            # CPU: one call per block (a whole piece: length buckets span the piece). Ray Data insists on
            # a batch_size for GPU stages: there a call gets a window of 16 forward batches; a piece whose
            # rows land in several output blocks is written as several parts, journalled once all are in.
            batch_size=None if not cfg.num_gpus else cfg.batch_size * 16,
            batch_format="pyarrow", zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=resources["max_actors"],
                                      max_tasks_in_flight_per_actor=in_flight),
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None, resources=cfg.embed_resources or None,
            max_restarts=-1, max_task_retries=cfg.max_task_retries,  # dead actors are replaced
        )
        # writes are small I/O-bound tasks: they take no CPU slot (so reads and actors keep theirs), and a
        # fixed-size task pool bounds how many run at once: no more than the blocks that reach it (Ray Data
        # warns of a pool larger than its inputs)
        return ds.map_batches(write_piece, fn_args=(sink,), batch_size=None, batch_format="pyarrow", num_cpus=0,
                              compute=ray.data.TaskPoolStrategy(size=write_pool_size(resources["max_actors"], len(blocks))),
                              max_retries=cfg.max_task_retries)


def write_pool_size(max_actors: int, blocks: int) -> int:
    """Write tasks at once: two per run or one per actor, but never more than the blocks to write (each block
    reaches the writes as one input at least)."""
    return max(1, min(max(2, max_actors), blocks))


def collect(ds: Any, report: RunReport, tracker: Tracker, carry: CarryOver, t_start: float) -> None:
    """Run the pipeline: each written part goes to the tracker (the journal) as it comes; carry-overs go on."""
    # prefetch_batches=0: a written part reaches the journal at once, not when the next one is ready
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        if report.seconds_to_first_result is None:
            report.seconds_to_first_result = round(time.perf_counter() - t_start, 3)
            report.startup["first_result"] = report.seconds_to_first_result
        for r in batch.to_pylist():
            tracker.add_embedded(r)
        carry.pump(block=False)


def piece_slices(sizes: list[int], actors: int) -> list[int]:
    """In how many row slices each piece is read, so that every actor has work whatever the shard sizes.

    With one actor nothing is sliced. With several, a piece holding more than 1/(2 x actors) of the input
    (one big shard beside small ones, or a single shard) is read as that many slices (at most 4 per
    actor), each its own block; the slices are written as parts of the piece and journalled together.
    """
    if actors <= 1 or not sizes:
        return [1] * len(sizes)
    target = max(1.0, sum(sizes) / (2 * actors))
    return [max(1, min(4 * actors, math.ceil(s / target))) for s in sizes]


# text blocks: the window that length buckets are cut in. An actor's working set grows with its block (the
# allocator keeps the many batch shapes' buffers), so the window is kept small (figures: benchmarks/README.md).
TEXT_BLOCK_BYTES = 256 << 10
IMAGE_BLOCK_BYTES = 256 << 10  # image pieces are scan-sized already; this only packs tiny refreshes


def block_groups(sizes: list[int], actors: int, min_block_bytes: int = IMAGE_BLOCK_BYTES) -> list[int]:
    """How the pieces (in order) are packed into Ray Data blocks: the number of pieces in each block.

    The first ``actors`` blocks hold one piece each, so that every actor starts on a small block and the
    first results come early; with several actors the last ``actors`` blocks do too, so that no actor
    works alone on a big block at the end. The pieces between are packed into blocks of at least
    ``min_block_bytes`` of input (a refresh of a hundred one-line shards is a few blocks, not a hundred
    round trips; text sorted into length buckets over a whole block pads less in larger blocks),
    balanced by bytes, in a multiple of the actor count (even rounds) while there are pieces enough.
    """
    n, actors = len(sizes), max(1, actors)
    if not n:
        return []
    head = actors if n > 2 * actors else 0
    tail = actors if actors > 1 and n > 3 * actors else 0
    body = sizes[head:n - tail]
    if not body:
        return [1] * n
    k = max(-(-sum(body) // max(1, min_block_bytes)), actors)
    k = max(1, min(len(body), -(-k // actors) * actors))  # a multiple of the actors: even rounds
    # cut the running byte total at k-1 evenly spaced marks (each block at least one piece)
    total, groups, taken, run = sum(body), [], 0, 0
    for i, size in enumerate(body):
        run += size
        left_blocks, left_items = k - len(groups) - 1, len(body) - i - 1
        if left_blocks and (run >= total * (len(groups) + 1) / k or left_items == left_blocks):
            groups.append(i + 1 - taken)
            taken = i + 1
    groups.append(len(body) - taken)
    return [1] * head + groups + [1] * tail


def operator_names(ds: Any) -> list[str]:
    import re

    try:
        return re.findall(r"^Operator \d+ (.+?):", ds.stats(), flags=re.M)
    except Exception:  # stats are informative only
        return []
