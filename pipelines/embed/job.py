"""`featx embed` / `featx refresh`: shards in storage -> CPU read/preprocess tasks -> GPU/CPU actors -> Parquet.

The driver takes the output's lease, lists the input once, compares it with the published manifest
(only new and changed shards are embedded; unchanged shards' rows are kept or carried over; removed
shards leave the table; a different model/preprocessing re-embeds everything), adopts pieces that a
crashed run finished, runs one streaming Ray Data job for the rest, journals each finished piece,
isolates records that crash their workers, and commits by writing the manifest last
(:mod:`pipelines.publish.commit`). It receives counts, never rows.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from operators.errors import ConfigError, InputError, PipelineError, StorageError
from operators.io.parquet import read_parquet
from operators.io.storage import join, retries_done, still_present
from operators.models.specs import ModelSpec
from operators.write.sink import SinkOptions
from pipelines import __version__
from pipelines.config import EmbedConfig, model_spec, read_options
from pipelines.embed.dryrun import HISTORY_RUNS, estimate, survey, work_of
from pipelines.embed.plan import PieceWork, content_fingerprint
from pipelines.embed.report import LIST_CAP, RunReport, account, new_parts, save_report, startup_timeline
from pipelines.embed.stream import embed_actor_args, read_preprocessing, stream_pieces
from pipelines.embed.tracker import Tracker
from pipelines.publish.commit import Staging, adoptable, clean_up, commit_run
from pipelines.publish.delta import mirror
from pipelines.publish.lease import Lease
from pipelines.publish.manifest import load_manifest, now
from pipelines.publish.status import run_reports


def _check_output_outside_input(cfg: EmbedConfig) -> None:
    src = cfg.input.split("*", 1)[0].rstrip("/") + "/"
    dst = cfg.output.rstrip("/") + "/"
    if dst.startswith(src) or src.startswith(dst):
        raise ConfigError(
            f"output {cfg.output!r} lies inside input {cfg.input!r} (or the other way round): a later run would read "
            "its own output as input. Choose an output prefix outside the input."
        )


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
    log_mark = getattr(progress, "log_mark", lambda: None)()  # Ray's output kept out of sight: this run's share
    if lease.taken_over is not None:
        report.lease_taken_over = lease.taken_over.describe()
        progress(f"took over a stale lease of {report.lease_taken_over}")
    try:
        _run(cfg, spec, report, lease, progress, t_start, wall_start, log_mark)
    except BaseException as e:
        report.status, report.finished, report.error = "failed", now(), str(e)[:4000]
        report.lease_renewals = lease.renewals
        keep_log(cfg, report, progress, log_mark)
        try:
            save_report(cfg, report)
        except StorageError:  # the store that failed the run may refuse the report too: the run's error matters
            pass
        raise
    finally:
        lease.release()
    return report.to_dict()


def keep_log(cfg: EmbedConfig, report: RunReport, progress: Callable[[str], None], mark: int | None) -> None:
    """Ray's output during the run, when the command kept it off the console (pipelines/cli/raylog.py), beside
    the run's report: ``_runs/<run id>.log`` (the report's ``log``). The display writes it, best effort
    (pipelines/cli/display.py: a log that cannot be written never fails the run)."""
    keep = getattr(progress, "keep_log", None)
    if keep is not None:
        report.log = keep(mark, join(cfg.output, "_runs", f"{report.run_id}.log"), cfg.storage_options) or ""


def _run(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, lease: Lease, progress: Callable[[str], None],
         t_start: float, wall_start: float, log_mark: int | None = None) -> None:
    so = dict(cfg.storage_options)
    cfp = report.content_fingerprint
    driver_retries = retries_done()
    previous = load_manifest(cfg.output, so)
    if report.command == "refresh" and previous is None:
        raise InputError(f"nothing is published at {cfg.output!r} yet, so there is nothing to refresh; "
                         "run `featx embed` with this config first")
    # a run killed between its manifest and its Delta commit, or a table from before Delta logs: catch up first
    report.delta = mirror(cfg.output, previous, so, cfg.keep_snapshots, progress)
    shards, pieces, previous, base, plan, removed = survey(cfg, cfp)
    if previous and base is None:
        report.reembed_reason = ("the model, its preprocessing, the embedding dtype or the read options changed: "
                                 "every shard is embedded again into a new snapshot")
        progress(report.reembed_reason)
    report.base_snapshot = (previous or {}).get("snapshot", 0)
    # the time `featx plan` would have predicted: the report compares it with the run's own
    report.estimate = estimate(work_of(plan, previous, base, removed), run_reports(cfg.output, so, last=HISTORY_RUNS),
                               spec.name)
    adopted = adoptable(cfg.output, cfp, {w.piece.id for w in plan.todo}, report.run_id, so)
    todo = [w for w in plan.todo if w.piece.id not in adopted]
    _confirm_removed(cfg, previous, removed)
    report.shards_total, report.pieces_total = len(shards), len(pieces)
    report.changes = {"added": plan.added[:LIST_CAP], "changed": plan.changed[:LIST_CAP], "removed": removed[:LIST_CAP],
                      "added_count": len(plan.added), "changed_count": len(plan.changed),
                      "removed_count": len(removed), "unchanged_count": plan.unchanged}
    report.pieces_adopted = len(adopted)
    report.shards_adopted = sum(len(w.embed) for w in plan.todo if w.piece.id in adopted)
    embedded = sorted(s.rel for w in todo for s in w.embed)
    report.bytes_embedded = sum(s.size for w in todo for s in w.embed)
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
    tracker = Tracker(todo, staging)
    if todo:
        stream_pieces(cfg, spec, report, todo, sink, tracker, t_start, base, progress)
        awaiting = tracker.awaiting_fill()  # rows held back for a representative in another block
        failed = [w for w in todo if w.piece.id not in tracker.records and w.piece.id not in awaiting]
        if failed:
            _isolate(cfg, spec, report, failed, sink, tracker, progress)
        if awaiting:
            from pipelines.embed.reuse import fill_pieces

            report.reuse["filled"] = fill_pieces(cfg, tracker, sink, awaiting)
    staging.flush()

    records = [tracker.records[w.piece.id] for w in todo] + list(adopted.values())
    account(report, todo, tracker, adopted)
    if todo:
        progress(f"rows read {report.rows_in}: embedded by the model {report.rows_embedded}, reused from the snapshot "
                 f"{report.rows_reused}, deduplicated in the run {report.rows_deduped}, errors {report.error_rows}; "
                 f"carried over {report.rows_carried}")
    fresh = new_parts(todo, tracker)
    report.startup = {**report.startup, **startup_timeline(fresh, wall_start)}
    _check_error_budget(cfg, report, sink, [p["error_file"] for p in fresh if p["error_file"]])
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
        caught_up = report.delta.get("written", [])
        report.delta = mirror(cfg.output, manifest, so, cfg.keep_snapshots, progress)  # right after the manifest
        report.delta["written"] = caught_up + report.delta.get("written", [])
    else:
        manifest = previous
        progress(f"nothing changed since snapshot {previous['snapshot']}: nothing to publish")
    report.cleanup = clean_up(cfg.output, manifest, cfg.keep_snapshots, so)
    elapsed = time.perf_counter() - t_start
    report.status, report.finished = "succeeded", now()
    report.snapshot = manifest["snapshot"]
    report.published_rows, report.published_error_rows = manifest["rows"], manifest["error_rows"]
    report.seconds = round(elapsed, 3)
    if report.estimate.get("seconds"):
        report.estimate["measured_seconds"] = report.seconds
        report.estimate["error"] = round(report.seconds / report.estimate["seconds"] - 1, 3)
    report.rows_per_second = round(report.rows_in / elapsed, 2) if elapsed > 0 else 0.0
    report.storage_retries += retries_done() - driver_retries
    report.lease_renewals = lease.renewals
    if todo:  # the run used Ray: its figures go to the cluster's metrics too
        from pipelines.embed.metrics import publish

        report.metrics = publish(report.to_dict())
    keep_log(cfg, report, progress, log_mark)
    save_report(cfg, report)


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


def _isolate(cfg: EmbedConfig, spec: ModelSpec, report: RunReport, failed: list[PieceWork], sink: SinkOptions,
             tracker: Tracker, progress: Callable[[str], None]) -> None:
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
        task_timeout_s=cfg.task_timeout_s, seconds_per_row=_seconds_per_row(tracker),
    )
    report.quarantined, report.isolation_calls, report.isolation_hangs = iso.quarantined, iso.calls, iso.hangs
    for w in failed:
        tracker.finish(w.piece.id, iso.results[w.piece.id], read_counts=iso.shard_rows[w.piece.id])


def _seconds_per_row(tracker: Tracker) -> float | None:
    """The stream's measured seconds per row (read + preprocess + embed), from the parts written so far."""
    parts = [p for ps in tracker.embed_parts.values() for p in ps]
    rows = sum(p["rows"] + p["error_rows"] for p in parts)
    seconds = sum(float(p.get("t_read") or 0) + float(p.get("t_preprocess") or 0) + float(p.get("t_embed") or 0)
                  for p in parts)
    return seconds / rows if rows and seconds else None


def _check_error_budget(cfg: EmbedConfig, report: RunReport, sink: SinkOptions, error_files: list[str]) -> None:
    """Fail the run (publishing nothing) when more than max_error_fraction of the records it embedded failed.

    Counted: the rows this run embedded and those of adopted pieces (not yet checked by any commit); rows
    carried over unchanged were accepted by an earlier commit.
    """
    rows, errors = report.rows_out, report.error_rows
    if not errors or errors <= cfg.max_error_fraction * (rows + errors):
        return
    kinds: dict[str, int] = {}
    examples: list[str] = []
    for path in error_files:
        for row in read_parquet(sink.staged(path), cfg.storage_options).to_pylist():
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


