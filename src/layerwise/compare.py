"""The HTML page comparing two runs (deltas are new − old), rendered from two results JSONs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write_text
from .present import METRICS, delta_cell, layer_key, output_path, render, svg
from .report import check_results, metric_notes, rows_by_index, run_info, tests_summary


def _exit_map(results: dict) -> dict[int, dict]:
    return {layer_key(e.get("layer")): e for e in results["exits"]}


def _compare_rows(old: dict, new: dict) -> list[dict[str, Any]]:
    a, b = _exit_map(old), _exit_map(new)
    out = []
    for layer in sorted(set(a) | set(b)):
        eo, en = a.get(layer), b.get(layer)
        cells = []
        for key, _t, digits, direction in METRICS:
            cell = delta_cell(en.get(key) if en else None, eo.get(key) if eo else None, digits, direction)
            cells.append(cell)
        out.append({"layer": layer, "missing": None if (eo and en) else ("old" if not eo else "new"),
                    "cells": cells})
    return out


def _compare_info(old: dict, new: dict) -> list[dict[str, Any]]:
    ia, ib = run_info(old), run_info(new)
    out = []
    for ra, rb in zip(ia, ib):
        out.append({"label": ra["label"], "old": ra["value"], "new": rb["value"],
                    "differs": ra["value"] != rb["value"] and ra["label"] not in ("Date", "Run time")})
    return out


def _compare_warnings(old: dict, new: dict, labels: Sequence[str]) -> list[str]:
    ra, rb = old["run"], new["run"]
    warn = []
    da, db = ra.get("data") or {}, rb.get("data") or {}
    if da.get("sha256") != db.get("sha256") or da.get("rows") != db.get("rows"):
        warn.append("The two runs used different data (file hash or row count differ): metric deltas "
                    "compare different prompts.")
    if (ra.get("decoding") or {}) != (rb.get("decoding") or {}):
        warn.append("The two runs used different decoding settings.")
    if da.get("prompt_format") != db.get("prompt_format"):
        warn.append("The two runs used different prompt formats.")
    if (ra.get("lens") or {}) != (rb.get("lens") or {}):
        warn.append("The two runs used different lens settings (final norm / teacher forcing / top-k).")
    if (ra.get("metrics") or {}) != (rb.get("metrics") or {}):
        warn.append("The two runs computed metrics differently (see signatures): scores may not be comparable.")
    ea, eb = set(ra.get("exit_layers") or []), set(rb.get("exit_layers") or [])
    if ea != eb:
        warn.append(f"The exit layers differ ({labels[0]}: {sorted(ea)}, {labels[1]}: {sorted(eb)}): "
                    "the table shows their union; a layer missing from one run has no delta.")
    return warn


def _compare_gens(old: dict, new: dict) -> list[dict[str, Any]]:
    ra, rb = rows_by_index(old), rows_by_index(new)
    out = []
    for idx in sorted(set(ra) & set(rb), key=lambda x: (x is None, x)):
        a, b = ra[idx], rb[idx]
        ga, gb = a.get("generations") or {}, b.get("generations") or {}
        layers = sorted(set(ga) | set(gb), key=layer_key)
        instr = str(b.get("instruction") or a.get("instruction") or "")
        cols = []
        for k in layers:
            ta, tb = ga.get(k), gb.get(k)
            cols.append({"layer": k, "old": "" if ta is None else str(ta), "new": "" if tb is None else str(tb),
                         "old_missing": k not in ga, "new_missing": k not in gb,
                         "same": ta == tb})
        out.append({"index": idx, "summary": instr if len(instr) <= 100 else instr[:99] + "…",
                    "reference": str(b.get("reference") or ""), "cols": cols,
                    "changed": sum(1 for c in cols if not c["same"])})
    return out


def _compare_notes(old: dict, new: dict, labels: Sequence[str]) -> list[str]:
    a, b = metric_notes(old), metric_notes(new)
    if a == b:
        return [f"both runs — {n}" for n in a]
    return [f"{labels[0]} — {n}" for n in a] + [f"{labels[1]} — {n}" for n in b]


def _divergence(old: dict, new: dict, labels: Sequence[str]) -> str:
    """The headline: where the second run's model first departs from the first's."""
    from .baseline import first_divergent_layer, make_baseline

    if old["run"]["model"]["num_layers"] != new["run"]["model"]["num_layers"]:
        return f"The models have different depths: {labels[1]} is not located against {labels[0]} layer by layer."
    k, evidence = first_divergent_layer(make_baseline(old), new)
    if k is None:
        return f"{labels[1]} matches {labels[0]} at every layer (entropy, cross-entropy, first-token top-1)."
    return f"First divergent layer: {k}. {evidence}"


def build_compare_context(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> dict[str, Any]:
    from . import charts

    labels = tuple(str(x) for x in labels)
    if len(labels) != 2:
        raise ConfigError(f"--labels needs two names, got {len(labels)}", "pass e.g. --labels main pr")
    check_results(old, f"{labels[0]} results")
    check_results(new, f"{labels[1]} results")
    ma = old["run"]["model"]
    mb = new["run"]["model"]
    drift = [charts.drift_of(r) for r in (old, new)]
    same_data = old["run"]["data"]["sha256"] == \
        new["run"]["data"]["sha256"]
    return {
        "title": f"layerwise comparison — {labels[0]}: {ma.get('name') or ma.get('spec') or '?'} vs "
                 f"{labels[1]}: {mb.get('name') or mb.get('spec') or '?'}",
        "labels": labels,
        "info": _compare_info(old, new),
        "warnings": _compare_warnings(old, new, labels),
        "divergence": _divergence(old, new, labels),
        "tests": [tests_summary(old), tests_summary(new)],
        "metrics": [{"title": t, "direction": d} for _k, t, _d, d in METRICS],
        "rows": _compare_rows(old, new),
        "metric_notes": _compare_notes(old, new, labels),
        "depth_svg": svg(charts.chart_compare_depth(old, new, labels)),
        "metrics_svg": svg(charts.chart_compare_metrics(old, new, labels)),
        "drift_svg": svg(charts.chart_drift(old, new, labels)),
        "drift_labels": [str(d.get("label") or "") for d in drift if d],
        "gens": _compare_gens(old, new) if same_data else [],
        "same_data": same_data,
    }


def render_compare(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> str:
    """A self-contained HTML page comparing two results dicts (deltas are new − old)."""
    return render("compare.html.j2", build_compare_context(old, new, labels))


def write_compare(old: dict, new: dict, path: str | os.PathLike[str],
                  labels: Sequence[str] = ("old", "new")) -> Path:
    target = output_path(path)
    html_text = render_compare(old, new, labels)
    return atomic_write_text(target, html_text)
