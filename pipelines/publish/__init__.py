"""Publishing an output exactly once: the manifest that says what is published (``manifest``), staging,
journal and commit (``commit``), one writer at a time (``lease``), and what `featx status` reports
(``status``)."""
