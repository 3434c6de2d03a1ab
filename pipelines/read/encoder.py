"""Embed a search query exactly as a table's rows were embedded, or refuse.

The spec is rebuilt from the config the run saved beside its output (``_config.json``, overridable with
``model`` / ``weights`` when the weights live elsewhere on this machine); its weights and preprocessing
fingerprints must equal those the snapshot's manifest records. Local weights are fingerprinted by content,
so a copy at another path matches, and changed weights do not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from operators import columns as C
from operators.embed.embedder import embed_table
from operators.errors import InputError
from operators.io.storage import read_bytes
from operators.models.registry import load
from operators.models.specs import ImagePreprocess, ModelSpec
from operators.preprocess.transforms import preprocess_images, preprocess_text
from operators.search.topk import vectors_from_arrow
from pipelines.config import config_from_output, model_spec
from pipelines.read.snapshot import Snapshot


def check_same_model(spec: ModelSpec, recorded: dict[str, Any], where: str) -> None:
    """Refuse a query model whose vectors would not be comparable with the table's."""
    problems = []
    if recorded.get("weights_fingerprint") != spec.fingerprint():
        problems.append(f"weights/forward settings {spec.fingerprint()} (model {spec.name!r}, pooling {spec.pooling}, "
                        f"normalize {spec.normalize}) vs the table's {recorded.get('weights_fingerprint')} "
                        f"(model {recorded.get('model')!r}, pooling {recorded.get('pooling')}, normalize {recorded.get('normalize')})")
    if recorded.get("preprocessing_fingerprint") != spec.preprocessing_fingerprint():
        problems.append(f"preprocessing {spec.preprocessing_fingerprint()} vs the table's {recorded.get('preprocessing_fingerprint')}")
    if problems:
        raise InputError(
            f"the query would be embedded differently from {where}: " + "; ".join(problems)
            + ". Its scores would be meaningless. Pass the table's model and weights (--model/--weights), "
            "or search with a vector computed by that model."
        )


class QueryEncoder:
    """The table's model, loaded once, for text or image queries."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.backbone = load(spec, "cpu", for_inference=True)

    @classmethod
    def for_table(cls, table: Snapshot, model: str | None = None, weights: str | None = None) -> "QueryEncoder":
        """The encoder for a table's snapshot: the model its run saved (or ``model`` / ``weights``), checked."""
        cfg = config_from_output(table.output, {"model": model, "weights": weights,
                                                "storage_options": table.storage_options or None})
        spec = model_spec(cfg)
        check_same_model(spec, table.model, f"snapshot {table.snapshot} of {table.output!r}")
        return cls(spec)

    def embed(self, text: str | None = None, image: str | bytes | Path | None = None) -> np.ndarray:
        is_image = isinstance(self.spec.preprocessing, ImagePreprocess)
        if (image is not None) != is_image:
            kind = "an image" if is_image else "a text"
            raise InputError(f"this table was embedded with {kind} model ({self.spec.name}); "
                             f"query it with {'--image' if is_image else '--text'}")
        if image is not None:
            payload: Any = image if isinstance(image, bytes) else read_bytes(str(image))
            if payload is None:
                raise InputError(f"query image {str(image)!r} does not exist")
        else:
            payload = text
        n = pa.array([None], pa.string())
        raw = pa.table({C.KEY: ["query"], C.SOURCE: ["query"],
                        C.PAYLOAD: pa.array([payload], pa.binary() if is_image else pa.string()),
                        C.ERR_STAGE: n, C.ERR_TYPE: n, C.ERR_MSG: n})
        pre = self.spec.preprocessing
        prepared = preprocess_images(raw, pre) if is_image else preprocess_text(raw, pre)
        out = embed_table(self.backbone, prepared, batch_size=1)
        if out[C.ERR_STAGE][0].is_valid:
            raise InputError(f"the query could not be embedded: {out[C.ERR_MSG][0].as_py()}")
        return vectors_from_arrow(out[C.EMBEDDING], self.backbone.dim)[0]
