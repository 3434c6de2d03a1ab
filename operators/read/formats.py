"""The input formats featx reads: one table says, for each, which files it lists, what a record holds and
which config column names its payload. Everything else (listing, readers, config validation, the model
check, the content fingerprint) asks this table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class InputFormat:
    name: str
    extensions: tuple[str, ...]  # file names it lists (case-insensitive)
    modality: Literal["image", "text"]
    payload_column: Literal["image_column", "text_column"] | None  # the config key naming the column, if columnar
    description: str

    @property
    def is_image(self) -> bool:
        return self.modality == "image"


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

FORMATS: dict[str, InputFormat] = {f.name: f for f in (
    InputFormat("images", IMAGE_EXTENSIONS, "image", None, "one image file per record"),
    InputFormat("webdataset", (".tar",), "image", None, "WebDataset tar shards: samples of image + cls/json/txt members"),
    InputFormat("parquet", (".parquet", ".pq"), "text", "text_column", "Parquet with a text column"),
    InputFormat("parquet-images", (".parquet", ".pq"), "image", "image_column",
                "Parquet with image bytes (or a Hugging Face Image struct)"),
    InputFormat("jsonl", (".jsonl", ".json", ".ndjson"), "text", "text_column", "JSON lines with a text field"),
)}
IMAGE_FORMATS: frozenset[str] = frozenset(n for n, f in FORMATS.items() if f.is_image)
TEXT_FORMATS: frozenset[str] = frozenset(n for n, f in FORMATS.items() if not f.is_image)


def input_format(name: str) -> InputFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None
