"""The self-contained HTML report of one run, rendered from its results JSON alone.

The results are validated against their typed contract (:mod:`layerwise.results`) first, so
every part read here is there and of the declared type; the optional parts (examples, grid,
drift, the raw lens, the gate's verdict) are checked for where they are read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import ResultsError
from .io import atomic_write_text
from .present import (METRICS, ROW_SCORES, bytes_text, decoding_text, delta_cell, fmt, layer_key, lens_text,
                      num, output_path, quant_text, render, seconds_text, short, svg)
from .results import validate_results
from .runid import run_id_of

# --------------------------------------------------------------------------- view model

def proof_text(p: dict | None) -> str:
    """The load-time proof of the lens (run.model.lens_proof), in one line."""
    if not p:
        return "not recorded"
    parts = ", ".join(f"{lab} {p[k]}" for k, lab in (("blocks", "blocks"), ("final_norm", "final norm"), ("head", "head"))
                      if p.get(k))
    return (f"parts {p['parts']} ({parts}); max |lens − logits| {p['max_abs_diff']:.2g} ≤ {p['tolerance']:.2g} "
            f"({p['dtype']}) on {p['probe_tokens']} probe tokens")


def run_info(results: dict) -> list[dict[str, str]]:
    """(label, value, title) rows describing one run, for a reader who never ran the tool."""
    run = results["run"]
    m, data = run["model"], run["data"]
    timing = results.get("timing") or {}
    ident = []
    if m.get("revision"):
        ident.append(f"revision {m['revision']}")
    if m.get("file_sha256"):
        ident.append(f"file sha256 {short(m['file_sha256'], 16)}")
    adapter = m.get("adapter")
    if adapter:
        ident.append(f"adapter {adapter.get('name')} (sha256 {short(adapter.get('sha256'), 16)})")
    arch = f"{m['architecture']} / {m['model_type']}"
    shape = ", ".join(f"{lab} {m[k]:,}" for k, lab in (("num_layers", "blocks"), ("hidden_size", "hidden"),
                                                       ("vocab_size", "vocab")) if m.get(k) is not None)
    stages = [k for k in ("load_s", "lens_s", "generate_s", "metrics_s") if timing.get(k) is not None]
    rows_ = [
        ("Model", f"{m['name'] or m['spec']}", ""),
        ("Spec / source", f"{m['spec']} ({m['source']})", ""),
        ("Identity", "; ".join(ident) or "not recorded (no revision, no file hash)", str(m.get("file_sha256") or "")),
        ("Architecture", f"{arch} — {shape}", ""),
        ("Lens proof", proof_text(m.get("lens_proof")), ""),
        ("Weights", (f"{m['dtype'] or '—'} on {m['device']}, quantization: "
                     f"{quant_text(m.get('quantization'))}, {bytes_text(m.get('weight_bytes'))}"), ""),
        ("Exit layers", ", ".join(str(x) for x in run["exit_layers"]) or "—", ""),
        ("Data", f"{data['path']} — {data['rows']} rows"
                 + (f" (limit {data['limit']})" if data["limit"] is not None else "")
                 + f", sha256 {short(data['sha256'], 16)}", data["sha256"]),
        ("Prompt format", data["prompt_format"], ""),
        ("Decoding", decoding_text(run["decoding"]), ""),
        ("Lens", lens_text(run["lens"]), ""),
        ("Versions", ", ".join(f"{k} {v}" for k, v in sorted(run["versions"].items())) or "—", ""),
        ("Date", str(timing.get("started") or "—"), ""),
        ("Run time", seconds_text(timing.get("total_s")) + (
            " (" + ", ".join(f"{k[:-2]} {seconds_text(timing[k])}" for k in stages) + ")" if stages else ""), ""),
    ]
    return [{"label": a, "value": b, "title": c} for a, b, c in rows_]


def tests_summary(results: dict) -> dict[str, Any]:
    tests = results.get("tests") or []
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
    summary = [(k, counts[k]) for k in order if k in counts] + sorted(
        (k, v) for k, v in counts.items() if k not in order)
    return {"items": [{"nodeid": t["nodeid"], "outcome": t["outcome"], "message": t["message"]} for t in tests],
            "summary": summary}


def _exit_rows(results: dict, baseline: dict | None) -> list[dict[str, Any]]:
    final = results["run"]["model"]["num_layers"]
    base = {}
    if baseline:
        base = {layer_key(e.get("layer")): e for e in baseline.get("exits") or [] if isinstance(e, dict)}
    out = []
    for e in sorted(results["exits"], key=lambda e: e["layer"]):
        layer = e["layer"]
        b = base.get(layer)
        cells = []
        for key, _title, digits, direction in METRICS:
            cell = delta_cell(e.get(key), b.get(key) if b else None, digits, direction)
            if baseline is not None and b is None:
                cell["note"] = "no baseline for this layer"
            cells.append(cell)
        out.append({"layer": layer, "final": layer == final,
                    "cells": cells, "in_baseline": b is not None})
    return out


def _tuned_exit_rows(results: dict) -> list[dict[str, Any]]:
    """The exits decoded through the tuned lens, each value beside the plain exit's (Δ = tuned − plain)."""
    plain = {e["layer"]: e for e in results["exits"]}
    out = []
    for e in sorted(results.get("tuned_exits") or [], key=lambda e: e["layer"]):
        p = plain.get(e["layer"], {})
        out.append({"layer": e["layer"],
                    "cells": [delta_cell(e.get(key), p.get(key), digits, direction) for key, _t, digits, direction in METRICS]})
    return out


