"""The run report: what a run did, counted from its parts (never from rows at the driver)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from operators.io.storage import join, write_bytes
from pipelines.config import EmbedConfig
from pipelines.embed.plan import PieceWork
from pipelines.embed.tracker import Tracker

LIST_CAP = 10_000  # most shard paths listed per kind in a run report


@dataclass
class RunReport:
    run_id: str
    output: str
    started: str
    command: str = "embed"
    finished: str = ""
    status: str = "running"
    error: str = ""
    log: str = ""  # Ray's output during the run, when the command kept it off the console (_runs/<run id>.log)
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
    # of rows_out: embedded by the model, took the snapshot's stored vector (same content), or copied the vector
    # of the same content elsewhere in the run (reuse: content)
    rows_embedded: int = 0
    rows_reused: int = 0
    rows_deduped: int = 0
    reuse: dict[str, Any] = field(default_factory=dict)  # the lookup: partitions, snapshot rows, hits, seconds
    slow_blocks: list[dict[str, Any]] = field(default_factory=list)  # the slow tail, as the progress line named it
    quarantined: int = 0
    isolation_hangs: int = 0  # isolation calls that hung past their deadline (their records: WorkerHung)  # records that crashed their worker every time and went to _errors
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
    delta: dict[str, Any] = field(default_factory=dict)  # the Delta log after the run (pipelines.publish.delta)
    metrics: dict[str, float] = field(default_factory=dict)  # what went to Ray's metrics (pipelines.embed.metrics)
    estimate: dict[str, Any] = field(default_factory=dict)  # featx plan's time for this run, and the time it took
    bytes_embedded: int = 0  # input bytes of the shards this run embedded
    lease_taken_over: str = ""
    lease_renewals: int = 0  # heartbeats that extended this run's lease

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def new_parts(todo: list[PieceWork], tracker: Tracker) -> list[dict[str, Any]]:
    """This run's part results for rows it embedded (not the carried-over ones)."""
    return [p for w in todo for p in tracker.records[w.piece.id]["parts"] if p is not tracker.carry_parts.get(w.piece.id)]


def account(report: RunReport, todo: list[PieceWork], tracker: Tracker, adopted: dict[str, dict[str, Any]]) -> None:
    """Counts of the records this run publishes anew: embedded now, or embedded by a crashed run and adopted."""
    carry = list(tracker.carry_parts.values())
    parts = new_parts(todo, tracker)
    report.pieces_processed = len(todo)
    report.rows_out = sum(p["rows"] for p in parts) + sum(
        f["rows"] for r in adopted.values() for f in r["files"] if not f.get("carried"))
    report.error_rows = sum(p["error_rows"] for p in parts) + sum(
        f["rows"] for r in adopted.values() for f in r["error_files"] if not f.get("carried"))
    report.rows_in = report.rows_out + report.error_rows
    report.rows_reused = sum(int(p.get("reused_rows") or 0) for p in parts)
    report.rows_deduped = sum(int(p.get("deduped_rows") or 0) for p in parts)
    report.rows_embedded = sum(p["rows"] for p in parts) - report.rows_reused - report.rows_deduped  # not adopted ones
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


def save_report(cfg: EmbedConfig, report: RunReport) -> None:
    body = json.dumps(report.to_dict(), indent=1).encode()
    write_bytes(join(cfg.output, "_report.json"), body, cfg.storage_options)
    write_bytes(join(cfg.output, "_runs", f"{report.run_id}.json"), body, cfg.storage_options)
    write_bytes(join(cfg.output, "_config.json"), json.dumps(cfg.public_dict(), indent=1).encode(), cfg.storage_options)

