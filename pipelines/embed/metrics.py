"""A run's figures on the cluster's dashboards: Ray's metrics API (``ray.util.metrics``).

At the end of each run that used Ray, the driver records the run's counters (rows read, embedded by the
model, reused, deduplicated, errored, carried; storage retries; quarantined records), the rows per second
of each stage, the rows at each batch size and the run's seconds, tagged with the output and the command.
Ray's metrics agent on the node exports them with Ray's own metrics (Prometheus format, at the node's
metrics export port; the cluster's Prometheus/Grafana scrape it: cluster/README.md). Names start with
``featx_``; counters end with ``_total`` as Prometheus shows them.
"""
from __future__ import annotations

from typing import Any

TAGS = ("output", "command")
COUNTERS = {  # metric name -> (report field, description)
    "featx_rows_read": ("rows_in", "records read from the shards a run embedded"),
    "featx_rows_embedded": ("rows_embedded", "records embedded by the model"),
    "featx_rows_reused": ("rows_reused", "records that took a stored vector of the same content"),
    "featx_rows_deduplicated": ("rows_deduped", "records that copied the vector of the same content in the run"),
    "featx_error_rows": ("error_rows", "records that failed (error rows)"),
    "featx_rows_carried": ("rows_carried", "rows carried over from unchanged shards"),
    "featx_storage_retries": ("storage_retries", "storage requests retried"),
    "featx_quarantined": ("quarantined", "records that crashed or hung their worker and were quarantined"),
}
_metrics: dict[str, Any] = {}


def _get(kind: str, name: str, description: str, tags: tuple[str, ...]) -> Any:
    from ray.util import metrics

    if name not in _metrics:
        _metrics[name] = getattr(metrics, kind)(name, description=description, tag_keys=tags)
    return _metrics[name]


def publish(report: dict[str, Any]) -> dict[str, float]:
    """Record ``report``'s figures with Ray's metrics API (Ray must be up); returns what was recorded."""
    tags = {"output": str(report.get("output")), "command": str(report.get("command"))}
    recorded: dict[str, float] = {}
    for name, (field, description) in COUNTERS.items():
        value = float(report.get(field) or 0)
        if value > 0:  # a counter only goes up
            _get("Counter", name, description, TAGS).inc(value, tags=tags)
        recorded[name] = value
    seconds = float(report.get("seconds") or 0)
    _get("Gauge", "featx_run_seconds", "seconds of the last run", TAGS).set(seconds, tags=tags)
    recorded["featx_run_seconds"] = seconds
    rate = _get("Gauge", "featx_stage_rows_per_second", "rows per second of each stage (summed over its tasks)",
                (*TAGS, "stage"))
    rows = float(report.get("rows_in") or 0)
    for stage, secs in (report.get("stage_seconds") or {}).items():
        if secs:
            rate.set(rows / secs, tags={**tags, "stage": stage})
            recorded[f"featx_stage_rows_per_second:{stage}"] = rows / secs
    batches = _get("Gauge", "featx_batch_size_rows", "rows embedded at each batch size (autotuning)",
                   (*TAGS, "batch_size"))
    for size, n in (report.get("batch_sizes") or {}).items():
        batches.set(float(n), tags={**tags, "batch_size": str(size)})
    return recorded
