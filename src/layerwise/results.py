"""The results JSON: its schema constants, reading and validation (writing lives with the runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ResultsError
from .io import read_json

SCHEMA = "pytest-layerwise/results"
SCHEMA_VERSION = 1


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON written by layerwise, or raise a one-line :class:`ResultsError`."""
    p = Path(path)
    data = read_json(p, "results file", ResultsError, "pass the path that --results-json wrote",
                     "re-run to write it again; layerwise never leaves half-written files, so it was changed by hand or by another tool")
    validate_results(data, str(p))
    return data


def validate_results(data: Any, where: str = "results") -> None:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{where} is not a layerwise results file (no \"schema\": \"{SCHEMA}\")",
                           "pass a file written by --results-json or `layerwise run`")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(
            f"{where} has schema version {data.get('schema_version')!r}; this layerwise reads version {SCHEMA_VERSION}",
            "re-run the suite with this version of pytest-layerwise to write it again",
        )
    for key in ("run", "layers", "lens", "exits", "rows"):
        if key not in data:
            raise ResultsError(f"{where} lacks the section {key!r}", "re-run to write a complete results file")
