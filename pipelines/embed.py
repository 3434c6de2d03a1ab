"""`featx embed`: shards in storage -> CPU read/preprocess tasks -> GPU/CPU actor pool -> Parquet.

The driver lists the input once, plans pieces, runs one streaming Ray Data
job, and receives only per-piece counts; then it writes the manifest (last),
the run report and the resolved config beside it.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from operators import columns as C
from operators.embedder import EmbedActor
from operators.errors import ConfigError, PipelineError
from operators.preprocess import preprocess_images, preprocess_text
from operators.readers import FORMAT_EXTENSIONS, ReadOptions, read_shard
from operators.registry import ImagePreprocess, ModelOptions, ModelSpec, TextPreprocess, resolve
from operators.sink import SinkOptions, write_piece
from operators.storage import Shard, join, list_shards, write_bytes
from pipelines import __version__
from pipelines.config import EmbedConfig, IMAGE_FORMATS
from pipelines.manifest import build_manifest, commit, load_manifest, now
from pipelines.plan import Piece, plan_pieces


@dataclass
class RunReport:
    run_id: str
    output: str
    started: str
    finished: str = ""
    status: str = "running"
    snapshot: int | None = None
    model: str = ""
    model_fingerprint: str = ""
    shards_total: int = 0
    shards_processed: int = 0
    shards_skipped: int = 0
    pieces_total: int = 0
    pieces_processed: int = 0
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    published_rows: int = 0
    published_error_rows: int = 0
    data_files_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    rows_per_second: float = 0.0
    seconds_to_first_result: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over tasks/actors
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> pieces written there
    resources: dict[str, Any] = field(default_factory=dict)
    operators: list[str] = field(default_factory=list)  # Ray Data's physical operators, as executed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def model_spec(cfg: EmbedConfig) -> ModelSpec:
    opts = ModelOptions(weights=cfg.weights, revision=cfg.revision, pooling=cfg.pooling, normalize=cfg.normalize,
                        max_length=cfg.max_length, trust_remote_code=cfg.trust_remote_code)
    spec = resolve(cfg.model, opts)
    wants_image = cfg.format in IMAGE_FORMATS
    if wants_image != (spec.modality == "image"):
        raise ConfigError(
            f"model {cfg.model!r} is a{'n' if spec.modality == 'image' else ''} {spec.modality} model but format "
            f"{cfg.format!r} holds {'images' if wants_image else 'text'}; pick a matching model "
            f"(images: efficientnet-lite0, resnet50, ...; text: minilm-l6, hf:<id>)"
        )
    return spec


def read_options(cfg: EmbedConfig) -> ReadOptions:
    return ReadOptions(format=cfg.format, text_column=cfg.text_column, image_column=cfg.image_column,
                       key_column=cfg.key_column, passthrough=tuple(cfg.passthrough),
                       storage_options=dict(cfg.storage_options))


def _check_output_outside_input(cfg: EmbedConfig) -> None:
    src = cfg.input.split("*", 1)[0].rstrip("/") + "/"
    dst = cfg.output.rstrip("/") + "/"
    if dst.startswith(src) or src.startswith(dst):
        raise ConfigError(
            f"output {cfg.output!r} lies inside input {cfg.input!r} (or the other way round): a later run would read "
            "its own output as input. Choose an output prefix outside the input."
        )


def load_piece(piece_shards: list[dict[str, Any]], piece: str, ropts: ReadOptions,
               pre: ImagePreprocess | TextPreprocess) -> pa.Table:
    """Read + preprocess every shard of one piece (pure; runs in a Ray task)."""
    t0 = time.perf_counter()
    tables = [read_shard(s["uri"], s["rel"], ropts) for s in piece_shards]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    t1 = time.perf_counter()
    table = preprocess_images(table, pre) if isinstance(pre, ImagePreprocess) else preprocess_text(table, pre)
    n = table.num_rows
    table = table.append_column(C.PIECE, pa.array([piece] * n, pa.string()))
    table = table.append_column(C.T_READ, pa.array([t1 - t0] * n, pa.float64()))
    return table.append_column(C.T_PRE, pa.array([time.perf_counter() - t1] * n, pa.float64()))


def load_pieces(batch: pa.Table, ropts: ReadOptions, pre: ImagePreprocess | TextPreprocess) -> pa.Table:
    """map_batches function over piece descriptors (one row per piece)."""
    out = [load_piece(json.loads(s), p, ropts, pre)
           for p, s in zip(batch["piece"].to_pylist(), batch["shards"].to_pylist())]
    return pa.concat_tables(out, promote_options="permissive") if len(out) > 1 else out[0]


def init_ray(cfg: EmbedConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def check_resources(cfg: EmbedConfig) -> dict[str, Any]:
    """Refuse a pool that would leave read/preprocess tasks no CPU (it would hang, not fail)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    plan = {"cluster_cpus": cpus, "cluster_gpus": gpus, "min_actors": cfg.min_actors, "max_actors": cfg.max_actors,
            "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "batch_size": cfg.batch_size, "precision": cfg.precision}
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return plan  # an autoscaling cluster may grow to fit: Ray Data waits for nodes instead
    need_cpu = cfg.min_actors * cfg.num_cpus + cfg.preprocess_num_cpus
    if need_cpu > cpus + 1e-9:
        raise ConfigError(
            f"the embedding pool needs min_actors x num_cpus = {cfg.min_actors} x {cfg.num_cpus} CPUs plus "
            f"preprocess_num_cpus = {cfg.preprocess_num_cpus} for reading, but the cluster has {cpus:g} CPUs; "
            "it would wait forever. Lower num_cpus (fractions like 0.5 work), min_actors or preprocess_num_cpus."
        )
    if cfg.num_gpus > 0 and cfg.min_actors * cfg.num_gpus > gpus + 1e-9:
        raise ConfigError(
            f"num_gpus = {cfg.num_gpus} per actor x min_actors = {cfg.min_actors} needs "
            f"{cfg.min_actors * cfg.num_gpus:g} GPUs but this Ray has {gpus:g}; set num_gpus=0 to run on CPU"
        )
    # on a fixed-size (local) Ray, cap the pool so that reads always keep a CPU
    fit = max(cfg.min_actors, math.floor((cpus - cfg.preprocess_num_cpus) / cfg.num_cpus + 1e-9))
    max_actors = min(cfg.max_actors, fit)
    if cfg.num_gpus > 0:
        max_actors = min(max_actors, max(cfg.min_actors, math.floor(gpus / cfg.num_gpus + 1e-9)))
    return {**plan, "max_actors": max_actors}


def _piece_record(piece: Piece, results: list[dict[str, Any]]) -> dict[str, Any]:
    files = [{"path": r["data_file"], "rows": r["rows"], "bytes": r["bytes"]} for r in results if r["data_file"]]
    errs = [{"path": r["error_file"], "rows": r["error_rows"]} for r in results if r["error_file"]]
    return {"id": piece.id, "shards": [s.to_dict() for s in piece.shards], "files": files, "error_files": errs,
            "rows": sum(f["rows"] for f in files), "error_rows": sum(e["rows"] for e in errs)}


def run_embed(cfg: EmbedConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one embed job end to end; returns the run report (also saved beside the manifest)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    t_start = time.perf_counter()
    spec = model_spec(cfg)  # bad model names fail here, before any listing or Ray work
    fp = spec.fingerprint()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = RunReport(run_id=run_id, output=cfg.output, started=now(), model=spec.name, model_fingerprint=fp)

    _check_output_outside_input(cfg)
    shards: list[Shard] = list_shards(cfg.input, FORMAT_EXTENSIONS[cfg.format], cfg.storage_options)
    pieces = plan_pieces(shards, cfg.piece_max_shards, int(cfg.piece_target_mb * (1 << 20)))
    previous = load_manifest(cfg.output, cfg.storage_options)
    done: dict[str, dict[str, Any]] = {}
    if previous and previous.get("model_fingerprint") == fp and previous.get("embedding_dtype") == cfg.embedding_dtype \
            and previous.get("model", {}).get("preprocessing_fingerprint") == spec.preprocessing_fingerprint():
        done = {p["id"]: p for p in previous["pieces"]}
    todo = [p for p in pieces if p.id not in done]
    report.shards_total, report.pieces_total = len(shards), len(pieces)
    report.shards_skipped = sum(len(p.shards) for p in pieces if p.id in done)
    progress(f"featx embed: {len(shards)} shards in {len(pieces)} pieces; {len(todo)} pieces to embed "
             f"({len(pieces) - len(todo)} already published) with {spec.name}")

    init_ray(cfg)
    report.resources = check_resources(cfg)
    metadata = {**spec.describe(), "embedding_dtype": cfg.embedding_dtype, "featx_version": __version__}
    results: dict[str, list[dict[str, Any]]] = {}
    if todo:
        items = [{"piece": p.id, "shards": json.dumps([s.to_dict() for s in p.shards])} for p in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            load_pieces, fn_args=(read_options(cfg), spec.preprocessing), batch_size=1,
            batch_format="pyarrow", num_cpus=cfg.preprocess_num_cpus,
            # declared memory per task; differing from the actors' it also keeps Ray Data from fusing
            # this CPU stage into the embedding actors, so the two stages scale apart
            memory=cfg.preprocess_memory_mb * (1 << 20),
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={"spec": spec, "batch_size": cfg.batch_size, "precision": cfg.precision,
                                   "num_gpus": cfg.num_gpus,
                                   "torch_threads": cfg.torch_threads or max(1, math.ceil(cfg.num_cpus))},
            # CPU: one call per block (a whole piece: length buckets span the piece). Ray Data insists on a
            # batch_size for GPU stages: there a call gets a window of 16 forward batches; whole blocks are
            # bundled, and a piece whose rows land in two output blocks is written as two part files.
            batch_size=None if not cfg.num_gpus else cfg.batch_size * 16,
            batch_format="pyarrow", zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=report.resources["max_actors"]),
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
        )
        sink = SinkOptions(output=cfg.output, model_fingerprint=fp, metadata=metadata,
                           embedding_dtype=cfg.embedding_dtype, storage_options=dict(cfg.storage_options))
        # writes are small I/O-bound tasks: they take no CPU slot (so reads and actors keep theirs),
        # and a fixed-size task pool bounds how many run at once
        ds = ds.map_batches(write_piece, fn_args=(sink,), batch_size=None, batch_format="pyarrow", num_cpus=0,
                            compute=ray.data.TaskPoolStrategy(size=max(2, report.resources["max_actors"])))
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if report.seconds_to_first_result is None:
                    report.seconds_to_first_result = round(time.perf_counter() - t_start, 3)
                for r in batch.to_pylist():
                    results.setdefault(r["piece"], []).append(r)
            report.operators = _operator_names(ds)
        except Exception as e:
            report.status = "failed"
            report.finished = now()
            _save_report(cfg, report)
            raise PipelineError(f"embedding run {run_id} failed; nothing new was published: {e}") from e

    new_pieces = {p.id: _piece_record(p, results.get(p.id, [])) for p in todo}
    kept = {p.id: done[p.id] for p in pieces if p.id in done}
    all_results = [r for rs in results.values() for r in rs]
    _check_error_budget(cfg, report, all_results)
    dims = {r["dim"] for r in all_results}
    dim = dims.pop() if len(dims) == 1 else (previous or {}).get("dim") if not dims else None
    if dim is None and dims:
        raise PipelineError(f"pieces came back with different embedding dims {sorted(dims)}; nothing was published")
    manifest = build_manifest(
        previous=previous, run_id=run_id, model=spec.describe() | {"dim": dim}, model_fingerprint=fp, dim=dim,
        embedding_dtype=cfg.embedding_dtype, input_uri=cfg.input, input_format=cfg.format,
        pieces=list(kept.values()) + list(new_pieces.values()),
    )
    commit(cfg.output, manifest, cfg.storage_options)

    elapsed = time.perf_counter() - t_start
    report.status = "succeeded"
    report.finished = now()
    report.snapshot = manifest["snapshot"]
    report.pieces_processed = len(todo)
    report.shards_processed = sum(len(p.shards) for p in todo)
    report.rows_out = sum(r["rows"] for r in all_results)
    report.error_rows = sum(r["error_rows"] for r in all_results)
    report.rows_in = report.rows_out + report.error_rows
    report.published_rows, report.published_error_rows = manifest["rows"], manifest["error_rows"]
    report.data_files_written = sum(1 for r in all_results if r["data_file"])
    report.bytes_written = sum(r["bytes"] for r in all_results)
    report.seconds = round(elapsed, 3)
    report.rows_per_second = round(report.rows_in / elapsed, 2) if elapsed > 0 else 0.0
    report.stage_seconds = {k: round(sum(r[f"t_{k}"] for r in all_results), 3)
                            for k in ("read", "preprocess", "embed", "write")}
    for r in all_results:
        report.nodes[r["node_id"]] = report.nodes.get(r["node_id"], 0) + 1
    _save_report(cfg, report)
    return report.to_dict()


def _check_error_budget(cfg: EmbedConfig, report: RunReport, results: list[dict[str, Any]]) -> None:
    """Fail the run (publishing nothing) when more than max_error_fraction of this run's records failed."""
    rows = sum(r["rows"] for r in results)
    errors = sum(r["error_rows"] for r in results)
    if not errors or errors <= cfg.max_error_fraction * (rows + errors):
        return
    import pyarrow.parquet as pq

    from operators.storage import get_fs

    kinds: dict[str, int] = {}
    examples: list[str] = []
    for r in results:
        if not r["error_file"]:
            continue
        fs, path = get_fs(join(cfg.output, r["error_file"]), cfg.storage_options)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f)
        for row in t.to_pylist():
            k = f"{row['stage']}/{row['error_type']}"
            kinds[k] = kinds.get(k, 0) + 1
            if len(examples) < 3:
                examples.append(f"{row['key']}: {row['message'][:200]}")
    report.status = "failed"
    report.finished = now()
    report.error_rows = errors
    _save_report(cfg, report)
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    raise PipelineError(
        f"{errors} of {rows + errors} records failed ({errors / (rows + errors):.1%}), more than "
        f"max_error_fraction={cfg.max_error_fraction}; nothing new was published. Errors: {summary}. "
        f"Examples: {' | '.join(examples)}. Fix the input, or raise max_error_fraction to publish the good rows "
        f"(the failed ones are then listed under {join(cfg.output, '_errors')})."
    )


def _operator_names(ds: Any) -> list[str]:
    import re

    try:
        return re.findall(r"^Operator \d+ (.+?):", ds.stats(), flags=re.M)
    except Exception:  # stats are informative only
        return []


def _save_report(cfg: EmbedConfig, report: RunReport) -> None:
    body = json.dumps(report.to_dict(), indent=1).encode()
    write_bytes(join(cfg.output, "_report.json"), body, cfg.storage_options)
    write_bytes(join(cfg.output, "_runs", f"{report.run_id}.json"), body, cfg.storage_options)
    write_bytes(join(cfg.output, "_config.json"), json.dumps(cfg.public_dict(), indent=1).encode(), cfg.storage_options)