def metric_notes(results: dict) -> list[str]:
    met = results["run"]["metrics"]
    notes = []
    if met.get("bleu_signature"):
        notes.append(f"BLEU: sacrebleu corpus BLEU, signature {met['bleu_signature']}.")
    r = met.get("rouge")
    if isinstance(r, dict):
        notes.append(f"ROUGE: rouge-score F-measure, reported {r.get('reported', 'rougeL')}"
                     + (f", also {', '.join(r.get('also') or [])}" if r.get("also") else "")
                     + f"; stemmer {'on' if r.get('use_stemmer') else 'off'}.")
    bs = met.get("bertscore")
    if isinstance(bs, dict):
        notes.append(f"BERTScore: model {bs.get('model', '?')}, layer {bs.get('num_layers', '?')}, "
                     f"idf {'on' if bs.get('idf') else 'off'}, "
                     f"rescale with baseline {'on' if bs.get('rescale_with_baseline') else 'off'}.")
    elif "bertscore" in met:
        notes.append("BERTScore: disabled for this run (its columns show —).")
    return notes


def _depth_table(results: dict) -> dict[str, Any] | None:
    ft = results["lens"]["first_token"]
    tf = results["lens"]["teacher_forced"]
    cols = [
        ("entropy, first token", (ft.get("entropy") or {}).get("mean"), 2),
        ("entropy without norm, first token", (ft.get("entropy_raw") or {}).get("mean"), 2),
        ("KL to final, first token", (ft.get("kl_to_final") or {}).get("mean"), 2),
        ("top-1 agree, first token", ft.get("top1_agree"), 2),
        ("entropy, teacher-forced", (tf.get("entropy") or {}).get("mean"), 2),
        ("entropy without norm, teacher-forced", (tf.get("entropy_raw") or {}).get("mean"), 2),
        ("KL to final, teacher-forced", (tf.get("kl_to_final") or {}).get("mean"), 2),
        ("top-1 agree, teacher-forced", tf.get("top1_agree"), 2),
        ("cross-entropy of true token", (tf.get("xent") or {}).get("mean"), 2),
        ("cross-entropy without norm", (tf.get("xent_raw") or {}).get("mean"), 2),
        ("decided (top-1), teacher-forced", tf.get("decided_top1"), 2),
        ("copy rate, teacher-forced", tf.get("copy_rate"), 3),
    ]
    tuned = results["lens"].get("tuned") or {}
    if tuned:
        t_ft, t_tf = tuned.get("first_token") or {}, tuned.get("teacher_forced") or {}
        cols += [
            ("KL to final, first token, tuned lens", (t_ft.get("kl_to_final") or {}).get("mean"), 2),
            ("entropy, teacher-forced, tuned lens", (t_tf.get("entropy") or {}).get("mean"), 2),
            ("KL to final, teacher-forced, tuned lens", (t_tf.get("kl_to_final") or {}).get("mean"), 2),
            ("top-1 agree, teacher-forced, tuned lens", t_tf.get("top1_agree"), 2),
            ("cross-entropy of true token, tuned lens", (t_tf.get("xent") or {}).get("mean"), 2),
        ]
    cols = [c for c in cols if isinstance(c[1], list) and c[1]]
    if not cols:
        return None
    layers = results["layers"]
    exits = set(results["run"]["exit_layers"])
    rows = []
    for i, layer in enumerate(layers):
        rows.append({"layer": layer, "exit": layer in exits,
                     "values": [fmt(c[1][i] if i < len(c[1]) else None, c[2]) for c in cols]})
    return {"columns": [c[0] for c in cols], "rows": rows}


