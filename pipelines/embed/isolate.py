"""Quarantine of records that crash their worker: re-run failed pieces in small slices, then record by record.

The streaming pass gives each task a bounded number of retries (``max_task_retries``). A piece whose
block still fails (its worker died each time: a native decoder crash, an out-of-memory kill; or an
exception no operator turned into an error row) comes back here. One isolation actor (model loaded
lazily, restarted by Ray after each crash) processes the piece's shards in halving slices: slices that
succeed are written as parts of the piece as usual; a slice that fails is split; a single record that
fails ``max_record_attempts`` times alone is quarantined as an error row (stage ``worker``). So a poison
record costs O(log n) retries and its piece is still published without it, instead of failing the job
forever. Storage errors are not a record's fault: they stop the run (nothing is published; rerun).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from operators import columns as C
from operators.embed.embedder import EmbedActor
from operators.errors import PipelineError, StorageError
from operators.models.specs import ImagePreprocess, TextPreprocess
from operators.read.readers import ReadOptions, read_shard
from operators.write.sink import SinkOptions, write_error_rows, write_piece
from pipelines.embed.plan import PieceWork


class Isolator:
    """Ray actor: read a shard once (cached), then preprocess + embed + write any slice of it."""

    def __init__(self, ropts: ReadOptions, sink: SinkOptions, read_pre: ImagePreprocess | TextPreprocess | None,
                 embed_args: dict[str, Any]) -> None:
        self.ropts, self.sink, self.read_pre = ropts, sink, read_pre
        self.embed_args = embed_args  # EmbedActor's, as the streaming pool builds it
        self._embedder: EmbedActor | None = None
        self._raw: dict[str, pa.Table] = {}

    def _table(self, shard: dict[str, Any]) -> pa.Table:
        if shard["uri"] not in self._raw:
            self._raw = {shard["uri"]: read_shard(shard["uri"], shard["rel"], self.ropts, shard.get("size"))}  # one at a time
        return self._raw[shard["uri"]]

    def ready(self) -> bool:
        return True

    def count(self, shard: dict[str, Any]) -> int:
        return self._table(shard).num_rows

    def keys(self, shard: dict[str, Any], lo: int, hi: int) -> list[tuple[str, str]]:
        t = self._table(shard).slice(lo, hi - lo)
        return list(zip(t[C.KEY].to_pylist(), t[C.SOURCE].to_pylist()))

    def process(self, piece: str, shard: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
        from operators.read.loading import prepare_rows
        from operators.watchdog import Watchdog

        table = self._table(shard)
        if self._embedder is None:  # the model loads outside the deadline
            self._embedder = EmbedActor(**self.embed_args)
        # a slice still running past its deadline kills this actor (the driver sees a hang: WorkerHung)
        with Watchdog("isolate", self.embed_args.get("task_timeout_s"), f"isolating rows {lo}-{hi} of {shard['rel']}") as wd:
            wd.size(hi - lo)
            rows = prepare_rows(table.slice(lo, hi - lo), piece, self.read_pre, 0.0,
                                shard_rows={shard["uri"]: table.num_rows})
            out = write_piece(self._embedder(rows), self.sink).to_pylist()
        return out[0] if out else {}


@dataclass
class Isolation:
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # piece id -> part results
    shard_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # piece id -> shard uri -> records read
    quarantined: int = 0
    calls: int = 0
    crashes: int = 0
    hangs: int = 0  # calls that hung (no result by their deadline)


def _is_storage_error(e: BaseException) -> bool:
    cause = getattr(e, "cause", None) or e
    return isinstance(cause, (OSError, StorageError))


def isolate(failed: list[PieceWork], actor_options: dict[str, Any], actor_args: dict[str, Any], sink: SinkOptions,
            max_record_attempts: int, max_quarantined: int,
            progress: Callable[[str], None] = print, task_timeout_s: float = 0.0,
            seconds_per_row: float | None = None) -> Isolation:
    """Rebuild the ``failed`` pieces slice by slice; quarantine the records that fail alone every time.

    Each call has a deadline (:func:`operators.watchdog.deadline_for`: ``task_timeout_s`` as the floor, the
    stream's measured ``seconds_per_row``): a call with no result by then hung; its actor is killed and
    restarted, and a record that hangs alone every time is quarantined as ``WorkerHung``."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from operators.watchdog import deadline_for

    iso = Isolation()
    actor = ray.remote(Isolator).options(max_restarts=-1, max_task_retries=0, **actor_options).remote(**actor_args)

    def wait_restarted() -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=60)
                return
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise PipelineError("the isolation actor did not come back after a crash within 300 s") from None
                time.sleep(0.5)

    hung: dict[str, bool] = {"last": False}  # whether the last failed call hung (else it crashed or raised)

    def call(method: str, *args: Any, rows: int = 0) -> tuple[bool, Any]:
        iso.calls += 1
        hung["last"] = False
        limit = deadline_for(rows, seconds_per_row, task_timeout_s) + 30.0 if task_timeout_s else None
        t0 = time.monotonic()
        try:
            return True, ray.get(getattr(actor, method).remote(*args), timeout=limit)
        except GetTimeoutError:  # no result by its deadline: stuck; kill it (the actor restarts)
            iso.crashes += 1
            iso.hangs += 1
            hung["last"] = True
            ray.kill(actor, no_restart=False)
            wait_restarted()
            return False, f"no result after {time.monotonic() - t0:.0f} s (task_timeout_s={task_timeout_s:g}): the worker hung"
        except RayActorError as e:  # the worker process died (or its node went away)
            iso.crashes += 1
            # killed by its own watchdog (operators.watchdog): a deadline passed, the work hung
            hung["last"] = bool(task_timeout_s) and time.monotonic() - t0 >= task_timeout_s
            iso.hangs += int(hung["last"])
            wait_restarted()  # so the next try meets a live actor, not the restart
            what = "the worker hung and was killed at its deadline" if hung["last"] else "the worker process died"
            return False, f"{what}: {str(e).splitlines()[0][:300]}"
        except RayTaskError as e:
            if _is_storage_error(e):
                raise StorageError(f"storage failed while re-running a failed piece; nothing was published: "
                                   f"{getattr(e, 'cause', e)}") from e
            return False, f"{type(getattr(e, 'cause', e)).__name__}: {str(getattr(e, 'cause', e))[:300]}"

    try:
        for w in failed:
            parts: list[dict[str, Any]] = []
            quarantine: list[dict[str, Any]] = []
            counts = iso.shard_rows.setdefault(w.piece.id, {})
            for s in w.embed:
                shard = s.to_dict()
                ok, n = False, None
                for _ in range(max_record_attempts):
                    ok, n = call("count", shard)
                    if ok:
                        break
                if not ok:  # reading the shard kills its worker: the shard is one error row, as any unreadable shard
                    counts[s.uri] = 1  # that row stands for the shard's records (none could be read)
                    quarantine.append({C.KEY: f"{s.rel}#shard", C.SOURCE: s.uri, "stage": "read",
                                       "error_type": "WorkerCrashed",
                                       "message": f"reading shard {s.uri} failed {max_record_attempts} times: {n}"})
                    iso.quarantined += 1
                    continue
                counts[s.uri] = int(n)
                stack = [(0, int(n))]
                while stack:
                    lo, hi = stack.pop()
                    if hi <= lo:
                        continue
                    tries = max_record_attempts if hi - lo == 1 else 1
                    for _ in range(tries):
                        ok, res = call("process", w.piece.id, shard, lo, hi, rows=hi - lo)
                        if ok:
                            break
                    if ok:
                        if res:
                            parts.append(res)
                        continue
                    if hi - lo > 1:
                        mid = (lo + hi) // 2
                        stack += [(mid, hi), (lo, mid)]
                        continue
                    kind = "WorkerHung" if hung["last"] else "WorkerCrashed"
                    _, keys = call("keys", shard, lo, hi)
                    key, source = keys[0] if isinstance(keys, list) and keys else (f"{s.rel}#{lo}", s.uri)
                    quarantine.append({C.KEY: key, C.SOURCE: source, "stage": "worker", "error_type": kind,
                                       "message": f"record {key!r} failed {tries} times alone (after its block's "
                                                  f"retries): {res}"})
                    iso.quarantined += 1
                    progress(f"quarantined {key!r}: {res}")
                    if iso.quarantined > max_quarantined:
                        raise PipelineError(
                            f"{iso.quarantined} records each failed their worker on their own, more than the error "
                            f"budget allows ({max_quarantined}); this looks systemic, not a few bad records. Last: "
                            f"{key!r}: {res}. Nothing was published; check the workers' logs."
                        )
            if quarantine:
                parts.append(write_error_rows(w.piece.id, quarantine, sink))
            iso.results[w.piece.id] = parts
    finally:
        ray.kill(actor)
    return iso

