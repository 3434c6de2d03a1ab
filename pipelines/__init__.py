"""featx pipelines: assembled jobs (embed, demo), their config, the manifest and the CLI."""

__version__ = "0.1.0"
