"""featx's side of a comparison with an independent reference: the vectors the embed job computes, in process."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from operators.embed.embedder import EmbedActor
from operators.read.loading import load_piece
from pipelines.config import build_config, model_spec, read_options
from pipelines.embed.stream import embed_actor_args, read_preprocessing


def featx_vectors(files: list[Path], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """key -> vector, as the embed job's read stage and embedding actor compute them."""
    config = build_config(None, {"output": "/unused", **cfg})
    spec = model_spec(config)
    shards = [{"uri": str(f), "rel": f.name, "size": f.stat().st_size} for f in files]
    rows = load_piece(shards, "p", read_options(config), read_preprocessing(config, spec))
    out = EmbedActor(**embed_actor_args(config, spec, torch_threads=2))(rows)
    assert out["_err_stage"].null_count == out.num_rows, "featx turned a record into an error row"
    return dict(zip(out["key"].to_pylist(), np.asarray(out["embedding"].to_pylist(), dtype=np.float32)))
