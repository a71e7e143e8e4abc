"""What is checked before any model loads: the data, the files to write, the baseline.

The pytest session and ``layerwise run`` both call :func:`preflight` on their
:class:`~layerwise.config.Settings`, so a bad prompts file, an output that would destroy an input,
or a damaged baseline is one line at the start — never a traceback after minutes of compute.
Imports stay light (no torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings, package_folders
from .errors import ConfigError


@dataclass
class Checked:
    """What preflight read: the prompt rows and the baseline (None: not gated, ``missing`` says why)."""

    examples: list[Any]
    baseline: dict[str, Any] | None
    missing: str | None = None


def check_output(path: Path, what: str) -> None:
    """``path`` can be written: not a folder, not inside the package, its folder writable."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder", "pass a file path")
    if any(_inside(path, folder) for folder in package_folders()):
        raise ConfigError(f"{what} {path} is inside the installed layerwise package, which is never written to",
                          "pass a path in your project")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path} cannot be written ({probe} is a file, not a folder)",
                          "choose a path in a folder you can write to")
    if not os.access(probe, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{what} {path} cannot be written (no write permission in {probe})",
                          "choose a path in a folder you can write to")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (links followed), however they are spelled."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_distinct(inputs: dict[str, Path | None], outputs: dict[str, Path | None]) -> None:
    """No output is an input or another output (compared by the files the paths name)."""
    outs = [(k, v) for k, v in outputs.items() if v is not None]
    for i, (name, path) in enumerate(outs):
        for in_name, in_path in inputs.items():
            if in_path is not None and _same_file(path, in_path):
                raise ConfigError(f"{name} {path} is the same file as {in_name} {in_path}: writing it would destroy "
                                  f"the {in_name.lstrip('-').replace('-', ' ')}", f"pass another path for {name}")
        for other_name, other in outs[:i]:
            if _same_file(path, other):
                raise ConfigError(f"{name} and {other_name} are the same file ({path})",
                                  f"pass different paths for {other_name} and {name}")


def outputs_of(settings: Settings) -> dict[str, Path | None]:
    out = settings.output
    d: dict[str, Path | None] = {"--results-json": out.results, "--report": out.report}
    if not out.summary_append:
        d["--summary-md"] = out.summary_md
    if settings.gate.update:
        d["--baseline"] = settings.gate.baseline
    return d


def inputs_of(settings: Settings) -> dict[str, Path | None]:
    run = settings.run
    d: dict[str, Path | None] = {"--prompts": Path(run.prompts) if run.prompts else None}
    if not settings.gate.update and settings.gate.baseline is not None and settings.gate.baseline.exists():
        d["--baseline"] = settings.gate.baseline
    for name, spec in (("--model", run.model), ("--adapter", run.adapter), ("--drift-against", run.drift_against)):
        if spec and Path(spec).expanduser().exists():
            d[name] = Path(spec).expanduser()
    return d


def preflight(settings: Settings, outputs: dict[str, Path | None] | None = None) -> Checked:
    """Check everything that needs no model; returns the prompt rows and the baseline."""
    from .data import default_prompts_path, load_examples

    run = settings.run
    outs = outputs_of(settings) if outputs is None else outputs
    for name, path in outs.items():
        if path is not None:
            check_output(path, name)
    check_distinct(inputs_of(settings), outs)
    examples = load_examples(Path(run.prompts) if run.prompts else default_prompts_path(), run.limit)

    gate = settings.gate
    baseline = missing = None
    if gate.update:
        pass
    elif gate.baseline is not None and (gate.source == "option" or gate.baseline.is_file()):
        from .baseline import load_baseline

        baseline = load_baseline(gate.baseline)
    else:
        missing = (f"no baseline for model {run.model!r} (looked for {gate.baseline}; create it with "
                   f"--update-baseline, or pass --baseline)")
    return Checked(examples=examples, baseline=baseline, missing=missing)
