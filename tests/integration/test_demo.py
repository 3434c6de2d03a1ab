"""`featx demo`: real weights end to end on the bundled sample data, with a DuckDB query at the end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.demo.demo import run_demo
from pipelines.publish.manifest import load_manifest
from pipelines.read.table import read_table

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_demo_embeds_real_images_and_text(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", say=lines.append)
    img, txt = result["images"], result["text"]
    assert img["status"] == txt["status"] == "succeeded"
    assert img["error_rows"] == txt["error_rows"] == 0
    images = read_table(str(tmp_path / "demo" / "output" / "images"))
    assert images.num_rows == img["rows_in"] == 18 * 8
    assert images.schema.field("embedding").type.list_size == 1280
    # pretrained features separate the photos: each crop's nearest other crop is mostly from its own photo
    emb = np.array(images["embedding"].to_pylist())
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    labels = np.array(images["cls"].to_pylist())
    assert (labels[sim.argmax(1)] == labels).mean() > 0.8
    text_manifest = load_manifest(str(tmp_path / "demo" / "output" / "text"))
    assert text_manifest["dim"] == 384 and text_manifest["rows"] == txt["rows_in"] > 500
    # the query's nearest neighbour is itself, and the printed guide names the Parquet and the cast
    assert result["neighbours"][0][2] == pytest.approx(1.0, abs=1e-4)
    out = "\n".join(lines)
    assert "FLOAT[384]" in out and "data/" in out
