"""The streaming pass: piece descriptors -> read + preprocess tasks -> embedding actor pool -> sink, with
carry-over tasks beside it; and how pieces are sliced and packed into blocks so that every actor has work."""
from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from typing import Any

import pyarrow as pa

from operators.embed.embedder import EmbedActor
from operators.errors import PipelineError, StorageError
from operators.models.registry import ImagePreprocess, ModelSpec, TextPreprocess
from operators.read.loading import load_pieces
from operators.write.sink import SinkOptions, carry_piece, write_piece
from pipelines.config import EmbedConfig, read_options
from pipelines.embed.plan import PieceWork
from pipelines.embed.report import RunReport
from pipelines.embed.tracker import Tracker
from pipelines.runtime import actor_streams, batch_autotune, check_resources, init_ray

MIN_ACTORS_WAIT_S = 1800  # min_actors > 1: work starts once they are all up; not up in this long -> the run fails


def read_preprocessing(cfg: EmbedConfig, spec: ModelSpec) -> ImagePreprocess | TextPreprocess | None:
    """What the read tasks do to records: the model's preprocessing, or nothing when the actors decode."""
    return None if cfg.image_decode == "actors" else spec.preprocessing


def embed_actor_args(cfg: EmbedConfig, spec: ModelSpec, torch_threads: int) -> dict[str, Any]:
    """EmbedActor's constructor arguments (the streaming pool and the isolator build the same actor)."""
    return {"spec": spec, "batch_size": cfg.batch_size, "precision": cfg.precision, "num_gpus": cfg.num_gpus,
            "torch_threads": torch_threads, "decode_images": cfg.image_decode == "actors",
            "streams": actor_streams(cfg, torch_threads), "autotune": batch_autotune(cfg),
            "max_batch_size": cfg.max_batch_size, "torch_compile": cfg.torch_compile}


