"""``python -m pipelines.cli``: the `featx` command without the console script (shipped code on clusters)."""
from pipelines.cli.app import main

main()
