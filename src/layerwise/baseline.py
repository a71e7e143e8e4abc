"""The regression gate: a baseline is the tracked numbers of one run, compared with tolerances.

A baseline records the identity of what was measured (data file hash, rows, prompt format, exit
layers, decoding, lens settings, BERTScore model), where it was made (device, dtype, versions),
the numbers that matter — per exit layer BLEU / ROUGE-L / BERTScore F1, per layer the lens curves
— and, per row, fingerprints: the generated tokens of every exit, the per-row metric values, the
first-token top-1 of every layer and the per-row teacher-forced top-1 agreement. A baseline
whose identity differs from the run is refused, not compared. The model is *not* part of the
identity — comparing a new model against the old one's baseline is the point.

The verdict (:func:`judge`) says more than "which numbers moved": the first layer at which the
model departs from the baseline, whether each exit's quality change is more than the noise of its
rows (a paired bootstrap over rows, :mod:`layerwise.paired`), and how many rows' generations
changed. With relative exits (``--exit-layers 25%,50%,75%,100%``) a baseline gates a model of
another depth: exits are matched by relative position and lens curves compared on normalised
depth.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

from .config import DEFAULT_TOLERANCES
from .errors import BaselineError
from .io import atomic_write_text, dumps_json, read_json
from .paired import Interval, bootstrap_mean, detectable_effect
from .schema import check

BASELINE_SCHEMA = "pytest-layerwise/baseline"
BASELINE_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: aggregates only (no row records, no spread)

#: Per exit: quality, and α, the exit's self-speculative acceptance rate (layerwise.speculative).
EXIT_METRICS = ("bleu", "rougeL", "bertscore_f1", "accept_rate")
LENS_CURVES = (
    ("first_token", "entropy"),
    ("teacher_forced", "entropy"),
    ("teacher_forced", "kl_to_final"),
    ("teacher_forced", "xent"),
)
#: Decision depth (layerwise.milestones): the fraction of positions / rows decided by each layer;
#: the verdict also reports the change of their means.
DEPTH_CURVES = (("teacher_forced", "decided_top1"), ("first_token", "decided_top1"),
                ("teacher_forced", "decided_top10"), ("first_token", "decided_top10"))
LENS_RATES = (("teacher_forced", "top1_agree"), ("first_token", "top1_agree"), *DEPTH_CURVES)
#: A per-layer number that moved less than this is the same (float rounding; a batch change moves
#: numbers ≤ 7e-6 on CPU): below it a layer has not departed from the baseline.
DIVERGENCE_EPS = 2e-5
#: Statistics of a layer's own distribution (not relative to the final layer): a change in block k
#: moves them at layers ≥ k only, so they locate it.
OWN_STATISTICS = ("entropy", "xent")
#: With a calibrated baseline, a number passes within max(tolerance, SPREAD_K × observed spread).
SPREAD_K = 3.0
#: The failure message shows at most this many deviations, then "and N more".
DETAIL_LINES = 20


class Identity(TypedDict, total=False):
    data_sha256: Required[str]
    rows: Required[int]
    prompt_format: Required[str]
    exit_layers: list[int]  # absolute exits (the depth must match)
    exit_spec: list[str]  # relative exits, e.g. ["25%", "50%", "75%", "100%"] (any depth)
    num_layers: int
    decoding: Required[dict[str, Any]]
    teacher_forced_tokens: Required[int]
    bertscore_model: Required[str | None]


class ExitNumbers(TypedDict, total=False):
    layer: Required[int]
    spec: str  # relative exits: which spec this exit resolved from
    bleu: float | None
    rougeL: float | None
    bertscore_f1: float | None
    accept_rate: float | None


class ExitRows(TypedDict, total=False):
    tokens: list[str]  # per row: SHA-256 (16 hex) of the generated token ids
    head: list[list[int]]  # per row: the first 16 generated ids
    bleu: list[float | None]
    rougeL: list[float | None]
    bertscore_f1: list[float | None]
    accept_rate: list[float | None]


class RowRecords(TypedDict, total=False):
    index: Required[list[int]]  # the rows' indices in the prompts file
    exits: Required[dict[str, ExitRows]]  # exit layer (as a string) → per-row records
    first_top1: list[list[int]]  # [layer][row]: the first response token's top-1 id
    tf_agree: list[list[float | None]]  # [layer][row]: teacher-forced top-1 agreement with the final layer


class BaselineFile(TypedDict, total=False):
    """The baseline JSON (docs/results-schema.md, "Baseline")."""

    schema: Required[Literal["pytest-layerwise/baseline"]]
    schema_version: Required[int]
    identity: Required[Identity]
    model: dict[str, Any]
    exits: Required[list[ExitNumbers]]
    lens: Required[dict[str, list[float | None]]]
    rows: RowRecords
    spread: dict[str, list[float | None]]  # calibration: name → the observed max − min per layer / exit
    calibration: dict[str, Any]
    created: str
    made_with: dict[str, Any]


def is_relative(results: dict[str, Any]) -> bool:
    return bool(results["run"].get("exit_spec"))


def identity(results: dict[str, Any]) -> dict[str, Any]:
    run = results["run"]
    bs = run["metrics"].get("bertscore")
    ident: dict[str, Any] = {
        "data_sha256": run["data"]["sha256"],
        "rows": run["data"]["rows"],
        "prompt_format": run["data"]["prompt_format"],
        "decoding": run["decoding"],
        "teacher_forced_tokens": run["lens"]["teacher_forced_tokens"],
        "bertscore_model": bs["model"] if bs else None,
    }
    if is_relative(results):  # exits by relative position: a model of another depth is comparable
        ident["exit_spec"] = list(run["exit_spec"])
    else:
        ident["exit_layers"] = run["exit_layers"]
        ident["num_layers"] = run["model"]["num_layers"]
    return ident


#: What the baseline records of where it was made; a difference is a warning, not a refusal.
MADE_WITH_VERSIONS = ("torch", "transformers", "layerwise", "bitsandbytes", "peft")


def made_with(results: dict[str, Any]) -> dict[str, Any]:
    run = results["run"]
    m = run["model"]
    env = run.get("environment") or {}
    versions = run.get("versions") or {}
    adapter = m.get("adapter")
    out = {
        "device": m.get("device"),
        "gpu": env.get("gpu"),
        "dtype": m.get("dtype"),
        "quantization": m.get("quantization"),
        "adapter": adapter.get("sha256") if isinstance(adapter, dict) else None,
        "versions": {k: versions[k] for k in MADE_WITH_VERSIONS if k in versions},
    }
    # The tuned lens (--lens logit,tuned:PATH) is recorded, not part of the identity and not warned
    # about: no gated number (logit-lens curves, plain exits) depends on it; the record says which
    # translators the run's tuned numbers beside them came from.
    tuned = (run.get("lens") or {}).get("tuned")
    if isinstance(tuned, dict):
        out["tuned_lens"] = tuned.get("sha256")
    return out


def tracked_curves(results: dict[str, Any]) -> dict[str, list[float | None]]:
    """The per-layer numbers the gate tracks, by name (``section.statistic``)."""
    lens = results["lens"]
    curves: dict[str, list[float | None]] = {}
    for sec, stat in LENS_CURVES:
        if stat in lens.get(sec, {}):
            curves[f"{sec}.{stat}"] = list(lens[sec][stat]["mean"])
    for sec, stat in LENS_RATES:
        if stat in lens.get(sec, {}):
            curves[f"{sec}.{stat}"] = list(lens[sec][stat])
    return curves


def _exit_key(results: dict[str, Any], exit_index: int) -> str:
    """How an exit is named across runs: its layer, or (relative exits) its spec."""
    run = results["run"]
    return run["exit_spec"][exit_index] if is_relative(results) else str(run["exit_layers"][exit_index])


def row_records(results: dict[str, Any]) -> dict[str, Any] | None:
    """The per-row fingerprints of a run (None for results written without them)."""
    rows = results["rows"]
    if not rows or "tokens" not in rows[0]:
        return None
    run = results["run"]
    exits: dict[str, Any] = {}
    for i, layer in enumerate(run["exit_layers"]):
        key, lk = _exit_key(results, i), str(layer)
        rec: dict[str, Any] = {"tokens": [r["tokens"][lk]["sha"] for r in rows],
                               "head": [r["tokens"][lk]["head"] for r in rows]}
        for m in EXIT_METRICS:
            rec[m] = [(r.get("scores") or {}).get(lk, {}).get(m) for r in rows]
        exits[key] = rec
    out: dict[str, Any] = {"index": [r["index"] for r in rows], "exits": exits}
    per_row = results["lens"].get("per_row") or {}
    for k in ("first_top1", "tf_agree"):
        if k in per_row:
            out[k] = per_row[k]
    return out


def make_baseline(results: dict[str, Any], created: str | None = None,
                  spread: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    m = results["run"]["model"]
    when = created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    exits = []
    for i, e in enumerate(sorted(results["exits"], key=lambda e: e["layer"])):
        row: dict[str, Any] = {"layer": e["layer"], **{k: e.get(k) for k in EXIT_METRICS}}
        if is_relative(results):
            row["spec"] = _exit_key(results, i)
        exits.append(row)
    out: dict[str, Any] = {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_VERSION,
        "created": when,
        "identity": identity(results),
        "model": {k: m.get(k) for k in ("spec", "name", "file_sha256", "revision", "dtype", "quantization", "adapter",
                                        "num_layers")},
        "made_with": made_with(results),
        "exits": exits,
        "lens": tracked_curves(results),
    }
    rows = row_records(results)
    if rows is not None:
        out["rows"] = rows
    if spread is not None:
        out["spread"] = spread
        out["calibration"] = calibration or {}
    return out


def dumps_baseline(baseline: dict[str, Any]) -> str:
    """A baseline as written: indented objects, each list of numbers on one line."""
    return dumps_json(baseline, flat_lists=True)


def write_baseline(results: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_text(path, dumps_baseline(make_baseline(results)))


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
    if data.get("schema_version") not in READS_VERSIONS:
        raise BaselineError(
            f"baseline {where} has schema version {data.get('schema_version')!r}; this layerwise reads "
            f"{', '.join(map(str, READS_VERSIONS))}",
            "re-create it with --update-baseline",
        )
    problem = check(data, BaselineFile)
    if problem is None:
        ident = data["identity"]
        if "exit_layers" not in ident and "exit_spec" not in ident:
            problem = "identity: lacks 'exit_layers'"
        elif "rows" in data and any(len(v) != len(data["rows"]["index"]) for ex in data["rows"]["exits"].values()
                                    for v in ex.values()):
            problem = "rows: an exit's records do not have one entry per row"
    if problem:
        raise BaselineError(f"baseline {where} is damaged: {problem}",
                            "restore it from version control or re-create it with --update-baseline")


def identity_mismatch(baseline: dict[str, Any], results: dict[str, Any]) -> str | None:
    """Why this baseline cannot be compared with these results, or None."""
    want, have = dict(baseline["identity"]), identity(results)
    if baseline.get("schema_version") == 1 or "exit_layers" in want:
        want.setdefault("num_layers", (baseline.get("model") or {}).get("num_layers"))
    diffs = []
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            diffs.append(f"{key}: baseline {want.get(key)!r} vs run {have.get(key)!r}")
    if not diffs:
        return None
    hint = ""
    if "exit_spec" in want and "exit_spec" not in have:
        hint = "; the baseline uses relative exits: pass --exit-layers " + ",".join(want["exit_spec"])
    return "baseline made with other settings (" + "; ".join(diffs) + ")" + hint


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


# ----------------------------------------------------------------------------------------------
# Comparing


@dataclass
class Deviation:
    metric: str
    layer: int
    baseline: float
    value: float | None
    allowed: float
    where: str | None = None  # how to name the place when it is not "layer N" (relative depth)
    interval: Interval | None = None  # exit metrics: the paired bootstrap over rows

    def __str__(self) -> str:
        got = "missing" if self.value is None else f"{self.value:.4g}"
        delta = "" if self.value is None else f" ({self.value - self.baseline:+.4g})"
        ci = "" if self.interval is None else f"; paired over {self.interval.n} rows {self.interval.text()}"
        return (f"{self.metric} at {self.where or f'layer {self.layer}'}: {got} vs baseline {self.baseline:.4g}{delta}, "
                f"allowed ±{self.allowed:.3g}{ci}")


def deviation_runs(devs: list[tuple[str, int, float, float | None, float, str | None, Any]]) -> list[tuple[str, int]]:
    """Deviations ``(metric, layer, baseline, value, allowed, where, interval)`` as lines, each with
    the number of deviations it stands for: consecutive layers of one metric with the same values
    (a cumulative curve such as ``decided_top10`` moves at every layer below a change) are one
    line, "metric at layers a–b (n layers): …"."""
    out: list[tuple[str, int]] = []
    i = 0
    while i < len(devs):
        metric, layer, base, value, allowed, where, interval = devs[i]
        j = i + 1
        while (interval is None and j < len(devs) and devs[j][0] == metric and devs[j][1] == devs[j - 1][1] + 1
               and devs[j][2:5] == (base, value, allowed) and devs[j][6] is None and (devs[j][5] is None) == (where is None)):
            j += 1
        d = Deviation(metric, layer, base, value, allowed, where, interval)
        if j - i == 1:
            out.append((str(d), 1))
        else:
            last = devs[j - 1][1]
            span = f"layers {layer}–{last}" if where is None else f"baseline layers {layer}–{last} (relative depth)"
            out.append((str(replace(d, where=f"{span} ({j - i} layers)")), j - i))
        i = j
    return out


def _allowed(kind: str, base: float, tolerances: dict[str, tuple[float, float]], spread: float | None = None) -> float:
    a, r = tolerances.get(kind, (0.0, 0.0))
    return max(a, r * abs(base), SPREAD_K * spread if spread else 0.0)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _interp(vals: list[float | None], x: float) -> float | None:
    """A curve over layers 0..L read at fractional layer ``x`` (linear between neighbours)."""
    lo = int(math.floor(x))
    hi = min(lo + 1, len(vals) - 1)
    a, b = vals[lo], vals[hi]
    if not _is_num(a) or not _is_num(b):
        return a if x == lo and _is_num(a) else None
    return a + (b - a) * (x - lo)


def _spread_at(baseline: dict[str, Any], name: str, i: int) -> float | None:
    s = (baseline.get("spread") or {}).get(name)
    return s[i] if isinstance(s, list) and i < len(s) and _is_num(s[i]) else None


def exit_pairs(baseline: dict[str, Any], results: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(name, baseline exit, this run's exit or None) — matched by layer, or by relative spec."""
    mine = sorted(results["exits"], key=lambda e: e["layer"])
    if "exit_spec" in baseline["identity"] and is_relative(results):
        by_spec = {_exit_key(results, i): e for i, e in enumerate(mine)}
        return [(be["spec"], be, by_spec.get(be["spec"])) for be in baseline["exits"]]
    by_layer = {e["layer"]: e for e in mine}
    return [(str(be["layer"]), be, by_layer.get(be["layer"])) for be in baseline["exits"]]


