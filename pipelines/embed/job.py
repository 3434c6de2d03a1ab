"""`featx embed` / `featx refresh`: shards in storage -> CPU read/preprocess tasks -> GPU/CPU actors -> Parquet.

The driver takes the output's lease, lists the input once, compares it with the published manifest
(only new and changed shards are embedded; unchanged shards' rows are kept or carried over; removed
shards leave the table; a different model/preprocessing re-embeds everything), adopts pieces that a
crashed run finished, runs one streaming Ray Data job for the rest, journals each finished piece,
isolates records that crash their workers, and commits by writing the manifest last
(:mod:`pipelines.publish.commit`). It receives counts, never rows.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from operators.embed.autotune import tune_limit
from operators.embed.embedder import EmbedActor
from operators.errors import ConfigError, InputError, PipelineError, StorageError
from operators.read.loading import load_pieces
from operators.read.readers import FORMAT_EXTENSIONS, ReadOptions
from operators.models.registry import ImagePreprocess, ModelOptions, ModelSpec, TextPreprocess, resolve
from operators.write.sink import SinkOptions, carry_piece, write_piece
from operators.io.storage import Shard, join, list_shards, retries_done, short_hash, still_present, write_bytes
from pipelines import __version__
from pipelines.config import EmbedConfig, IMAGE_FORMATS
from pipelines.publish.lease import Lease
from pipelines.publish.manifest import load_manifest, now
from pipelines.embed.plan import Piece, PieceWork, plan_pieces, plan_work
from pipelines.publish.commit import Staging, adoptable, clean_up, commit_run, read_rows

LIST_CAP = 10_000  # most shard paths listed per kind in a run report
MAX_AUTO_STREAMS = 4  # cpu_streams by default: one per actor thread, at most this many
MIN_ACTORS_WAIT_S = 1800  # min_actors > 1: work starts once they are all up; not up in this long -> the run fails


@dataclass
class RunReport:
    run_id: str
    output: str
    started: str
    command: str = "embed"
    finished: str = ""
    status: str = "running"
    error: str = ""
    snapshot: int | None = None
    base_snapshot: int = 0
    model: str = ""
    model_fingerprint: str = ""
    content_fingerprint: str = ""
    reembed_reason: str = ""  # why every shard is embedded again, when it is
    shards_total: int = 0
    shards_processed: int = 0  # embedded by this run
    shards_skipped: int = 0  # unchanged: kept or carried over without running the model
    shards_adopted: int = 0  # finished by a crashed run, published by this one
    pieces_total: int = 0
    pieces_processed: int = 0
    pieces_adopted: int = 0
    changes: dict[str, Any] = field(default_factory=dict)  # added / changed / removed shard paths, unchanged count
    shards_embedded: list[str] = field(default_factory=list)
    rows_in: int = 0  # records read from the embedded shards
    rows_out: int = 0
    error_rows: int = 0
    rows_carried: int = 0
    quarantined: int = 0  # records that crashed their worker every time and went to _errors
    isolation_calls: int = 0
    storage_retries: int = 0  # featx's own retries of failed storage requests (driver, reads, writes, carries)
    published_rows: int = 0
    published_error_rows: int = 0
    data_files_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    rows_per_second: float = 0.0
    seconds_to_first_result: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over tasks/actors
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> parts written there
    stage_nodes: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> node id -> rows it handled there
    actor_rows: dict[str, int] = field(default_factory=dict)  # embedding actor id -> rows it embedded
    batch_sizes: dict[str, int] = field(default_factory=dict)  # batch size -> rows embedded at it (autotuning)
    # seconds from the command's start: Ray ready, first block preprocessed, first actor's model loaded,
    # first block embedded, first part written, first result back at the driver
    startup: dict[str, float] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    operators: list[str] = field(default_factory=list)  # Ray Data's physical operators, as executed
    cleanup: dict[str, int] = field(default_factory=dict)
    lease_taken_over: str = ""

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


def content_fingerprint(cfg: EmbedConfig, spec: ModelSpec) -> str:
    """Everything that decides a row's output: rows are reused only between runs that agree on it."""
    column = cfg.text_column if cfg.is_text else cfg.image_column if cfg.format == "parquet-images" else ""
    # decoding in the actors (torchvision resize) gives pixels a few grey levels off Pillow's: other rows
    decode = ["decode=actors"] if cfg.image_decode == "actors" else []
    return short_hash(spec.fingerprint(), spec.preprocessing_fingerprint(), cfg.embedding_dtype, cfg.format, column,
                      cfg.key_column or "", ",".join(cfg.passthrough), *decode, n=16)


