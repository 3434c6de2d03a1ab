"""The small public surface of an open table that the index lookup and the query encoder read.

:class:`pipelines.read.table.FeatxTable` has it; :mod:`pipelines.read.stored_index` and
:mod:`pipelines.read.encoder` ask for no more, so neither imports the table module (which uses them).
"""
from __future__ import annotations

from typing import Any, Protocol


class Snapshot(Protocol):
    """One published snapshot of a table: where it is, what it holds, and the indexes loaded for it."""

    output: str  # the table's URI
    storage_options: dict[str, Any]
    manifest: dict[str, Any]  # the snapshot's manifest: its files (with row counts), content fingerprint
    snapshot: int
    rows: int
    files: list[str]  # the data files' URIs, in manifest order
    model: dict[str, Any]  # the model the rows were embedded with, as the manifest records it
    indexes: dict[Any, Any]  # FAISS indexes loaded for this handle (filled by pipelines.read.stored_index)

    @property
    def columns(self) -> list[str]: ...