def _deltas(baseline: dict[str, Any], results: dict[str, Any], name: str, metric: str) -> list[float]:
    """Per-row differences (this run − baseline) of one exit's metric, rows matched by index."""
    brows, rows = baseline.get("rows"), row_records(results)
    if not brows or rows is None or name not in brows["exits"] or name not in rows["exits"]:
        return []
    mine = dict(zip(rows["index"], rows["exits"][name].get(metric) or []))
    return [mine[i] - b for i, b in zip(brows["index"], brows["exits"][name].get(metric) or [])
            if _is_num(b) and _is_num(mine.get(i))]


def _paired(baseline: dict[str, Any], results: dict[str, Any], name: str, metric: str) -> Interval | None:
    deltas = _deltas(baseline, results, name, metric)
    return bootstrap_mean(deltas) if deltas else None


def compare(baseline: dict[str, Any], results: dict[str, Any],
            tolerances: dict[str, tuple[float, float]] | None = None) -> list[Deviation]:
    """Every tracked number outside its tolerance (an empty list: the gate passes).

    Exit quality with per-row records on both sides fails only when its paired bootstrap interval
    over rows excludes zero as well: a change the rows cannot tell from noise is not a regression.
    """
    return _compare(baseline, results, tolerances)[0]


def _compare(baseline: dict[str, Any], results: dict[str, Any],
             tolerances: dict[str, tuple[float, float]] | None = None) -> tuple[list[Deviation], list[Deviation]]:
    """(deviations, changes within noise)."""
    tol = dict(DEFAULT_TOLERANCES)
    tol.update(tolerances or {})
    out: list[Deviation] = []
    noise: list[Deviation] = []
    for i, (name, be, e) in enumerate(exit_pairs(baseline, results)):
        where = f"exit {name}" if not name.isdigit() else None
        for k in EXIT_METRICS:
            b = be.get(k)
            if b is None:
                continue
            v = (e or {}).get(k)
            allowed = _allowed(k, b, tol, _spread_at(baseline, f"exits.{k}", i))
            if v is None or abs(v - b) > allowed + 1e-12:
                ci = _paired(baseline, results, name, "bleu" if k == "bleu" else k)
                dev = Deviation(k, be["layer"] if e is None else e["layer"], b, v, allowed, where, ci)
                (noise if ci is not None and not ci.excludes_zero else out).append(dev)
    current = tracked_curves(results)
    relative = "exit_spec" in baseline["identity"]
    Lb = len(next(iter(baseline["lens"].values()), [])) - 1
    for name, bvals in baseline["lens"].items():
        kind = name.split(".", 1)[1]
        vals = current.get(name)
        Lc = len(vals) - 1 if vals else 0
        for layer, b in enumerate(bvals):
            if not _is_num(b):
                continue
            where = None
            if vals is None or layer >= len(vals) and not relative:
                v = None
            elif relative and Lb > 0 and Lc != Lb:
                x = layer * Lc / Lb
                v = _interp(vals, x)
                where = f"depth {layer / Lb:.2f} (baseline layer {layer}, this model's layer {x:.2f})"
            else:
                v = vals[layer]
            allowed = _allowed(kind, b, tol, _spread_at(baseline, name, layer))
            if v is None or abs(v - b) > allowed + 1e-12:
                out.append(Deviation(name, layer, b, v, allowed, where))
    return out, noise


