"""What is checked before any model loads: the data, the files to write, the baseline.

The pytest session and ``layerwise run`` both call :func:`preflight` on their
:class:`~layerwise.config.Settings`, so a bad prompts file, an output that would destroy an input,
or a damaged baseline is one line at the start — never a traceback after minutes of compute.
Imports stay light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings, package_folders
from .errors import ConfigError
from .io import check_distinct, check_output


@dataclass
class Checked:
    """What preflight read: the prompt rows and the baseline (None: not gated, ``missing`` says why)."""

    examples: list[Any]
    baseline: dict[str, Any] | None
    missing: str | None = None
    results: dict[str, Any] | None = None  # --results FILE: the results read from it
    tuned_lens: dict[str, Any] | None = None  # --lens logit,tuned:PATH: what the folder holds (tuned_files)


def check_not_in_package(path: Path, what: str) -> None:
    """The installed package and its data (the shipped baseline, templates, suite) are never written."""
    target = path.resolve()
    for folder in package_folders():
        if target == folder or folder in target.parents:
            raise ConfigError(f"{what} {path} is inside the installed layerwise package, which is never written to",
                              "pass a path in your project (e.g. baselines/<model>.json)")


def _check_results_file(settings: Settings, outputs: dict[str, Path | None] | None) -> Checked:
    """``--results FILE``: the file is read and validated; the baseline is found for its model."""
    from .config import Quantization, default_baseline
    from .results import load_results

    results = load_results(settings.results_file)  # type: ignore[arg-type]
    if settings.thresholds.get("trend-lens") == "tuned" and "tuned" not in results["lens"]:
        raise ConfigError(f"--trend-lens tuned: {settings.results_file} has no tuned lens",
                          "gate results written with --lens logit,tuned:PATH, or pass --trend-lens logit")
    gate = settings.gate
    if gate.source != "option":
        q = results["run"]["model"].get("quantization")
        quant = None if not q else Quantization(q["method"].rsplit("-", 1)[-1], q.get("quant_type", "nf4"))
        gate.baseline, gate.source = default_baseline(results["run"]["model"]["spec"], quant,
                                                      gate.project_root or Path.cwd(), gate.update)
    outs = outputs_of(settings) if outputs is None else outputs
    for name, path in outs.items():
        if path is not None:
            check_not_in_package(path, name)
            check_output(path, name)
    check_distinct({"--results": settings.results_file, **({"--baseline": gate.baseline} if not gate.update and
                                                            gate.baseline is not None and gate.baseline.exists() else {})},
                   outs)
    checked = _baseline_of(settings, results["run"]["model"]["spec"])
    checked.results = results
    return checked


def _baseline_of(settings: Settings, model: str) -> Checked:
    gate = settings.gate
    baseline = missing = None
    if gate.update:
        pass
    elif gate.baseline is not None and (gate.source == "option" or gate.baseline.is_file()):
        from .baseline import load_baseline

        baseline = load_baseline(gate.baseline)
    else:
        missing = (f"no baseline for model {model!r} (looked for {gate.baseline}; create it with "
                   f"--update-baseline, or pass --baseline)")
    return Checked(examples=[], baseline=baseline, missing=missing)


def outputs_of(settings: Settings) -> dict[str, Path | None]:
    out = settings.output
    d: dict[str, Path | None] = {"--report": out.report}
    if out.results is not None:
        d["--results-json"] = out.results
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
    from .models import check_revision, resolve_spec

    run = settings.run
    if settings.results_file is not None:  # gating a file: no model, no prompts
        return _check_results_file(settings, outputs)
    src = resolve_spec(run.model)  # a missing path or package is one line now, not after the session starts
    check_revision(src.kind, run.model, run.revision)
    if run.drift_against:
        check_revision(resolve_spec(run.drift_against).kind, run.drift_against, run.drift_revision)
    outs = outputs_of(settings) if outputs is None else outputs
    for name, path in outs.items():
        if path is not None:
            check_not_in_package(path, name)
            check_output(path, name)
    check_distinct(inputs_of(settings), outs)
    lens = None
    if run.tuned_lens:  # a missing or damaged lens is one line now; one for another model, once it loads
        from .tuned_files import check_lens_folder

        lens = check_lens_folder(run.tuned_lens)
    examples = load_examples(Path(run.prompts) if run.prompts else default_prompts_path(), run.limit)
    checked = _baseline_of(settings, run.model)
    checked.examples = examples
    checked.tuned_lens = lens
    return checked