def _norm_text(results: dict) -> list[str]:
    """The 'final norm or not' explanation, with this run's numbers when it has them."""
    paras = [
        ("The notebook this tool grew out of read each block's output through the unembedding "
        "directly, skipping the model's final norm; this report applies the norm to layers 0…L−1 "
        "(layer L is the model's own logits). Without the norm, intermediate hidden states have "
        "scales the unembedding was never trained on, so the entropy of their distributions "
        "reflects the vector's scale as much as what the layer 'predicts'."),
        ("The notebook's remark that early layers \"start fairly even\" (high entropy, a flat "
        "distribution) may therefore be an artifact of the missing norm: compare the dashed curve "
        "(no norm, as in the notebook) with the solid one (norm applied) below."),
    ]
    ft = results["lens"]["first_token"]
    normed = num(((ft.get("entropy") or {}).get("mean") or [None])[0])
    raw = num(((ft.get("entropy_raw") or {}).get("mean") or [None])[0])
    if normed is not None and raw is not None:
        vocab = results["run"]["model"]["vocab_size"]
        uni = f" (a uniform distribution over the vocabulary has {math.log(vocab):.2f})" if isinstance(vocab, int) and vocab > 1 else ""
        paras.append(f"In this run, at layer 0 (the embeddings) the first response token's mean entropy is "
                     f"{raw:.2f} nats without the norm and {normed:.2f} nats with it{uni}.")
    if results["run"]["lens"].get("final_norm") is False:
        paras.append("Note: this run was made with the final norm switched off, so its main lens "
                     "curves are the notebook's no-norm view.")
    return paras


def _gen_rows(results: dict) -> list[dict[str, Any]]:
    exits = sorted({layer_key(e.get("layer")) for e in results["exits"]}
                   | {layer_key(k) for r in results["rows"]
                      for k in (r.get("generations") or {})})
    out = []
    for r in results["rows"]:
        if not isinstance(r, dict):
            continue
        gens = r.get("generations") or {}
        ntok = r.get("n_tokens") or {}
        scores = r.get("scores") or {}
        cols = []
        tuned = r.get("tuned") if isinstance(r.get("tuned"), dict) else {}
        for k in exits:
            key = str(k)
            for lens, part in (("", {"generations": gens, "n_tokens": ntok, "scores": scores}), ("tuned lens", tuned)):
                p_gens = part.get("generations") or {}
                if key not in p_gens:
                    continue
                text = p_gens.get(key)
                sc = (part.get("scores") or {}).get(key) or {}
                cols.append({
                    "layer": k,
                    "lens": lens,
                    "text": "" if text is None else str(text),
                    "empty": text is None or str(text).strip() == "",
                    "n_tokens": (part.get("n_tokens") or {}).get(key),
                    "scores": [(lab, fmt(sc.get(s), d)) for s, lab, d in ROW_SCORES if s in sc],
                })
        instr = str(r.get("instruction") or "")
        out.append({
            "index": r.get("index"),
            "summary": instr if len(instr) <= 100 else instr[:99] + "…",
            "instruction": instr,
            "input": str(r.get("input") or ""),
            "reference": str(r.get("reference") or ""),
            "prompt": str(r.get("prompt") or ""),
            "cols": cols,
        })
    return out


def rows_by_index(results: dict) -> dict[Any, dict]:
    return {r["index"]: r for r in results["rows"]}