def stream_pieces(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, todo: list[PieceWork], sink: SinkOptions,
            tracker: Tracker, t_start: float) -> None:
    """The streaming pass: embed the new/changed shards of each piece; carry-over tasks run beside it."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    init_ray(cfg.ray_address, {k: 10_000.0 for k in {**cfg.preprocess_resources, **cfg.embed_resources}})
    report.startup["ray_ready"] = round(time.perf_counter() - t_start, 3)
    report.resources = check_resources(cfg)
    carry_fn = ray.remote(num_cpus=0, max_retries=cfg.max_task_retries)(carry_piece)
    carry_queue = [(w.piece.id, list(w.carry)) for w in todo if w.carry]
    pending: dict[Any, str] = {}

    def pump(block: bool) -> None:
        while carry_queue and len(pending) < 4:  # a few at a time: each holds one old piece's rows
            pid, sources = carry_queue.pop(0)
            pending[carry_fn.remote(pid, sources, sink)] = pid
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            pending.pop(ready[0])
            tracker.add_carried(ray.get(ready[0]))
            while carry_queue and len(pending) < 4:
                pid, sources = carry_queue.pop(0)
                pending[carry_fn.remote(pid, sources, sink)] = pid

    work = [w for w in todo if w.embed]
    sizes = [sum(s.size for s in w.embed) for w in work]
    items, item_sizes = [], []
    for w, size, k in zip(work, sizes, piece_slices(sizes, report.resources["max_actors"])):
        shards_json = json.dumps([s.to_dict() for s in w.embed])
        items += [{"piece": w.piece.id, "shards": shards_json, "slice": [i, k]} for i in range(k)]
        item_sizes += [size // k] * k
    packing = block_groups(item_sizes, report.resources["max_actors"],
                           IMAGE_BLOCK_BYTES if isinstance(spec.preprocessing, ImagePreprocess) else TEXT_BLOCK_BYTES)
    ctx = DataContext.get_current()
    saved_errored, saved_wait = ctx.max_errored_blocks, ctx.wait_for_min_actors_s
    ctx.max_errored_blocks = -1  # a block that fails after its retries comes back to isolation, not a crash
    # CPU actors take one block at a time (a block is a piece or more: seconds of work, so nothing is lost
    # between blocks): an actor that is up first cannot queue the blocks of one still loading, and reads
    # start at once, decoding while the models load. GPU actors get windows of rows, two in flight each
    # (the next window's fetch overlaps the forward pass); there min_actors > 1 holds the start until
    # they are all up, else the first one up would queue the first windows while the others load.
    in_flight = 1 if not cfg.num_gpus else None
    if cfg.min_actors > 1 and cfg.num_gpus:
        ctx.wait_for_min_actors_s = MIN_ACTORS_WAIT_S
    try:
        if items:
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameter for retry counts yet; ray_remote_args still carry them
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
                # one Arrow table per block: the packing above, not an even split by count
                bounds = [0, *itertools.accumulate(packing)]
                ds = ray.data.from_arrow([pa.Table.from_pylist(items[a:b]) for a, b in zip(bounds, bounds[1:])])
                ds = ds.map_batches(
                    load_pieces, fn_args=(read_options(cfg), read_preprocessing(cfg, spec)), batch_size=None,
                    batch_format="pyarrow", num_cpus=cfg.preprocess_num_cpus,
                    # declared memory per task; differing from the actors' it also keeps Ray Data from fusing
                    # this CPU stage into the embedding actors, so the two stages scale apart
                    memory=cfg.preprocess_memory_mb * (1 << 20), resources=cfg.preprocess_resources or None,
                    max_retries=cfg.max_task_retries,  # a worker that dies on every try is not retried forever
                )
                ds = ds.map_batches(
                    EmbedActor,
                    fn_constructor_kwargs=embed_actor_args(cfg, spec, report.resources["torch_threads"]),
                    # CPU: one call per block (a whole piece: length buckets span the piece). Ray Data insists on
                    # a batch_size for GPU stages: there a call gets a window of 16 forward batches; a piece whose
                    # rows land in several output blocks is written as several parts, journalled once all are in.
                    batch_size=None if not cfg.num_gpus else cfg.batch_size * 16,
                    batch_format="pyarrow", zero_copy_batch=True,
                    compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=report.resources["max_actors"],
                                              max_tasks_in_flight_per_actor=in_flight),
                    num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None, resources=cfg.embed_resources or None,
                    max_restarts=-1, max_task_retries=cfg.max_task_retries,  # dead actors are replaced
                )
                # writes are small I/O-bound tasks: they take no CPU slot (so reads and actors keep theirs),
                # and a fixed-size task pool bounds how many run at once
                ds = ds.map_batches(write_piece, fn_args=(sink,), batch_size=None, batch_format="pyarrow", num_cpus=0,
                                    compute=ray.data.TaskPoolStrategy(size=max(2, report.resources["max_actors"])),
                                    max_retries=cfg.max_task_retries)
            pump(block=False)
            # prefetch_batches=0: a written part reaches the journal at once, not when the next one is ready
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                if report.seconds_to_first_result is None:
                    report.seconds_to_first_result = round(time.perf_counter() - t_start, 3)
                    report.startup["first_result"] = report.seconds_to_first_result
                for r in batch.to_pylist():
                    tracker.add_embedded(r)
                pump(block=False)
            report.operators = operator_names(ds)
        pump(block=True)
    except Exception as e:
        cause = getattr(e, "cause", None) or e
        kind = StorageError if isinstance(cause, StorageError) else PipelineError
        raise kind(f"embedding run {report.run_id} failed; nothing new was published "
                   f"(finished pieces are journalled and a rerun adopts them): {cause}") from e
    finally:
        ctx.max_errored_blocks, ctx.wait_for_min_actors_s = saved_errored, saved_wait


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


# text blocks: ~1,500 sentences of JSONL, the window that length buckets are cut in (1.3% padding on windows of
# 1,430 real sentences). An actor's working set grows with its block (a 5,900-row block peaked ~300 MB above a
# 500-row one: the allocator keeps the many batch shapes' buffers), so the window is kept this small.
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