def tracked_count(baseline: dict[str, Any]) -> int:
    """How many numbers of the baseline the gate compares."""
    n = sum(1 for be in baseline["exits"] for k in EXIT_METRICS if be.get(k) is not None)
    n += sum(1 for vals in baseline["lens"].values() for b in vals if _is_num(b))
    return n


def first_divergent_layer(baseline: dict[str, Any], results: dict[str, Any]) -> tuple[int | None, str]:
    """The lowest layer at which this run's lens departs from the baseline's beyond noise, and the
    evidence. Layer k is the output of block k: when only block k changed, layers 0..k-1 are the
    same computation and match; when the final norm changed, every layer's lens does (layer 0)."""
    if "exit_spec" in baseline["identity"] and (baseline.get("model") or {}).get("num_layers") not in (
            None, results["run"]["model"]["num_layers"]):
        return None, "not located: the models have different depths"
    current = tracked_curves(results)
    L = results["run"]["model"]["num_layers"]
    moved: dict[int, list[str]] = {}
    for name, bvals in baseline["lens"].items():
        if name.split(".", 1)[1] not in OWN_STATISTICS:
            continue  # KL and agreement are measured against the final layer: they move at every layer
        vals = current.get(name) or []
        for k, b in enumerate(bvals[: L + 1]):
            v = vals[k] if k < len(vals) else None
            if not _is_num(b) or not _is_num(v):
                continue
            floor = max(DIVERGENCE_EPS, SPREAD_K * (_spread_at(baseline, name, k) or 0.0))
            if abs(v - b) > floor:
                moved.setdefault(k, []).append(f"{name} {v - b:+.3g}")
    brows, rows = baseline.get("rows") or {}, row_records(results) or {}
    if "first_top1" in brows and "first_top1" in rows:
        mine_idx = {r: j for j, r in enumerate(rows["index"])}
        for k, (bl, ml) in enumerate(zip(brows["first_top1"], rows["first_top1"])):
            flips = sum(1 for j, r in enumerate(brows["index"]) if r in mine_idx and bl[j] != ml[mine_idx[r]])
            if flips:
                moved.setdefault(k, []).append(f"first-token top-1 of {flips}/{len(brows['index'])} rows")
    if not moved:
        return None, "every layer matches the baseline"
    k = min(moved)
    what = "the embeddings (or the final norm, which every layer's lens goes through)" if k == 0 else \
        f"the output of block {k}"
    below = "" if k == 0 else ("; layer 0 matches" if k == 1 else f"; layers 0–{k - 1} match")
    return k, f"layer {k} is {what}: " + ", ".join(moved[k][:4]) + below