def _examples(results: dict) -> list[dict[str, Any]]:
    from . import charts

    rows = rows_by_index(results)
    tuned = {ex.get("row"): ex for ex in (results["lens"].get("tuned") or {}).get("examples", []) if isinstance(ex, dict)}
    out = []
    for i, ex in enumerate(results["lens"].get("examples", [])):
        if not isinstance(ex, dict):
            continue
        row = rows.get(ex.get("row"), {})
        caption = str(row.get("instruction") or "")
        drawn = charts.chart_example(ex, caption, i)
        t_ex = tuned.get(ex.get("row"))
        drawn_tuned = charts.chart_example(t_ex, caption, i, lens="tuned") if t_ex else None
        if drawn:
            out.append({"row": ex.get("row"), "instruction": caption, "svg": svg(drawn), "svg_tuned": svg(drawn_tuned)})
    return out


def _forecast(results: dict, baseline: dict | None) -> dict[str, Any] | None:
    """The self-speculative decoding forecast per exit (run.speculative; α and E in each exit)."""
    spec = results["run"].get("speculative")
    if not spec:
        return None
    if spec.get("skipped"):
        return {"gamma": spec["gamma"], "skipped": spec["skipped"], "rows": []}
    L = results["run"]["model"]["num_layers"]
    base = {layer_key(e.get("layer")): e for e in (baseline or {}).get("exits") or [] if isinstance(e, dict)}
    rows = []
    for e in sorted(results["exits"], key=lambda e: e["layer"]):
        a, big_e = num(e.get("accept_rate")), num(e.get("accept_tokens"))
        if a is None:
            continue
        k, g = e["layer"], spec["gamma"]
        speedup = None if big_e is None or k == L else big_e / (g * k / L + 1)
        b = base.get(k) or {}
        rows.append({"layer": k, "final": k == L, "alpha": delta_cell(a, b.get("accept_rate") if baseline else None, 3, +1),
                     "expected": fmt(big_e, 2), "speedup": fmt(speedup, 2)})
    return {"gamma": spec["gamma"], "positions": spec.get("positions"),
            "matches": fmt(spec.get("final_matches_text"), 4), "rows": rows, "skipped": None}


def check_results(results: Any, what: str) -> None:
    """Results read by a page must match the contract (one line naming the first problem)."""
    validate_results(results, what)


def _baseline_label(baseline: dict, name: str | None) -> str:
    """``b.json (model, 2026-11-29T07:00:00+00:00)``: the file, the model and the date it was made."""
    m = baseline.get("model") if isinstance(baseline.get("model"), dict) else ((baseline.get("run") or {}).get("model")) or {}
    when = baseline.get("created") or (baseline.get("timing") or {}).get("started")
    about = ", ".join(str(x) for x in (m.get("name") or m.get("spec"), when) if x)
    label = name or "the baseline file"
    return f"{label} ({about})" if about else label


def _gate(results: dict) -> dict[str, Any] | None:
    g = results.get("gate")
    if not isinstance(g, dict) or not g.get("line"):
        return None
    quality = [{"exit": q["exit"], "metric": q["metric"], "mean": f"{q['mean']:+.4f}",
                "ci": f"[{q['low']:+.4f}, {q['high']:+.4f}]", "n": q["n"],
                "verdict": "changed" if q["significant"] else "within noise",
                "detectable": f"{q['detectable']:.4f}"} for q in g.get("quality") or []]
    return {"line": str(g["line"]), "status": str(g.get("status") or ""), "summary": list(g.get("summary") or []),
            "warnings": [str(w) for w in g.get("warnings") or []], "obtained": g.get("obtained"), "quality": quality}


def _drift_context(results: dict) -> dict[str, Any] | None:
    from . import charts

    d = charts.drift_of(results)
    if d is None:
        return None
    kl = [v for v in (num(x) for x in d.get("kl_mean") or []) if v is not None and not math.isnan(v)]
    layers = results.get("layers") or list(range(len(d.get("kl_mean") or [])))
    worst = None
    if kl:
        vals = [num(x) for x in d.get("kl_mean")]
        k = max((i for i, v in enumerate(vals) if v is not None and not math.isnan(v)), key=lambda i: vals[i])
        worst = f"largest at layer {layers[k] if k < len(layers) else k}: {vals[k]:.3f} nats"
    return {"svg": svg(charts.chart_drift_report(results)), "label": str(d.get("label") or ""),
            "against": str(d.get("against") or ""), "positions": d.get("positions"), "worst": worst}


