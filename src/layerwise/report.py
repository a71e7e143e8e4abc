"""The self-contained HTML report (and the two-run comparison), rendered from results JSON alone.

Jinja2 with autoescape on for every template: model generations, prompts, tokens and test
messages are untrusted text. The only markup inserted unescaped is the SVG that
:mod:`layerwise.charts` draws (wrapped in :class:`markupsafe.Markup` here, nowhere else).
The page needs nothing from the network: CSS is inline, there are no scripts, fonts or images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, ResultsError
from .io import atomic_write_text
from .runid import run_id_of
from .results import validate_results

# (key, column title, decimals, direction): +1 higher is better, -1 lower is better, 0 neutral.
METRICS: tuple[tuple[str, str, int, int], ...] = (
    ("bleu", "BLEU", 2, +1),
    ("rougeL", "ROUGE-L", 3, +1),
    ("rougeLsum", "ROUGE-Lsum", 3, +1),
    ("bertscore_f1", "BERTScore F1", 3, +1),
    ("mean_len", "mean length (tokens)", 1, 0),
    ("empty", "empty generations", 0, -1),
    ("first_entropy", "first-token entropy (nats)", 2, 0),
)
ROW_SCORES: tuple[tuple[str, str, int], ...] = (("bleu", "BLEU", 2), ("rougeL", "ROUGE-L", 3),
                                                 ("bertscore_f1", "BERTScore F1", 3))

_ENV = None


# --------------------------------------------------------------------------- jinja

def _load_template(name: str) -> str | None:
    from importlib import resources

    try:
        return resources.files("layerwise.templates").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        return None


def _env():
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(
            loader=jinja2.FunctionLoader(_load_template),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
    return _ENV


def _safe(svg: str | None):
    """Mark SVG produced by layerwise.charts as markup (never call this on user text)."""
    if svg is None:
        return None
    from markupsafe import Markup

    return Markup(svg)


# --------------------------------------------------------------------------- formatting

def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def fmt(v: Any, digits: int) -> str:
    """A number as displayed in the tables: fixed decimals, ``—`` when absent."""
    f = _num(v)
    if f is None:
        return "—"
    if math.isnan(f):
        return "n/a"
    if digits == 0:
        return f"{f:,.0f}"
    return f"{f:,.{digits}f}"


def fmt_delta(d: float, digits: int) -> str:
    s = f"{d:+,.{digits}f}" if digits else f"{d:+,.0f}"
    return "±0" if float(s.replace(",", "")) == 0 else s


def delta_cell(new: Any, old: Any, digits: int, direction: int) -> dict[str, Any]:
    """Display data for one value with its change against an older value."""
    cell: dict[str, Any] = {"value": fmt(new, digits), "old": fmt(old, digits), "delta": None, "cls": ""}
    a, b = _num(new), _num(old)
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return cell
    d = round(a - b, digits)
    cell["delta"] = fmt_delta(d, digits)
    if d == 0:
        cell["cls"] = "same"
    elif direction == 0:
        cell["cls"] = "neutral"
    else:
        cell["cls"] = "better" if d * direction > 0 else "worse"
    return cell


def _bytes(n: Any) -> str:
    f = _num(n)
    if f is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if f >= size:
            return f"{f / size:.1f} {unit} ({int(f):,} bytes)"
    return f"{int(f):,} bytes"


def _seconds(v: Any) -> str:
    f = _num(v)
    return "—" if f is None else (f"{f:.1f} s" if f < 120 else f"{f / 60:.1f} min")


def _quant(q: Any) -> str:
    if not q:
        return "none"
    if isinstance(q, dict):
        method = q.get("method", "?")
        rest = ", ".join(f"{k}={v}" for k, v in sorted(q.items()) if k != "method")
        return f"{method} ({rest})" if rest else str(method)
    return str(q)


def _decoding(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return "—"
    parts = []
    if d.get("do_sample"):
        parts.append("sampling")
        for k in ("temperature", "top_k", "top_p", "seed"):
            if d.get(k) is not None:
                parts.append(f"{k}={d[k]}")
    else:
        parts.append("greedy")
    if d.get("max_new_tokens") is not None:
        parts.append(f"max_new_tokens={d['max_new_tokens']}")
    return ", ".join(parts)


def _lens_settings(s: Any) -> str:
    if not isinstance(s, dict) or not s:
        return "—"
    parts = ["final norm applied" if s.get("final_norm", True) else "NO final norm (unembedding only)"]
    if s.get("teacher_forced_tokens") is not None:
        parts.append(f"teacher forcing over the first {s['teacher_forced_tokens']} reference tokens")
    if s.get("top_k") is not None:
        parts.append(f"top-{s['top_k']} kept")
    return "; ".join(parts)


def _short(h: Any, n: int = 12) -> str:
    return "—" if not h else (str(h)[:n] + "…" if len(str(h)) > n else str(h))


def _layer_key(k: Any) -> int:
    try:
        return int(k)
    except (TypeError, ValueError):
        return 10**9


# --------------------------------------------------------------------------- view model

def _run_info(results: dict) -> list[dict[str, str]]:
    """(label, value, title) rows describing one run, for a reader who never ran the tool."""
    run = results.get("run") or {}
    m = run.get("model") or {}
    data = run.get("data") or {}
    timing = results.get("timing") or {}
    ident = []
    if m.get("revision"):
        ident.append(f"revision {m['revision']}")
    if m.get("file_sha256"):
        ident.append(f"file sha256 {_short(m['file_sha256'], 16)}")
    arch = " / ".join(str(x) for x in (m.get("architecture"), m.get("model_type")) if x)
    shape = ", ".join(f"{lab} {m[k]:,}" if isinstance(m.get(k), int) else f"{lab} {m[k]}"
                      for k, lab in (("num_layers", "blocks"), ("hidden_size", "hidden"),
                                     ("vocab_size", "vocab")) if m.get(k) is not None)
    rows_ = [
        ("Model", f"{m.get('name') or m.get('spec') or '—'}", ""),
        ("Spec / source", f"{m.get('spec', '—')} ({m.get('source', '?')})", ""),
        ("Identity", "; ".join(ident) or "not recorded (no revision, no file hash)",
         str(m.get("file_sha256") or "")),
        ("Architecture", " — ".join(x for x in (arch, shape) if x) or "—", ""),
        ("Weights", (f"{m.get('dtype', '—')} on {m.get('device', '—')}, quantization: "
                     f"{_quant(m.get('quantization'))}, {_bytes(m.get('weight_bytes'))}"), ""),
        ("Exit layers", ", ".join(str(x) for x in run.get("exit_layers") or []) or "—", ""),
        ("Data", f"{data.get('path', '—')} — {data.get('rows', '?')} rows"
                 + (f" (limit {data['limit']})" if data.get("limit") is not None else "")
                 + f", sha256 {_short(data.get('sha256'), 16)}", str(data.get("sha256") or "")),
        ("Prompt format", str(data.get("prompt_format") or "—"), ""),
        ("Decoding", _decoding(run.get("decoding")), ""),
        ("Lens", _lens_settings(run.get("lens")), ""),
        ("Versions", ", ".join(f"{k} {v}" for k, v in sorted((run.get("versions") or {}).items())) or "—", ""),
        ("Date", str(timing.get("started") or "—"), ""),
        ("Run time", _seconds(timing.get("total_s")) + (
            " (" + ", ".join(f"{k[:-2]} {_seconds(timing[k])}" for k in ("load_s", "lens_s", "generate_s", "metrics_s")
                             if timing.get(k) is not None) + ")"
            if any(timing.get(k) is not None for k in ("load_s", "lens_s", "generate_s", "metrics_s")) else ""), ""),
    ]
    return [{"label": a, "value": b, "title": c} for a, b, c in rows_]


def _tests(results: dict) -> dict[str, Any]:
    tests = [t for t in results.get("tests") or [] if isinstance(t, dict)]
    counts: dict[str, int] = {}
    for t in tests:
        counts[str(t.get("outcome", "?"))] = counts.get(str(t.get("outcome", "?")), 0) + 1
    order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
    summary = [(k, counts[k]) for k in order if k in counts] + sorted(
        (k, v) for k, v in counts.items() if k not in order)
    return {"items": [{"nodeid": str(t.get("nodeid", "?")), "outcome": str(t.get("outcome", "?")),
                       "message": str(t.get("message") or "")} for t in tests],
            "summary": summary}


def _exit_rows(results: dict, baseline: dict | None) -> list[dict[str, Any]]:
    final = (((results.get("run") or {}).get("model")) or {}).get("num_layers")
    base = {}
    if baseline:
        base = {_layer_key(e.get("layer")): e for e in baseline.get("exits") or [] if isinstance(e, dict)}
    out = []
    for e in sorted((e for e in results.get("exits") or [] if isinstance(e, dict)),
                    key=lambda e: _layer_key(e.get("layer"))):
        layer = _layer_key(e.get("layer"))
        b = base.get(layer)
        cells = []
        for key, _title, digits, direction in METRICS:
            cell = delta_cell(e.get(key), b.get(key) if b else None, digits, direction)
            if baseline is not None and b is None:
                cell["note"] = "no baseline for this layer"
            cells.append(cell)
        out.append({"layer": e.get("layer"), "final": final is not None and layer == final,
                    "cells": cells, "in_baseline": b is not None})
    return out


def _metric_notes(results: dict) -> list[str]:
    met = (results.get("run") or {}).get("metrics") or {}
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
    ft = ((results.get("lens") or {}).get("first_token")) or {}
    tf = ((results.get("lens") or {}).get("teacher_forced")) or {}
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
    ]
    cols = [c for c in cols if isinstance(c[1], list) and c[1]]
    if not cols:
        return None
    layers = results.get("layers") or list(range(max(len(c[1]) for c in cols)))
    exits = set((results.get("run") or {}).get("exit_layers") or [])
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
    ft = ((results.get("lens") or {}).get("first_token")) or {}
    normed = _num(((ft.get("entropy") or {}).get("mean") or [None])[0])
    raw = _num(((ft.get("entropy_raw") or {}).get("mean") or [None])[0])
    if normed is not None and raw is not None:
        vocab = ((results.get("run") or {}).get("model") or {}).get("vocab_size")
        uni = f" (a uniform distribution over the vocabulary has {math.log(vocab):.2f})" if isinstance(vocab, int) and vocab > 1 else ""
        paras.append(f"In this run, at layer 0 (the embeddings) the first response token's mean entropy is "
                     f"{raw:.2f} nats without the norm and {normed:.2f} nats with it{uni}.")
    if (((results.get("run") or {}).get("lens")) or {}).get("final_norm") is False:
        paras.append("Note: this run was made with the final norm switched off, so its main lens "
                     "curves are the notebook's no-norm view.")
    return paras


def _gen_rows(results: dict) -> list[dict[str, Any]]:
    exits = sorted({_layer_key(e.get("layer")) for e in results.get("exits") or [] if isinstance(e, dict)}
                   | {_layer_key(k) for r in results.get("rows") or [] if isinstance(r, dict)
                      for k in (r.get("generations") or {})})
    out = []
    for r in results.get("rows") or []:
        if not isinstance(r, dict):
            continue
        gens = r.get("generations") or {}
        ntok = r.get("n_tokens") or {}
        scores = r.get("scores") or {}
        cols = []
        for k in exits:
            key = str(k)
            if key not in gens:
                continue
            text = gens.get(key)
            sc = scores.get(key) or {}
            cols.append({
                "layer": k,
                "text": "" if text is None else str(text),
                "empty": text is None or str(text).strip() == "",
                "n_tokens": ntok.get(key),
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


def _row_by_index(results: dict) -> dict[Any, dict]:
    return {r.get("index"): r for r in results.get("rows") or [] if isinstance(r, dict)}


def _examples(results: dict) -> list[dict[str, Any]]:
    from . import charts

    rows = _row_by_index(results)
    out = []
    for i, ex in enumerate(((results.get("lens") or {}).get("examples")) or []):
        if not isinstance(ex, dict):
            continue
        row = rows.get(ex.get("row"), {})
        caption = str(row.get("instruction") or "")
        svg = charts.chart_example(ex, caption, i)
        if svg:
            out.append({"row": ex.get("row"), "instruction": caption, "svg": _safe(svg)})
    return out


def _check(results: Any, what: str) -> None:
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
    return {"line": str(g["line"]), "status": str(g.get("status") or ""),
            "warnings": [str(w) for w in g.get("warnings") or []], "obtained": g.get("obtained")}


def _drift_context(results: dict) -> dict[str, Any] | None:
    from . import charts

    d = charts.drift_of(results)
    if d is None:
        return None
    kl = [v for v in (_num(x) for x in d.get("kl_mean") or []) if v is not None and not math.isnan(v)]
    layers = results.get("layers") or list(range(len(d.get("kl_mean") or [])))
    worst = None
    if kl:
        vals = [_num(x) for x in d.get("kl_mean")]
        k = max((i for i, v in enumerate(vals) if v is not None and not math.isnan(v)), key=lambda i: vals[i])
        worst = f"largest at layer {layers[k] if k < len(layers) else k}: {vals[k]:.3f} nats"
    return {"svg": _safe(charts.chart_drift_report(results)), "label": str(d.get("label") or ""),
            "against": str(d.get("against") or ""), "positions": d.get("positions"), "worst": worst}


def build_report_context(results: dict, baseline: dict | None = None, baseline_name: str | None = None) -> dict[str, Any]:
    """Everything the report template shows, as display-ready strings (charts as Markup)."""
    from . import charts

    _check(results, "results")
    if baseline is not None and (not isinstance(baseline, dict) or not isinstance(baseline.get("exits"), list)):
        raise ResultsError("the baseline has no \"exits\" list", "pass a baseline or results JSON written by layerwise")
    m = ((results.get("run") or {}).get("model")) or {}
    grid = charts.chart_grid(results)
    row_count = len([r for r in results.get("rows") or [] if isinstance(r, dict)])
    return {
        "title": f"layerwise report — {m.get('name') or m.get('spec') or 'model'}",
        "model_name": m.get("name") or m.get("spec") or "model",
        "run_info": _run_info(results),
        "tests": _tests(results),
        "metrics": [{"title": t, "direction": d} for _k, t, _d, d in METRICS],
        "exit_rows": _exit_rows(results, baseline),
        "baseline": None if baseline is None else {"label": _baseline_label(baseline, baseline_name or (results.get("gate") or {}).get("baseline"))},
        "gate": _gate(results),
        "metric_notes": _metric_notes(results),
        "charts": [c for c in (
            {"id": "entropy", "title": "Lens entropy by depth", "svg": _safe(charts.chart_entropy(results)),
             "caption": "Mean entropy of the lens distribution at each layer; the shaded band is the "
                        "inter-quartile range over rows (first token) or positions (teacher-forced). "
                        "Dotted verticals mark the exit layers."},
            {"id": "kl", "title": "KL to the final layer", "svg": _safe(charts.chart_kl(results)),
             "caption": "KL(final ‖ layer): how far each layer's prediction is from the model's own output "
                        "(0 at the last layer by definition)."},
            {"id": "top1", "title": "Top-1 agreement with the final layer", "svg": _safe(charts.chart_top1(results)),
             "caption": "Fraction of rows (first token) or positions (teacher-forced) where the layer's most "
                        "likely token equals the final layer's."},
        ) if c["svg"] is not None],
        "metrics_chart": _safe(charts.chart_metrics(results)),
        "drift": _drift_context(results),
        "grid": None if grid is None else {"svg": _safe(grid[0]), "note": grid[1],
                                           "row": ((results.get("lens") or {}).get("grid") or {}).get("row")},
        "examples": _examples(results),
        "norm": {"svg": _safe(charts.chart_norm(results)), "text": _norm_text(results)},
        "depth_table": _depth_table(results),
        "rows": _gen_rows(results),
        "row_count": row_count,
        "run_id": run_id_of(results),
    }


def _shape_guard(build, *args):
    """Build a context; a results file whose parts have the wrong types is a ResultsError, one line."""
    try:
        return build(*args)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise ResultsError(
            f"results have an unexpected shape ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})",
            "re-run to write the results file again; it was not written by this version of layerwise",
        ) from exc


def render_report(results: dict, baseline: dict | None = None, baseline_name: str | None = None) -> str:
    """The self-contained HTML report for one results dict (optionally with baseline deltas)."""
    ctx = _shape_guard(build_report_context, results, baseline, baseline_name)
    return _env().get_template("report.html.j2").render(**ctx)


def _target(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder", "pass a file name for the report, e.g. report.html")
    return p


def write_report(results: dict, path: str | os.PathLike[str], baseline: dict | None = None,
                 baseline_name: str | None = None) -> Path:
    """Render, then write atomically: on any failure an existing file at ``path`` is untouched."""
    target = _target(path)
    html_text = render_report(results, baseline, baseline_name)
    return atomic_write_text(target, html_text)


# --------------------------------------------------------------------------- compare

def _exit_map(results: dict) -> dict[int, dict]:
    return {_layer_key(e.get("layer")): e for e in results.get("exits") or [] if isinstance(e, dict)}


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
    ia, ib = _run_info(old), _run_info(new)
    out = []
    for ra, rb in zip(ia, ib):
        out.append({"label": ra["label"], "old": ra["value"], "new": rb["value"],
                    "differs": ra["value"] != rb["value"] and ra["label"] not in ("Date", "Run time")})
    return out


def _compare_warnings(old: dict, new: dict, labels: Sequence[str]) -> list[str]:
    ra, rb = old.get("run") or {}, new.get("run") or {}
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
    ra, rb = _row_by_index(old), _row_by_index(new)
    out = []
    for idx in sorted(set(ra) & set(rb), key=lambda x: (x is None, x)):
        a, b = ra[idx], rb[idx]
        ga, gb = a.get("generations") or {}, b.get("generations") or {}
        layers = sorted(set(ga) | set(gb), key=_layer_key)
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
    a, b = _metric_notes(old), _metric_notes(new)
    if a == b:
        return [f"both runs — {n}" for n in a]
    return [f"{labels[0]} — {n}" for n in a] + [f"{labels[1]} — {n}" for n in b]


def build_compare_context(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> dict[str, Any]:
    from . import charts

    labels = tuple(str(x) for x in labels)
    if len(labels) != 2:
        raise ConfigError(f"--labels needs two names, got {len(labels)}", "pass e.g. --labels main pr")
    _check(old, f"{labels[0]} results")
    _check(new, f"{labels[1]} results")
    ma = ((old.get("run") or {}).get("model")) or {}
    mb = ((new.get("run") or {}).get("model")) or {}
    drift = [charts.drift_of(r) for r in (old, new)]
    same_data = ((old.get("run") or {}).get("data") or {}).get("sha256") == \
        ((new.get("run") or {}).get("data") or {}).get("sha256")
    return {
        "title": f"layerwise comparison — {labels[0]}: {ma.get('name') or ma.get('spec') or '?'} vs "
                 f"{labels[1]}: {mb.get('name') or mb.get('spec') or '?'}",
        "labels": labels,
        "info": _compare_info(old, new),
        "warnings": _compare_warnings(old, new, labels),
        "tests": [_tests(old), _tests(new)],
        "metrics": [{"title": t, "direction": d} for _k, t, _d, d in METRICS],
        "rows": _compare_rows(old, new),
        "metric_notes": _compare_notes(old, new, labels),
        "depth_svg": _safe(charts.chart_compare_depth(old, new, labels)),
        "metrics_svg": _safe(charts.chart_compare_metrics(old, new, labels)),
        "drift_svg": _safe(charts.chart_drift(old, new, labels)),
        "drift_labels": [str(d.get("label") or "") for d in drift if d],
        "gens": _compare_gens(old, new) if same_data else [],
        "same_data": same_data,
    }


def render_compare(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> str:
    """A self-contained HTML page comparing two results dicts (deltas are new − old)."""
    ctx = _shape_guard(build_compare_context, old, new, labels)
    return _env().get_template("compare.html.j2").render(**ctx)


def write_compare(old: dict, new: dict, path: str | os.PathLike[str],
                  labels: Sequence[str] = ("old", "new")) -> Path:
    target = _target(path)
    html_text = render_compare(old, new, labels)
    return atomic_write_text(target, html_text)
