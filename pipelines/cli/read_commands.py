"""`featx query`, `featx sql`, `featx inspect`, `featx index`: reading published tables (no Ray)."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import STORAGE_HELP, featx_errors, print_json, print_rows, say, storage_options


def query(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    text: Optional[str] = typer.Option(None, "--text", help="Query text (embedded with the table's own model)"),
    image: Optional[str] = typer.Option(None, "--image", help="Query image file or URI (embedded with the table's "
                                                              "model)"),
    like: Optional[str] = typer.Option(None, "--like", help="Neighbours of the stored row with this key"),
    k: int = typer.Option(10, "-k", help="How many neighbours"),
    metric: str = typer.Option("cosine", "--metric", help="cosine | dot | l2"),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition on the other columns: --where \"label = "
                                                              "'cat'\""),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Read a kept older snapshot (time travel)"),
    exact: bool = typer.Option(False, "--exact", help="Never use a FAISS index"),
    model: Optional[str] = typer.Option(None, "--model", help="The table's model, where its saved config does not "
                                                              "resolve here"),
    weights: Optional[str] = typer.Option(None, "--weights", help="The table's weights at their path on this machine"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print hits as JSON"),
) -> None:
    """Nearest neighbours of a text, an image or a stored row (exact, or a matching FAISS index)."""
    from pipelines.read.table import open as open_table

    with featx_errors():
        table = open_table(output, snapshot, storage_options(storage))
        if model or weights:
            table.use_encoder(model=model, weights=weights)
        hits = table.search(text=text, image=image, like=like, k=k, metric=metric, where=where,
                            use_index=False if exact else None)
    rows = hits.to_pylist()
    if json_out:
        print_json({"method": hits.method, "note": hits.note, "snapshot": hits.snapshot, "seconds": hits.seconds,
                    "hits": rows})
        return
    say(f"{hits.method}: {hits.note} ({hits.seconds:.3f} s)")
    print_rows([{"rank": i + 1, **r} for i, r in enumerate(rows)],
               f"{output} snapshot {hits.snapshot}: {k} nearest ({metric})")


def sql(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    statement: str = typer.Argument(..., help="SQL over the view `embeddings` (embedding is FLOAT[dim])"),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Read a kept older snapshot"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=STORAGE_HELP),
) -> None:
    """Run DuckDB SQL over the published snapshot (local or object storage)."""
    import duckdb

    from operators.errors import ConfigError, FeatxError
    from pipelines.read.table import open as open_table

    with featx_errors():
        if fmt not in ("table", "csv", "json"):
            raise ConfigError(f"--format must be table, csv or json; got {fmt!r}")
        con = open_table(output, snapshot, storage_options(storage)).duckdb()
        try:
            result = con.sql(statement)
        except duckdb.Error as e:
            raise FeatxError(f"DuckDB refused the statement ({e}); the table is the view `embeddings`") from None
        if result is None:
            return
        rows = [dict(zip(result.columns, r)) for r in result.fetchall()]
    if fmt == "json":
        print_json(rows)
    elif fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)
    else:
        print_rows(rows, f"{len(rows)} rows")


def inspect(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    color: Optional[str] = typer.Option(None, "--color", help="Column that colours the 2-D map"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Save a 2-D PCA map of the vectors to this PNG"),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Inspect a kept older snapshot"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Schema, model, rows, files, vector norms, duplicate keys, and a 2-D map of the embeddings.
    Exit code 1 when the table has problems."""
    from pipelines.read.inspect import inspect_table

    with featx_errors():
        rep = inspect_table(output, snapshot, color=color, plot=plot, storage_options=storage_options(storage))
    if json_out:
        print_json(rep)
    else:
        health = "healthy" if rep["healthy"] else "PROBLEMS"
        t = Table(title=f"{output}: snapshot {rep['snapshot']} ({health})", show_header=False)
        for key, v in rep.items():
            t.add_row(key, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
        Console().print(t)
    if not rep["healthy"]:
        raise typer.Exit(1)


def index(
    output: str = typer.Argument(..., help="Output URI of a featx table"),
    kind: str = typer.Option("ivf", "--kind", help="ivf | hnsw"),
    metric: str = typer.Option("cosine", "--metric", help="cosine | dot | l2 (queries with this metric use it)"),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF lists (default: about sqrt(rows), at most rows / 39 "
                                        "so that each list trains on 39+ vectors)"),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists searched per query (default: nlist / 16 + "
                                                                "4, "
                                         "at most nlist)"),
    hnsw_m: int = typer.Option(32, "--hnsw-m", help="HNSW links per node"),
    ef_search: int = typer.Option(128, "--ef-search", help="HNSW candidates kept per query (higher: better recall, "
                                                           "slower)"),
    storage: list[str] = typer.Option([], "--storage-option", "-o", help=STORAGE_HELP),
) -> None:
    """Build a FAISS index of the published snapshot, stored beside it; `featx query` uses it while that snapshot
    is the one read, with the same metric and no --where (else it searches exactly, and says why)."""
    from pipelines.read.index import build_index

    with featx_errors():
        meta = build_index(output, kind, metric, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
                           storage_options=storage_options(storage), progress=say)
    print_json(meta)
