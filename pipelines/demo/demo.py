"""`featx demo`: a small real dataset (no network), embedded with the embedded default models."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pipelines.config import build_config
from pipelines.embed.job import run_embed
from pipelines.read.table import duckdb_connection
from pipelines.demo.sample_data import write_image_tars, write_text_shards


def run_demo(folder: str | Path = "featx-demo", say: Callable[[str], None] = print) -> dict[str, Any]:
    root = Path(folder).resolve()
    say(f"[1/4] writing sample data under {root}")
    images = write_image_tars(root / "input" / "images", per_photo=8, shards=3)
    text = write_text_shards(root / "input" / "text", fmt="jsonl", shards=4, max_per_topic=12)
    say(f"      {images['records']} image crops of {len(images['labels'])} scikit-image photos in {images['shards']} WebDataset tars")
    say(f"      {text['records']} sentences of Python's documentation in {text['shards']} JSONL shards")

    img_out, txt_out = root / "output" / "images", root / "output" / "text"
    say("[2/4] embedding the images with efficientnet-lite0 (Ray Data; progress below, Ray's own log in the output's _runs/)")
    img_cfg = build_config("image-efficientnet.yaml", {"input": images["path"], "output": str(img_out)})
    img_report = run_embed(img_cfg, progress=say)
    say(f"      {img_report['rows_out']} rows, {img_report['error_rows']} errors, {img_report['rows_per_second']} rows/s")

    say("[3/4] embedding the text with minilm-l6")
    txt_cfg = build_config("text-minilm.yaml", {"input": text["path"], "output": str(txt_out), "passthrough": ["id", "label"]})
    txt_report = run_embed(txt_cfg, progress=say)
    say(f"      {txt_report['rows_out']} rows, {txt_report['error_rows']} errors, {txt_report['rows_per_second']} rows/s")

    say("[4/4] a DuckDB query over the output: the 5 nearest neighbours of one sentence")
    con = duckdb_connection(str(txt_out))
    key, label = con.execute("SELECT key, label FROM embeddings ORDER BY key LIMIT 1").fetchone()
    sql = ("SELECT key, label, array_cosine_similarity(embedding, (SELECT embedding FROM embeddings WHERE key = ?)) AS score "
           "FROM embeddings ORDER BY score DESC LIMIT 5")
    rows = con.execute(sql, [key]).fetchall()
    say(f"      query row {key!r} (topic {label!r}):")
    for k, lab, score in rows:
        say(f"        {score:6.3f}  {lab:<24} {k}")
    dim = con.execute("SELECT len(embedding) FROM embeddings LIMIT 1").fetchone()[0]
    say("")
    say(f"Delta Lake tables: {img_out}  and  {txt_out}  (each featx snapshot is one Delta version; never glob "
        "the data folder: it keeps older snapshots' files for time travel)")
    say("Try it yourself:")
    say(f"  featx sql {txt_out} \"SELECT label, count(*) FROM embeddings GROUP BY 1\"")
    say(f"  python -c \"import polars as pl; print(pl.read_delta('{txt_out}', use_pyarrow=True).head())\"")
    say(f"  duckdb -c \"INSTALL delta; LOAD delta; SELECT key, label, array_cosine_similarity(embedding::FLOAT[{dim}], "
        f"(SELECT embedding::FLOAT[{dim}] FROM delta_scan('{txt_out}') LIMIT 1)) AS s "
        f"FROM delta_scan('{txt_out}') ORDER BY s DESC LIMIT 5\"")
    return {"images": img_report, "text": txt_report, "neighbours": rows}
