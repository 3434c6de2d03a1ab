"""``import featx``: the Python entry point for reading featx tables.

    import featx
    t = featx.open("s3://bucket/embeddings")          # the published snapshot (or snapshot=N)
    t.to_arrow(); t.to_numpy(); t.to_torch()           # the table, the vectors
    t.duckdb().sql("SELECT label, count(*) FROM embeddings GROUP BY 1")
    t.search("how do I catch an exception", k=10)     # embedded with the table's own model

Installed as the top-level package ``featx`` (pyproject maps it to this folder).
"""
from pipelines import __version__
from pipelines.read.table import FeatxTable, Hits, open

__all__ = ["FeatxTable", "Hits", "open", "__version__"]
