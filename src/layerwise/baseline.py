"""The regression gate: a baseline is the tracked numbers of one run, compared with tolerances.

A baseline records the identity of what was measured (data file hash, rows, prompt format, exit
layers, decoding, lens settings, BERTScore model) and the numbers that matter: per exit layer
BLEU / ROUGE-L / BERTScore F1, and per layer the lens curves. A baseline whose identity differs
from the run is refused, not compared: the numbers would not mean the same thing. The model is
*not* part of the identity — comparing a new model against the old one's baseline is the point.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

from .config import DEFAULT_TOLERANCES
from .errors import BaselineError
from .io import atomic_write_json, read_json
from .schema import check

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


class Identity(TypedDict):
    data_sha256: str
    rows: int
    prompt_format: str
    exit_layers: list[int]
    num_layers: int
    decoding: dict[str, Any]
    teacher_forced_tokens: int
    bertscore_model: str | None


class ExitNumbers(TypedDict, total=False):
    layer: Required[int]
    bleu: float | None
    rougeL: float | None
    bertscore_f1: float | None


class BaselineFile(TypedDict, total=False):
    """The baseline JSON (docs/results-schema.md, "Baseline")."""

    schema: Required[Literal["pytest-layerwise/baseline"]]
    schema_version: Required[int]
    identity: Required[Identity]
    model: dict[str, Any]
    exits: Required[list[ExitNumbers]]
    lens: Required[dict[str, list[float | None]]]
    created: str
    made_with: dict[str, Any]


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


#: What the baseline records of where it was made; a difference is a warning, not a refusal.
MADE_WITH_VERSIONS = ("torch", "transformers", "layerwise", "bitsandbytes", "peft")


def made_with(results: dict[str, Any]) -> dict[str, Any]:
    run = results["run"]
    m = run["model"]
    env = run.get("environment") or {}
    versions = run.get("versions") or {}
    adapter = m.get("adapter")
    return {
        "device": m.get("device"),
        "gpu": env.get("gpu"),
        "dtype": m.get("dtype"),
        "quantization": m.get("quantization"),
        "adapter": adapter.get("sha256") if isinstance(adapter, dict) else None,
        "versions": {k: versions[k] for k in MADE_WITH_VERSIONS if k in versions},
    }


def make_baseline(results: dict[str, Any], created: str | None = None) -> dict[str, Any]:
    lens = results["lens"]
    curves: dict[str, list[float | None]] = {}
    for sec, stat in LENS_CURVES:
        if stat in lens.get(sec, {}):
            curves[f"{sec}.{stat}"] = list(lens[sec][stat]["mean"])
    for sec, stat in LENS_RATES:
        if stat in lens.get(sec, {}):
            curves[f"{sec}.{stat}"] = list(lens[sec][stat])
    m = results["run"]["model"]
    when = created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_VERSION,
        "created": when,
        "identity": identity(results),
        "model": {k: m.get(k) for k in ("spec", "name", "file_sha256", "revision", "dtype", "quantization", "adapter")},
        "made_with": made_with(results),
        "exits": [{"layer": e["layer"], **{k: e.get(k) for k in EXIT_METRICS}} for e in results["exits"]],
        "lens": curves,
    }


def write_baseline(results: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, make_baseline(results))


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read and fully validate a baseline, or raise one :class:`BaselineError` line."""
    p = Path(path)
    data = read_json(p, "baseline", BaselineError, "create it with --update-baseline, or fix --baseline",
                     "restore it from version control or re-create it with --update-baseline")
    validate_baseline(data, str(p))
    return data


def validate_baseline(data: Any, where: str = "baseline") -> None:
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        raise BaselineError(f"{where} is not a layerwise baseline (no \"schema\": \"{BASELINE_SCHEMA}\")",
                            "pass a file written by --update-baseline")
    if data.get("schema_version") != BASELINE_VERSION:
        raise BaselineError(
            f"baseline {where} has schema version {data.get('schema_version')!r}; this layerwise reads {BASELINE_VERSION}",
            "re-create it with --update-baseline",
        )
    problem = check(data, BaselineFile)
    if problem:
        raise BaselineError(f"baseline {where} is damaged: {problem}",
                            "restore it from version control or re-create it with --update-baseline")


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


