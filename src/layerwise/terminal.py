"""The end-of-run terminal summary: the per-exit-layer table, phase times, files written."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def table_lines(results: dict[str, Any]) -> list[str]:
    rows = [("exit layer", "BLEU", "ROUGE-L", "BERTScore F1", "mean len", "empty", "first-token H")]
    for e in results["exits"]:
        rows.append((str(e["layer"]), _fmt(e["bleu"], 2), _fmt(e["rougeL"]), _fmt(e.get("bertscore_f1")),
                     _fmt(e["mean_len"], 1), str(e["empty"]), _fmt(e["first_entropy"], 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def summary(tr: Any, sess: Any) -> None:
    res = sess._results
    m = res["run"]["model"]
    tr.write_sep("=", "layerwise")
    tr.write_line(f"model {m.get('name')} ({m.get('num_layers')} blocks, {m.get('dtype')}, {m.get('device')}"
                  f"{', ' + m['quantization']['method'] if m.get('quantization') else ''}); "
                  f"{res['run']['data']['rows']} rows; layer k = output of block k")
    for line in table_lines(res):
        tr.write_line(line)
    phases = sess.phases
    if phases:
        parts = [f"{k} {v:.1f}s" for k, v in phases.items() if k != "evaluate"]
        tr.write_line("phases: " + ", ".join(parts))
    for w in sess.written:
        tr.write_line(f"wrote {w}")
