"""The end-of-run digest: the terminal summary (per-exit table, phase times, files written, and
one verdict line last) and the same digest as Markdown for a pull request or
``$GITHUB_STEP_SUMMARY``. Both read the results dict (and the baseline, for deltas) only."""

from __future__ import annotations

from typing import Any

_COLUMNS = (("bleu", "BLEU", 2), ("rougeL", "ROUGE-L", 3), ("bertscore_f1", "BERTScore F1", 3))


def _fmt(v: Any, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def table_lines(results: dict[str, Any]) -> list[str]:
    rows = [("exit layer", "BLEU", "ROUGE-L", "BERTScore F1", "mean len", "empty", "first-token H")]
    tuned = [(e, " tuned") for e in results.get("tuned_exits") or []]  # --tuned-exits: through the tuned lens
    for e, how in [(e, "") for e in results["exits"]] + tuned:
        rows.append((f"{e['layer']}{how}", _fmt(e["bleu"], 2), _fmt(e["rougeL"]), _fmt(e.get("bertscore_f1")),
                     _fmt(e["mean_len"], 1), str(e["empty"]), _fmt(e["first_entropy"], 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def model_line(results: dict[str, Any]) -> str:
    m = results["run"]["model"]
    quant = f", {m['quantization']['method']}" if m.get("quantization") else ""
    adapter = m.get("adapter")
    extra = f", adapter {adapter.get('name')} ({str(adapter.get('sha256'))[:12]})" if isinstance(adapter, dict) else ""
    return (f"model {m.get('name')} ({m.get('num_layers')} blocks, {m.get('dtype')}, {m.get('device')}{quant}{extra}); "
            f"{results['run']['data']['rows']} rows; layer k = output of block k")


def summary(tr: Any, sess: Any) -> None:
    res = sess.results()
    verdict = sess.verdict()
    tr.write_sep("=", "layerwise")
    tr.write_line(model_line(res))
    for line in table_lines(res):
        tr.write_line(line)
    phases = sess.phases
    if phases:
        parts = [f"{k} {v:.1f}s" for k, v in phases.items() if k != "evaluate"]
        tr.write_line("phases: " + ", ".join(parts))
    for w in sess.written:
        tr.write_line(f"wrote {w}")
    for line in verdict.summary_lines() if verdict.gated else []:
        tr.write_line(line)
    for w in verdict.warnings:
        tr.write_line(f"warning: {w}", yellow=True)
    colour = {"passed": {"green": True}, "failed": {"red": True}}.get(verdict.status, {"yellow": True})
    tr.write_line(f"layerwise: {verdict.line()}", bold=True, **colour)


def _md_cell(v: Any, nd: int, base: Any) -> str:
    if v is None:
        return "—"
    if base is None:
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} ({v - base:+.{nd}f})"


def markdown(results: dict[str, Any], baseline: dict[str, Any] | None, report: str | None = None) -> str:
    """A short Markdown digest: verdict, exit table with deltas, the numbers that failed, the report."""
    gate = results.get("gate") or {}
    status = gate.get("status")
    icon = {"passed": "✅", "failed": "❌"}.get(status, "⚠️")
    lines = ["## layerwise", "", f"{icon} **{gate.get('line', 'not gated')}**", ""]
    lines += [f"- {s}" for s in gate.get("summary") or []]
    lines += ["", model_line(results), ""]
    base = {e["layer"]: e for e in (baseline or {}).get("exits", [])} if status in ("passed", "failed") else {}
    head = "| exit layer | " + " | ".join(t for _, t, _ in _COLUMNS) + " | empty |"
    lines += [head, "|" + " --- |" * (len(_COLUMNS) + 2)]
    for e in results["exits"]:
        b = base.get(e["layer"], {})
        cells = [_md_cell(e.get(k), nd, b.get(k)) for k, _, nd in _COLUMNS]
        lines.append(f"| {e['layer']} | " + " | ".join(cells) + f" | {e.get('empty')} |")
    if base:
        lines += ["", "Deltas in parentheses: this run − baseline."]
    devs = gate.get("deviations") or []
    if devs:
        lines += ["", f"Outside tolerance ({len(devs)}):", ""]
        from .baseline import deviation_runs

        runs = deviation_runs([(d["metric"], d["layer"], d["baseline"], d["value"], d["allowed"], d.get("where"), None)
                               for d in devs])
        lines += [f"- {text}" for text, _ in runs[:20]]
        more = sum(n for _, n in runs[20:])
        if more:
            lines.append(f"- and {more} more — see the results file")
    for w in gate.get("warnings") or []:
        lines.append(f"\n> warning: {w}")
    if gate.get("obtained"):
        lines += ["", f"To accept the change, copy `{gate['obtained']}` over `{gate.get('baseline')}`."]
    if report:
        lines += ["", f"Report: `{report}`"]
    return "\n".join(lines) + "\n"
