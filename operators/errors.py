"""Errors that tell the user what was wrong, what was received and how to fix it."""
from __future__ import annotations


class FeatxError(Exception):
    """Base class: every message names the input and how to fix it."""


class ConfigError(FeatxError, ValueError):
    """A config key or value is wrong. Raised before any Ray work starts."""


class UnknownModelError(FeatxError, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(FeatxError):
    """The input cannot be listed or read as the declared format."""


class StorageError(InputError):
    """Object storage failed: a request still failing after bounded retries, access denied, or an object whose
    bytes disagree with its listing. Never a record's fault: the run stops and publishes nothing."""


class ModelLoadError(FeatxError):
    """Weights could not be found or loaded safely."""


class PipelineError(FeatxError):
    """The run could not finish; nothing new was published."""


class CommitRefused(PipelineError):
    """The commit's row accounting disagreed (rows read != rows published + error rows); nothing was published."""