def build_report_context(results: dict, baseline: dict | None = None, baseline_name: str | None = None) -> dict[str, Any]:
    """Everything the report template shows, as display-ready strings (charts as Markup)."""
    from . import charts

    check_results(results, "results")
    if baseline is not None and (not isinstance(baseline, dict) or not isinstance(baseline.get("exits"), list)):
        raise ResultsError("the baseline has no \"exits\" list", "pass a baseline or results JSON written by layerwise")
    m = results["run"]["model"]
    grid = charts.chart_grid(results)
    row_count = len([r for r in results["rows"]])
    dashed = (" Dashed (no band): the same positions through the tuned lens (translator k, then the final norm and "
              "head).") if results["lens"].get("tuned") else ""
    return {
        "title": f"layerwise report — {m.get('name') or m.get('spec') or 'model'}",
        "model_name": m.get("name") or m.get("spec") or "model",
        "run_info": run_info(results),
        "tests": tests_summary(results),
        "metrics": [{"title": t, "direction": d} for _k, t, _d, d in METRICS],
        "exit_rows": _exit_rows(results, baseline),
        "tuned_exit_rows": _tuned_exit_rows(results),
        "baseline": None if baseline is None else {"label": _baseline_label(baseline, baseline_name or (results.get("gate") or {}).get("baseline"))},
        "gate": _gate(results),
        "metric_notes": metric_notes(results),
        "charts": [c for c in (
            {"id": "entropy", "title": "Lens entropy by depth", "svg": svg(charts.chart_entropy(results)),
             "caption": "Mean entropy of the lens distribution at each layer; the shaded band is the "
                        "inter-quartile range over rows (first token) or positions (teacher-forced). "
                        "Dotted verticals mark the exit layers." + dashed},
            {"id": "kl", "title": "KL to the final layer", "svg": svg(charts.chart_kl(results)),
             "caption": "KL(final ‖ layer): how far each layer's prediction is from the model's own output "
                        "(0 at the last layer by definition)." + dashed},
            {"id": "top1", "title": "Top-1 agreement with the final layer", "svg": svg(charts.chart_top1(results)),
             "caption": "Fraction of rows (first token) or positions (teacher-forced) where the layer's most "
                        "likely token equals the final layer's." + dashed},
            {"id": "decision", "title": "Decision depth", "svg": svg(charts.chart_decision_depth(results)),
             "caption": "For each row (first token) or position (teacher-forced): the first layer from which the "
                        "final layer's top-1 token stays top-1 at every deeper layer (left), or stays within the "
                        "top 10 (right). Bars are the fraction decided at each layer; dotted verticals mark the "
                        "exit layers, so the mass left of an exit is what that exit already gets right for good."},
            {"id": "copy", "title": "Copy collapse", "svg": svg(charts.chart_copy(results)),
             "caption": "Fraction of rows or positions whose lens top-1 token is the input token at that position: "
                        "a layer that 'predicts' a repeat of what it reads."},
        ) if c["svg"] is not None],
        "metrics_chart": svg(charts.chart_metrics(results)),
        "drift": _drift_context(results),
        "forecast": _forecast(results, baseline),
        "grid": None if grid is None else {"svg": svg(grid[0]), "note": grid[1],
                                           "row": results["lens"].get("grid", {}).get("row")},
        "examples": _examples(results),
        "norm": {"svg": svg(charts.chart_norm(results)), "text": _norm_text(results)},
        "depth_table": _depth_table(results),
        "rows": _gen_rows(results),
        "row_count": row_count,
        "run_id": run_id_of(results),
    }


def render_report(results: dict, baseline: dict | None = None, baseline_name: str | None = None) -> str:
    """The self-contained HTML report for one results dict (optionally with baseline deltas)."""
    return render("report.html.j2", build_report_context(results, baseline, baseline_name))




def write_report(results: dict, path: str | os.PathLike[str], baseline: dict | None = None,
                 baseline_name: str | None = None) -> Path:
    """Render, then write atomically: on any failure an existing file at ``path`` is untouched."""
    target = output_path(path)
    html_text = render_report(results, baseline, baseline_name)
    return atomic_write_text(target, html_text)


