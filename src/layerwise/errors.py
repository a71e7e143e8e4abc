"""Errors a user can cause and fix. Each carries one line saying what is wrong and how to fix it.

Code that reports them to a person (the CLI, the pytest plugin) prints ``str(error)`` and no
traceback; anything else that escapes is a bug in layerwise and keeps its traceback.
"""

from __future__ import annotations


class LayerwiseError(Exception):
    """A problem with the user's input or environment (not a bug in layerwise)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} — {fix}")


class ModelLoadError(LayerwiseError):
    """The model spec cannot be resolved or loaded."""


class UnsupportedArchitectureError(LayerwiseError):
    """The model loads, but layerwise does not know where its blocks / norm / head are."""


class DataError(LayerwiseError):
    """A prompts file is missing, empty, malformed or not UTF-8."""


class ConfigError(LayerwiseError):
    """An option has an impossible value (exit layers, token budget, paths, ...)."""


class BaselineError(LayerwiseError):
    """A baseline file is missing, corrupt, of another schema, or made with other settings."""


class ResultsError(LayerwiseError):
    """A results JSON is missing, corrupt or of another schema."""


class OutputError(ConfigError):
    """An output cannot be written safely: a special file, the same file as an input or another
    output, a full disk, a write error. The old file at that path is left as it was."""


class TunedLensError(LayerwiseError):
    """A tuned-lens folder is missing, corrupt, or was trained for another model."""


class ProbeError(LayerwiseError):
    """A prompt, layer or token given to the ``logit_lens`` fixture (layerwise.probe) cannot be used."""
