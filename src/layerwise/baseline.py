"""The regression gate: a baseline is the tracked numbers of one run, compared with tolerances.

A baseline records the identity of what was measured (data file hash, rows, prompt format, exit
layers, decoding, lens settings, BERTScore model) and the numbers that matter: per exit layer
BLEU / ROUGE-L / BERTScore F1, and per layer the lens curves. A baseline whose identity differs
from the run is refused, not compared: the numbers would not mean the same thing. The model is
*not* part of the identity — comparing a new model against the old one's baseline is the point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BaselineError
from .io import atomic_write_json, read_json

BASELINE_SCHEMA = "pytest-layerwise/baseline"
BASELINE_VERSION = 1

EXIT_METRICS = ("bleu", "rougeL", "bertscore_f1")
LENS_CURVES = (
    ("first_token", "entropy"),
    ("teacher_forced", "entropy"),
    ("teacher_forced", "kl_to_final"),
    ("teacher_forced", "xent"),
)
LENS_RATES = (("teacher_forced", "top1_agree"), ("first_token", "top1_agree"))

# Default tolerances: absolute, and relative to the baseline value; a number passes when it is
# within max(abs, rel * |baseline|). Greedy CPU runs are bit-for-bit repeatable (measured spread:
# 0), so these are not noise margins: they are the smallest changes worth failing a pull request
# over, chosen so that a dtype change (float32 → bfloat16) or a perturbed block fails while a
# rerun passes — see tests/test_gate.py for the measurements.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "bleu": (0.5, 0.10),
    "rougeL": (0.01, 0.05),
    "bertscore_f1": (0.01, 0.02),
    "entropy": (0.05, 0.05),
    "kl_to_final": (0.05, 0.05),
    "xent": (0.05, 0.02),
    "top1_agree": (0.03, 0.0),
}


def identity(results: dict[str, Any]) -> dict[str, Any]:
    run = results["run"]
    bs = run["metrics"].get("bertscore")
    return {
        "data_sha256": run["data"]["sha256"],
        "rows": run["data"]["rows"],
        "prompt_format": run["data"]["prompt_format"],
        "exit_layers": run["exit_layers"],
        "num_layers": run["model"]["num_layers"],
        "decoding": run["decoding"],
        "teacher_forced_tokens": run["lens"]["teacher_forced_tokens"],
        "bertscore_model": bs["model"] if bs else None,
    }


def make_baseline(results: dict[str, Any]) -> dict[str, Any]:
    lens = results["lens"]
    curves: dict[str, list[float | None]] = {}
    for sec, stat in LENS_CURVES:
        if stat in lens.get(sec, {}):
            curves[f"{sec}.{stat}"] = list(lens[sec][stat]["mean"])
    for sec, stat in LENS_RATES:
        if stat in lens.get(sec, {}):
            curves[f"{sec}.{stat}"] = list(lens[sec][stat])
    m = results["run"]["model"]
    return {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_VERSION,
        "identity": identity(results),
        "model": {k: m.get(k) for k in ("spec", "name", "file_sha256", "revision", "dtype", "quantization")},
        "exits": [{"layer": e["layer"], **{k: e.get(k) for k in EXIT_METRICS}} for e in results["exits"]],
        "lens": curves,
    }


def write_baseline(results: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, make_baseline(results))


def load_baseline(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = read_json(p, "baseline", BaselineError, "create it with --update-baseline, or fix --baseline",
                     "restore it from version control or re-create it with --update-baseline")
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        raise BaselineError(f"{p} is not a layerwise baseline", "pass a file written by --update-baseline")
    if data.get("schema_version") != BASELINE_VERSION:
        raise BaselineError(
            f"baseline {p} has schema version {data.get('schema_version')!r}; this layerwise reads {BASELINE_VERSION}",
            "re-create it with --update-baseline",
        )
    for key in ("identity", "exits", "lens"):
        if key not in data:
            raise BaselineError(f"baseline {p} lacks {key!r}", "re-create it with --update-baseline")
    return data


def identity_mismatch(baseline: dict[str, Any], results: dict[str, Any]) -> str | None:
    """Why this baseline cannot be compared with these results, or None."""
    want, have = baseline["identity"], identity(results)
    diffs = []
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            diffs.append(f"{key}: baseline {want.get(key)!r} vs run {have.get(key)!r}")
    if not diffs:
        return None
    return "baseline made with other settings (" + "; ".join(diffs) + ")"


@dataclass
class Deviation:
    metric: str
    layer: int
    baseline: float
    value: float | None
    allowed: float

    def __str__(self) -> str:
        got = "missing" if self.value is None else f"{self.value:.4g}"
        delta = "" if self.value is None else f" ({self.value - self.baseline:+.4g})"
        return f"{self.metric} at layer {self.layer}: {got} vs baseline {self.baseline:.4g}{delta}, allowed ±{self.allowed:.3g}"


def _allowed(kind: str, base: float, tolerances: dict[str, tuple[float, float]]) -> float:
    a, r = tolerances.get(kind, (0.0, 0.0))
    return max(a, r * abs(base))


def compare(baseline: dict[str, Any], results: dict[str, Any],
            tolerances: dict[str, tuple[float, float]] | None = None) -> list[Deviation]:
    """Every tracked number outside its tolerance (an empty list: the gate passes)."""
    tol = dict(DEFAULT_TOLERANCES)
    tol.update(tolerances or {})
    out: list[Deviation] = []
    by_layer = {e["layer"]: e for e in results["exits"]}
    for be in baseline["exits"]:
        e = by_layer.get(be["layer"], {})
        for k in EXIT_METRICS:
            b = be.get(k)
            if b is None:
                continue
            v = e.get(k)
            allowed = _allowed(k, b, tol)
            if v is None or abs(v - b) > allowed + 1e-12:
                out.append(Deviation(k, be["layer"], b, v, allowed))
    current = make_baseline(results)["lens"]
    for name, bvals in baseline["lens"].items():
        kind = name.split(".", 1)[1]
        vals = current.get(name)
        for layer, b in enumerate(bvals):
            if b is None or (isinstance(b, float) and math.isnan(b)):
                continue
            v = vals[layer] if vals is not None and layer < len(vals) else None
            allowed = _allowed(kind, b, tol)
            if v is None or abs(v - b) > allowed + 1e-12:
                out.append(Deviation(name, layer, b, v, allowed))
    return out