def read_preprocessing(cfg: EmbedConfig, spec: ModelSpec) -> ImagePreprocess | TextPreprocess | None:
    """What the read tasks do to records: the model's preprocessing, or nothing when the actors decode."""
    return None if cfg.image_decode == "actors" else spec.preprocessing


def embed_actor_args(cfg: EmbedConfig, spec: ModelSpec, torch_threads: int) -> dict[str, Any]:
    """EmbedActor's constructor arguments (the streaming pool and the isolator build the same actor)."""
    return {"spec": spec, "batch_size": cfg.batch_size, "precision": cfg.precision, "num_gpus": cfg.num_gpus,
            "torch_threads": torch_threads, "decode_images": cfg.image_decode == "actors",
            "streams": actor_streams(cfg, torch_threads), "autotune": batch_autotune(cfg),
            "max_batch_size": cfg.max_batch_size, "torch_compile": cfg.torch_compile}


def batch_autotune(cfg: EmbedConfig) -> bool:
    """The config's ``batch_autotune``; by default on for GPU actors only."""
    return cfg.batch_autotune if cfg.batch_autotune is not None else cfg.num_gpus > 0


def actor_streams(cfg: EmbedConfig, torch_threads: int) -> int:
    """Batches each actor runs side by side: the config's ``cpu_streams``; else on CPU one single-thread
    batch per thread, at most MAX_AUTO_STREAMS (measured on 2 cores only: 2 x 1 beats 1 x 2 there for both
    modalities; more streams cost one batch of activations each); GPU actors run one."""
    if cfg.num_gpus or cfg.torch_compile:
        return 1
    return cfg.cpu_streams or max(1, min(torch_threads, MAX_AUTO_STREAMS))


def init_ray(ray_address: str | None = None, local_resources: dict[str, float] | None = None) -> None:
    """Join the Ray cluster at ``ray_address`` (or RAY_ADDRESS), else start a local Ray; no-op when connected.

    ``local_resources``: custom resources a local Ray offers. A local Ray is one node, so it offers the
    resources that a cluster config pins its stages with, and that config runs here unchanged.
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, resources=local_resources or None)


def check_resources(cfg: EmbedConfig) -> dict[str, Any]:
    """Refuse a pool that would leave read/preprocess tasks no CPU (it would hang, not fail)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    plan = {"cluster_cpus": cpus, "cluster_gpus": gpus, "min_actors": cfg.min_actors, "max_actors": cfg.max_actors,
            "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "batch_size": cfg.batch_size, "precision": cfg.precision,
            "batch_autotune": batch_autotune(cfg), "max_batch_size": tune_limit(cfg.batch_size, cfg.max_batch_size)}
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may grow to fit: Ray Data waits
        threads = actor_threads(cfg, cpus, cfg.max_actors, local=False)
        return {**plan, "torch_threads": threads, "cpu_streams": actor_streams(cfg, threads)}
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
    threads = actor_threads(cfg, cpus, max_actors, local=True)
    return {**plan, "max_actors": max_actors, "torch_threads": threads, "cpu_streams": actor_streams(cfg, threads)}


