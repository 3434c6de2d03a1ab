"""Reading published tables: ``featx.open`` and search (``table``), the surface of an open snapshot that the
index and the encoder use (``snapshot``), FAISS indexes stored beside a table (``stored_index``: lookup and
search; ``index``: `featx index`), query embedding with the table's own model (``encoder``), and `featx
inspect` (``inspect``)."""