def mean_depth(decided: list[float | None] | None) -> float | None:
    """The mean decision depth from the fraction decided by each layer 0..L: Σ_{k<L} (1 − F(k))."""
    if not decided or not all(_is_num(v) for v in decided):
        return None
    return sum(1.0 - v for v in decided[:-1])  # type: ignore[operator]


def depth_change(baseline: dict[str, Any], results: dict[str, Any]) -> str:
    """The decision depth's mean, baseline → this run, for each tracked depth curve ("" if none)."""
    current = tracked_curves(results)
    Lb, Lc = len(next(iter(baseline["lens"].values()), [])) - 1, results["run"]["model"]["num_layers"]
    parts = []
    for sec, stat in DEPTH_CURVES:
        name = f"{sec}.{stat}"
        b, c = mean_depth(baseline["lens"].get(name)), mean_depth(current.get(name))
        if b is None or c is None:
            continue
        what = f"{stat.replace('decided_', '')} {'first token' if sec == 'first_token' else 'teacher-forced'}"
        depths = "" if Lb == Lc else f" (of {Lb} → of {Lc} blocks)"
        parts.append(f"{what} {b:.2f} → {c:.2f} ({c - b:+.2f}){depths}")
    return "decision depth, mean layer: " + "; ".join(parts) if parts else ""