def environment_warnings(baseline: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Differences in where the numbers were made (device, dtype, quantization, adapter, versions):
    each may move numbers, so each is one warning line — not a refusal."""
    want = baseline.get("made_with")
    if not isinstance(want, dict):
        return []
    have = made_with(results)
    out = []
    for key in ("device", "gpu", "dtype", "quantization", "adapter"):
        if want.get(key) != have.get(key):
            out.append(f"{key} differs from the baseline's: {want.get(key)!r} there, {have.get(key)!r} here")
    wv, hv = want.get("versions") or {}, have.get("versions") or {}
    changed = [f"{k} {wv.get(k)} → {hv.get(k)}" for k in MADE_WITH_VERSIONS if wv.get(k) != hv.get(k) and (k in wv or k in hv)]
    if changed:
        out.append("library versions differ from the baseline's: " + ", ".join(changed))
    return out


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


def tracked_count(baseline: dict[str, Any]) -> int:
    """How many numbers of the baseline the gate compares."""
    n = sum(1 for be in baseline["exits"] for k in EXIT_METRICS if be.get(k) is not None)
    n += sum(1 for vals in baseline["lens"].values() for b in vals
             if b is not None and not (isinstance(b, float) and math.isnan(b)))
    return n


#: The failure message shows at most this many deviations, then "and N more".
DETAIL_LINES = 20


@dataclass
class Verdict:
    """The gate's one answer for a run: passed, failed, or not gated (and why)."""

    status: str  # "passed" | "failed" | "not_gated"
    baseline: str | None = None  # the baseline file, as the user named it
    checked: int = 0
    deviations: list[Deviation] = field(default_factory=list)
    why: str | None = None  # not gated: why
    refused: bool = False  # not gated because the baseline was made with other settings
    warnings: list[str] = field(default_factory=list)
    baseline_model: str | None = None
    baseline_created: str | None = None

    @property
    def gated(self) -> bool:
        return self.status != "not_gated"

    def line(self) -> str:
        """The verdict line that ends the terminal summary."""
        if self.status == "passed":
            return f"gate PASSED against {self.baseline} ({self.checked} numbers within tolerance)"
        if self.status == "failed":
            return (f"gate FAILED against {self.baseline} ({len(self.deviations)} of {self.checked} numbers "
                    f"outside tolerance)")
        return f"NOT GATED: {self.why}"

    def message(self, results_file: str | None = None) -> str:
        """The failure message: the verdict first, then at most :data:`DETAIL_LINES` deviations."""
        lines = [self.line()]
        shown = self.deviations[:DETAIL_LINES]
        lines += [f"  {d}" for d in shown]
        more = len(self.deviations) - len(shown)
        if more > 0:
            lines.append(f"  and {more} more — see {results_file or 'the results file'}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status, "line": self.line(), "baseline": self.baseline, "checked": self.checked,
            "outside": len(self.deviations), "why": self.why, "refused": self.refused, "warnings": list(self.warnings),
            "baseline_model": self.baseline_model, "baseline_created": self.baseline_created,
            "deviations": [{"metric": d.metric, "layer": d.layer, "baseline": d.baseline, "value": d.value,
                            "allowed": d.allowed} for d in self.deviations],
        }


def judge(baseline: dict[str, Any] | None, results: dict[str, Any], *, name: str | None,
          tolerances: dict[str, tuple[float, float]] | None = None, updating: bool = False,
          missing: str | None = None) -> Verdict:
    """The verdict of ``results`` against ``baseline`` (``name``: how to call the file in messages)."""
    if updating:
        return Verdict("not_gated", name, why=f"the baseline {name} is being written from this run")
    if baseline is None:
        return Verdict("not_gated", name, why=missing or f"no baseline for this model ({name} does not exist)")
    meta = {"baseline_model": (baseline.get("model") or {}).get("name") or (baseline.get("model") or {}).get("spec"),
            "baseline_created": baseline.get("created")}
    why = identity_mismatch(baseline, results)
    if why:
        return Verdict("not_gated", name, why=f"baseline {name} refused, not compared: {why}", refused=True, **meta)
    devs = compare(baseline, results, tolerances)
    return Verdict("failed" if devs else "passed", name, checked=tracked_count(baseline), deviations=devs,
                   warnings=environment_warnings(baseline, results), **meta)