def actor_threads(cfg: EmbedConfig, cluster_cpus: float, max_actors: int, local: bool) -> int:
    """Intra-op threads per embedding actor: the config's ``torch_threads``; else, on a local CPU-only Ray,
    the machine's CPUs shared by the actors (read tasks are short bursts: a 2-core laptop with one actor
    runs 2 threads, measured 1.46x the rows/s of 1); else ceil(num_cpus)."""
    if cfg.torch_threads:
        return cfg.torch_threads
    declared = max(1, math.ceil(cfg.num_cpus))
    if not local or cfg.num_gpus > 0:
        return declared
    return max(declared, int(cluster_cpus // max(1, max_actors)))


def piece_record(piece: Piece, parts: list[dict[str, Any]], carried: set[int] = frozenset(),
                 records: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest entry of a finished piece: its shards (with ``records``: the records read from each, by
    URI) and every part file (``carried``: part indexes)."""
    records = records or {}
    shards = [{**s.to_dict(), "records": records.get(s.uri)} for s in piece.shards]
    files = [{"path": r["data_file"], "rows": r["rows"], "bytes": r["bytes"], **({"carried": True} if i in carried else {})}
             for i, r in enumerate(parts) if r.get("data_file")]
    errs = [{"path": r["error_file"], "rows": r["error_rows"], **({"carried": True} if i in carried else {})}
            for i, r in enumerate(parts) if r.get("error_file")]
    dims = [r["dim"] for r in parts if r.get("rows")]
    return {"id": piece.id, "shards": shards, "files": files, "error_files": errs,
            "rows": sum(f["rows"] for f in files), "error_rows": sum(e["rows"] for e in errs),
            "read_rows": read_rows({"shards": shards}), "dim": max(dims) if dims else None}


class _Tracker:
    """Collect part results as they stream in; journal a piece once all its parts are written."""

    def __init__(self, todo: list[PieceWork], staging: Staging) -> None:
        self.work = {w.piece.id: w for w in todo}
        self.staging = staging
        self.embed_parts: dict[str, list[dict[str, Any]]] = {}
        self.carry_parts: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}

    def add_embedded(self, r: dict[str, Any]) -> None:
        self.embed_parts.setdefault(r["piece"], []).append(r)
        self._maybe_done(r["piece"])

    def add_carried(self, r: dict[str, Any]) -> None:
        self.carry_parts[r["piece"]] = r
        self._maybe_done(r["piece"])

    def embedded_complete(self, pid: str) -> bool:
        parts = self.embed_parts.get(pid, [])
        return bool(parts) and sum(p["rows"] + p["error_rows"] for p in parts) == parts[0]["piece_rows"]

    def _maybe_done(self, pid: str) -> None:
        w = self.work[pid]
        if pid in self.records or (w.embed and not self.embedded_complete(pid)) or (w.carry and pid not in self.carry_parts):
            return
        self.finish(pid, self.embed_parts.get(pid, []))

    def finish(self, pid: str, embedded: list[dict[str, Any]], read_counts: dict[str, int] | None = None) -> None:
        """Journal piece ``pid`` from its parts. ``read_counts``: records read per embedded shard URI (default:
        as the read stage counted them in the parts); carried shards take the counts their last read recorded."""
        w = self.work[pid]
        carry = [self.carry_parts[pid]] if pid in self.carry_parts else []
        records: dict[str, int] = {}
        if read_counts is None:
            for p in embedded:
                records.update(json.loads(p.get("shard_rows") or "{}"))
        else:
            records.update(read_counts)
        records = {s.uri: records[s.uri] for s in w.embed if s.uri in records}
        copied = json.loads(carry[0].get("shard_rows") or "{}") if carry else {}
        for src in w.carry:
            for uri in src["uris"]:
                # an older manifest has no count: then the rows copied stand for it (no independent check)
                old = src.get("records", {}).get(uri)
                records[uri] = old if old is not None else copied.get(uri, 0)
        rec = piece_record(w.piece, carry + embedded, carried=set(range(len(carry))), records=records)
        rec["staged_in"] = self.staging.prefix
        self.staging.add(rec)
        self.records[pid] = {**rec, "parts": carry + embedded}  # parts: for the report; dropped before commit


def run_embed(cfg: EmbedConfig, progress: Callable[[str], None] = print, command: str = "embed") -> dict[str, Any]:
    """Run one embed (or refresh) job end to end; returns the run report (also saved beside the manifest)."""
    t_start = time.perf_counter()
    wall_start = time.time()
    spec = model_spec(cfg)  # bad model names fail here, before any listing or Ray work
    cfp = content_fingerprint(cfg, spec)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = RunReport(run_id=run_id, output=cfg.output, started=now(), command=command, model=spec.name,
                       model_fingerprint=spec.fingerprint(), content_fingerprint=cfp)
    _check_output_outside_input(cfg)
    so = dict(cfg.storage_options)
    lease = Lease(cfg.output, run_id, cfg.lease_ttl_s, so).acquire()  # a second writer stops here
    if lease.taken_over is not None:
        report.lease_taken_over = lease.taken_over.describe()
        progress(f"took over a stale lease of {report.lease_taken_over}")
    try:
        _run(cfg, spec, report, lease, progress, t_start, wall_start)
    except BaseException as e:
        report.status, report.finished, report.error = "failed", now(), str(e)[:4000]
        try:
            _save_report(cfg, report)
        except StorageError:  # the store that failed the run may refuse the report too: the run's error matters
            pass
        raise
    finally:
        lease.release()
    return report.to_dict()


def _run(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, lease: Lease, progress: Callable[[str], None],
         t_start: float, wall_start: float) -> None:
    so = dict(cfg.storage_options)
    cfp = report.content_fingerprint
    driver_retries = retries_done()
    previous = load_manifest(cfg.output, so)
    if report.command == "refresh" and previous is None:
        raise InputError(f"nothing is published at {cfg.output!r} yet, so there is nothing to refresh; "
                         "run `featx embed` with this config first")
    shards: list[Shard] = list_shards(cfg.input, FORMAT_EXTENSIONS[cfg.format], so, cfg.shard_fingerprint)
    pieces = plan_pieces(shards, cfg.piece_max_shards, int(cfg.piece_target_mb * (1 << 20)))
    base = previous if previous and previous.get("content_fingerprint") == cfp else None
    if previous and base is None:
        report.reembed_reason = ("the model, its preprocessing, the embedding dtype or the read options changed: "
                                 "every shard is embedded again into a new snapshot")
        progress(report.reembed_reason)
    report.base_snapshot = (previous or {}).get("snapshot", 0)
    plan = plan_work(pieces, base)
    adopted = adoptable(cfg.output, cfp, {w.piece.id for w in plan.todo}, report.run_id, so)
    todo = [w for w in plan.todo if w.piece.id not in adopted]
    removed = sorted({s["rel"] for p in (previous or {}).get("pieces", []) for s in p["shards"]}
                     - {s.rel for s in shards})
    _confirm_removed(cfg, previous, removed)
    report.shards_total, report.pieces_total = len(shards), len(pieces)
    report.changes = {"added": plan.added[:LIST_CAP], "changed": plan.changed[:LIST_CAP], "removed": removed[:LIST_CAP],
                      "added_count": len(plan.added), "changed_count": len(plan.changed),
                      "removed_count": len(removed), "unchanged_count": plan.unchanged}
    report.pieces_adopted = len(adopted)
    report.shards_adopted = sum(len(w.embed) for w in plan.todo if w.piece.id in adopted)
    embedded = sorted(s.rel for w in todo for s in w.embed)
    report.shards_embedded = embedded[:LIST_CAP]
    report.shards_processed = len(embedded)
    report.shards_skipped = len(shards) - len(embedded) - report.shards_adopted
    progress(f"featx {report.command}: {len(shards)} shards in {len(pieces)} pieces; {len(plan.added)} new, "
             f"{len(plan.changed)} changed, {len(removed)} removed, {plan.unchanged} unchanged; "
             f"{len(embedded)} shards to embed with {spec.name}"
             + (f"; {len(adopted)} pieces finished by a crashed run are adopted" if adopted else ""))

    staging = Staging(cfg.output, report.run_id, cfp, so, cfg.journal_interval_s).start(report.base_snapshot)
    metadata = {**spec.describe(), "embedding_dtype": cfg.embedding_dtype, "featx_version": __version__}
    sink = SinkOptions(output=cfg.output, content_fingerprint=cfp, metadata=metadata,
                       embedding_dtype=cfg.embedding_dtype, storage_options=so, staging=staging.prefix)
    tracker = _Tracker(todo, staging)
    if todo:
        _stream(cfg, spec, report, todo, sink, tracker, t_start)
        failed = [w for w in todo if w.piece.id not in tracker.records]
        if failed:
            _isolate(cfg, spec, report, failed, sink, tracker, progress)
    staging.flush()

    records = [tracker.records[w.piece.id] for w in todo] + list(adopted.values())
    _account(report, todo, tracker, adopted)
    new_parts = _new_parts(todo, tracker)
    report.startup = {**report.startup, **startup_timeline(new_parts, wall_start)}
    _check_error_budget(cfg, report, sink, [p["error_file"] for p in new_parts if p["error_file"]])
    changed = bool(records) or bool(removed) or previous is None or base is None
    if changed:
        dims = {r["dim"] for r in records if r.get("dim")} | ({base["dim"]} if base and base.get("dim") else set())
        if len(dims) > 1:
            raise PipelineError(f"pieces came back with different embedding dims {sorted(dims)}; nothing was published")
        dim = dims.pop() if dims else None
        for r in records:
            r.pop("parts", None)
            r["dim"] = dim
        manifest = commit_run(
            output=cfg.output, lease=lease, base_snapshot=report.base_snapshot, records=records, kept=plan.keep,
            manifest_fields={"run_id": report.run_id, "model": spec.describe() | {"dim": dim},
                             "model_fingerprint": spec.fingerprint(), "content_fingerprint": cfp, "dim": dim,
                             "embedding_dtype": cfg.embedding_dtype, "input_uri": cfg.input, "input_format": cfg.format},
            storage_options=so, keep_snapshots=cfg.keep_snapshots, planned=[s.uri for s in shards], progress=progress,
        )
    else:
        manifest = previous
        progress(f"nothing changed since snapshot {previous['snapshot']}: nothing to publish")
    report.cleanup = clean_up(cfg.output, manifest, cfg.keep_snapshots, so)
    elapsed = time.perf_counter() - t_start
    report.status, report.finished = "succeeded", now()
    report.snapshot = manifest["snapshot"]
    report.published_rows, report.published_error_rows = manifest["rows"], manifest["error_rows"]
    report.seconds = round(elapsed, 3)
    report.rows_per_second = round(report.rows_in / elapsed, 2) if elapsed > 0 else 0.0
    report.storage_retries += retries_done() - driver_retries
    _save_report(cfg, report)


def _confirm_removed(cfg: EmbedConfig, previous: dict[str, Any] | None, removed: list[str]) -> None:
    """A shard of the last snapshot that the listing no longer shows leaves the table only when the store
    confirms it is gone: a listing that failed part-way or came back short is not an emptier input."""
    if not removed or previous is None:
        return
    uris = {s["rel"]: s["uri"] for p in previous["pieces"] for s in p["shards"]}
    present = still_present([uris[r] for r in removed], cfg.storage_options)
    if present:
        raise StorageError(
            f"the listing of {cfg.input!r} came back short: {len(present)} of the {len(removed)} shards it no longer "
            f"shows still exist (e.g. {', '.join(present[:3])}). Removing them would drop their rows, so nothing was "
            "published; rerun (a listing is retried; if it keeps failing, check the store's health)."
        )


def _new_parts(todo: list[PieceWork], tracker: _Tracker) -> list[dict[str, Any]]:
    """This run's part results for rows it embedded (not the carried-over ones)."""
    return [p for w in todo for p in tracker.records[w.piece.id]["parts"] if p is not tracker.carry_parts.get(w.piece.id)]


def _account(report: RunReport, todo: list[PieceWork], tracker: _Tracker, adopted: dict[str, dict[str, Any]]) -> None:
    """Counts of the records this run publishes anew: embedded now, or embedded by a crashed run and adopted."""
    carry = list(tracker.carry_parts.values())
    parts = _new_parts(todo, tracker)
    report.pieces_processed = len(todo)
    report.rows_out = sum(p["rows"] for p in parts) + sum(
        f["rows"] for r in adopted.values() for f in r["files"] if not f.get("carried"))
    report.error_rows = sum(p["error_rows"] for p in parts) + sum(
        f["rows"] for r in adopted.values() for f in r["error_files"] if not f.get("carried"))
    report.rows_in = report.rows_out + report.error_rows
    report.rows_carried = sum(p["rows"] + p["error_rows"] for p in carry)
    report.storage_retries += sum(int(p.get("retries") or 0) for p in parts + carry)
    report.data_files_written = sum(1 for w in todo for p in tracker.records[w.piece.id]["parts"] if p["data_file"])
    report.bytes_written = sum(p["bytes"] for w in todo for p in tracker.records[w.piece.id]["parts"])
    report.stage_seconds = {k: round(sum(p[f"t_{k}"] for p in parts), 3) for k in ("read", "preprocess", "embed", "write")}
    for w in todo:
        for p in tracker.records[w.piece.id]["parts"]:
            report.nodes[p["node_id"]] = report.nodes.get(p["node_id"], 0) + 1
    report.stage_nodes = stage_nodes(parts)
    for p in parts:
        for actor, rows in json.loads(p.get("actors") or "{}").items():
            report.actor_rows[actor] = report.actor_rows.get(actor, 0) + rows
        for size, rows in json.loads(p.get("batch_sizes") or "{}").items():
            report.batch_sizes[size] = report.batch_sizes.get(size, 0) + rows


def startup_timeline(parts: list[dict[str, Any]], wall_start: float) -> dict[str, float]:
    """Seconds from the command's start to the first block preprocessed / actor ready / embedded / written."""
    out: dict[str, float] = {}
    for key, name in (("ts_preprocessed", "first_preprocessed"), ("ts_actor_ready", "first_actor_ready"),
                      ("ts_embedded", "first_embedded"), ("ts_written", "first_written")):
        times = [p[key] for p in parts if p.get(key)]
        if times:
            out[name] = round(min(times) - wall_start, 3)
    return out


def stage_nodes(parts: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Where each stage ran: stage -> node id -> rows (read + preprocess, embed, write); counts, never data."""
    out: dict[str, dict[str, int]] = {"preprocess": {}, "embed": {}, "write": {}}
    for p in parts:
        per_stage = json.loads(p.get("stage_nodes") or "{}")
        per_stage["write"] = {p["node_id"]: p["rows"] + p["error_rows"]}
        for stage, counts in per_stage.items():
            for node, rows in counts.items():
                out[stage][node] = out[stage].get(node, 0) + rows
    return out


def _stream(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, todo: list[PieceWork], sink: SinkOptions,
            tracker: _Tracker, t_start: float) -> None:
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
            report.operators = _operator_names(ds)
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


def _isolate(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, failed: list[PieceWork], sink: SinkOptions,
             tracker: _Tracker, progress: Callable[[str], None]) -> None:
    from pipelines.embed.isolate import isolate

    progress(f"{len(failed)} pieces failed after {cfg.max_task_retries} retries; isolating their bad records")
    expected = sum(r["rows"] + r["error_rows"] for rs in tracker.embed_parts.values() for r in rs)
    iso = isolate(
        failed,
        actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus or None,
                       "resources": cfg.embed_resources or None},
        actor_args={"ropts": read_options(cfg), "sink": sink, "read_pre": read_preprocessing(cfg, spec),
                    "embed_args": embed_actor_args(cfg, spec, report.resources["torch_threads"])},
        sink=sink, max_record_attempts=cfg.max_record_attempts,
        max_quarantined=max(3, int(cfg.max_error_fraction * max(expected, 1))), progress=progress,
    )
    report.quarantined, report.isolation_calls = iso.quarantined, iso.calls
    for w in failed:
        tracker.finish(w.piece.id, iso.results[w.piece.id], read_counts=iso.shard_rows[w.piece.id])


def _check_error_budget(cfg: EmbedConfig, report: RunReport, sink: SinkOptions, error_files: list[str]) -> None:
    """Fail the run (publishing nothing) when more than max_error_fraction of the records it embedded failed.

    Counted: the rows this run embedded and those of adopted pieces (not yet checked by any commit); rows
    carried over unchanged were accepted by an earlier commit.
    """
    rows, errors = report.rows_out, report.error_rows
    if not errors or errors <= cfg.max_error_fraction * (rows + errors):
        return
    import pyarrow.parquet as pq

    from operators.io.storage import get_fs

    kinds: dict[str, int] = {}
    examples: list[str] = []
    for path in error_files:
        fs, p = get_fs(sink.staged(path), cfg.storage_options)
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        for row in t.to_pylist():
            k = f"{row['stage']}/{row['error_type']}"
            kinds[k] = kinds.get(k, 0) + 1
            if len(examples) < 3:
                examples.append(f"{row['key']}: {row['message'][:200]}")
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