def rows_changed(baseline: dict[str, Any], results: dict[str, Any]) -> dict[str, list[int]]:
    """Per exit: [rows whose generated tokens differ from the baseline's, rows compared]."""
    brows, rows = baseline.get("rows"), row_records(results)
    if not brows or rows is None:
        return {}
    out = {}
    mine_idx = {r: j for j, r in enumerate(rows["index"])}
    for name, rec in brows["exits"].items():
        if name not in rows["exits"]:
            continue
        mine = rows["exits"][name]["tokens"]
        pairs = [(sha, mine[mine_idx[r]]) for r, sha in zip(brows["index"], rec.get("tokens") or []) if r in mine_idx]
        out[name] = [sum(1 for a, b in pairs if a != b), len(pairs)]
    return out


@dataclass
class Verdict:
    """The gate's one answer for a run: passed, failed, or not gated (and why) — with where the
    model changed, whether quality moved beyond the rows' noise, and how many rows changed."""

    status: str  # "passed" | "failed" | "not_gated"
    baseline: str | None = None  # the baseline file, as the user named it
    checked: int = 0
    deviations: list[Deviation] = field(default_factory=list)
    why: str | None = None  # not gated: why
    refused: bool = False  # not gated because the baseline was made with other settings
    warnings: list[str] = field(default_factory=list)
    baseline_model: str | None = None
    baseline_created: str | None = None
    first_divergent: int | None = None
    divergence: str = ""
    quality: list[dict[str, Any]] = field(default_factory=list)  # per exit and metric: paired intervals
    rows_changed: dict[str, list[int]] = field(default_factory=dict)
    within_noise: list[Deviation] = field(default_factory=list)
    matched_exits: list[list[Any]] = field(default_factory=list)  # [[baseline exit, this run's layer]]
    depths: list[int] | None = None  # [baseline blocks, this model's blocks] when they differ
    depth_change: str = ""  # the decision depth's mean, baseline → this run

    @property
    def gated(self) -> bool:
        return self.status != "not_gated"

    def line(self) -> str:
        """The verdict line that ends the terminal summary (and starts a failure message)."""
        depth = "" if not self.depths else f"; relative exits, baseline {self.depths[0]} blocks, this model {self.depths[1]}"
        if self.status == "passed":
            return f"gate PASSED against {self.baseline} ({self.checked} numbers within tolerance{depth})"
        if self.status == "failed":
            where = "" if self.first_divergent is None else (
                f": departs from the baseline at layer {self.first_divergent}"
                + (" (the final norm or the embeddings)" if self.first_divergent == 0 else
                   f" (the output of block {self.first_divergent})"))
            return (f"gate FAILED against {self.baseline}{where}; {len(self.deviations)} of {self.checked} numbers "
                    f"outside tolerance{depth}")
        return f"NOT GATED: {self.why}"

    def summary_lines(self) -> list[str]:
        """The 3–5 lines a reviewer reads first: where, how much, how many rows."""
        out = []
        if self.divergence:
            out.append(f"first divergent layer: {self.divergence}")
        moved = [q for q in self.quality if q["significant"]]
        steady = sorted({q["exit"] for q in self.quality} - {q["exit"] for q in moved}, key=_exit_order)
        if self.quality:
            parts = [f"exit {q['exit']} {q['metric']} {Interval(q['mean'], q['low'], q['high'], q['n']).text()}"
                     for q in moved]
            n = self.quality[0]["n"]
            out.append("quality (paired bootstrap over " + f"{n} rows): " + ("; ".join(parts) if parts else "no exit moved beyond noise")
                       + (f"; exits {', '.join(steady)} within noise" if parts and steady else ""))
        if self.rows_changed:
            out.append("rows whose generation changed: " + ", ".join(
                f"exit {k}: {c}/{n}" for k, (c, n) in sorted(self.rows_changed.items(), key=lambda kv: _exit_order(kv[0]))))
        if self.depth_change:
            out.append(self.depth_change)
        if self.matched_exits and self.depths:
            out.append("exits matched by relative position: " + ", ".join(f"{a} → layer {b}" for a, b in self.matched_exits))
        return out

    def message(self, results_file: str | None = None) -> str:
        """The failure message: the verdict and the summary first, then at most
        :data:`DETAIL_LINES` lines of deviations (a run of layers that moved alike is one line),
        then "and N more"."""
        lines = [self.line(), *self.summary_lines()]
        runs = deviation_runs([(d.metric, d.layer, d.baseline, d.value, d.allowed, d.where, d.interval)
                               for d in self.deviations])
        shown = runs[:DETAIL_LINES]
        lines += [f"  {text}" for text, _ in shown]
        more = sum(n for _, n in runs[DETAIL_LINES:])
        if more > 0:
            lines.append(f"  and {more} more — see {results_file or 'the results file'}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def dev(d: Deviation) -> dict[str, Any]:
            out = {"metric": d.metric, "layer": d.layer, "baseline": d.baseline, "value": d.value, "allowed": d.allowed}
            if d.where:
                out["where"] = d.where
            return out

        return {
            "status": self.status, "line": self.line(), "baseline": self.baseline, "checked": self.checked,
            "outside": len(self.deviations), "why": self.why, "refused": self.refused, "warnings": list(self.warnings),
            "baseline_model": self.baseline_model, "baseline_created": self.baseline_created,
            "deviations": [dev(d) for d in self.deviations],
            "first_divergent": self.first_divergent, "divergence": self.divergence, "summary": self.summary_lines(),
            "quality": self.quality, "rows_changed": self.rows_changed,
            "within_noise": [dev(d) for d in self.within_noise], "matched_exits": self.matched_exits,
        }


def _exit_order(name: str) -> float:
    return float(name.rstrip("%")) if name.rstrip("%").replace(".", "").isdigit() else 1e9


def judge(baseline: dict[str, Any] | None, results: dict[str, Any], *, name: str | None,
          tolerances: dict[str, tuple[float, float]] | None = None, updating: bool = False,
          missing: str | None = None) -> Verdict:
    """The verdict of ``results`` against ``baseline`` (``name``: how to call the file in messages)."""
    if updating:
        return Verdict("not_gated", name, why=f"the baseline {name} is being written from this run")
    if baseline is None:
        return Verdict("not_gated", name, why=missing or f"no baseline for this model ({name} does not exist)")
    bm = baseline.get("model") or {}
    meta: dict[str, Any] = {"baseline_model": bm.get("name") or bm.get("spec"), "baseline_created": baseline.get("created")}
    why = identity_mismatch(baseline, results)
    if why:
        return Verdict("not_gated", name, why=f"baseline {name} refused, not compared: {why}", refused=True, **meta)
    devs, noise = _compare(baseline, results, tolerances)
    pairs = exit_pairs(baseline, results)
    quality = []
    for ex_name, _be, e in pairs:
        for m in EXIT_METRICS:
            deltas = _deltas(baseline, results, ex_name, m)
            if not deltas:
                continue
            ci = bootstrap_mean(deltas)
            sd = statistics.pstdev(deltas) if len(deltas) > 1 else 0.0
            quality.append({"exit": ex_name, "metric": m, "mean": round(ci.mean, 6), "low": round(ci.low, 6),
                            "high": round(ci.high, 6), "n": ci.n, "significant": ci.excludes_zero,
                            "detectable": round(detectable_effect(sd, ci.n), 6)})
    Lb, Lc = bm.get("num_layers"), results["run"]["model"]["num_layers"]
    first, evidence = first_divergent_layer(baseline, results)
    return Verdict(
        "failed" if devs else "passed", name, checked=tracked_count(baseline), deviations=devs,
        warnings=environment_warnings(baseline, results), first_divergent=first, divergence=evidence if first is not None else "",
        quality=quality, rows_changed=rows_changed(baseline, results), within_noise=noise,
        matched_exits=[[n, e["layer"] if e else None] for n, _be, e in pairs],
        depths=[Lb, Lc] if Lb is not None and Lb != Lc else None, depth_change=depth_change(baseline, results), **meta)
