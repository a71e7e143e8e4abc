"""The logit lens against the tuned lens, from the results of one run (no model needed).

    layerwise run --lens logit,tuned:LENS --tuned-exits -o tuned.json     # held-out rows: a default run
    layerwise run -o plain.json                                           # optional: the same run without
    python bench/tuned_tables.py tuned.json [--plain plain.json]

Prints, as Markdown: per layer the teacher-forced KL to the final layer, top-1 agreement with the
final layer and cross-entropy of the true next token through both lenses (and the first-token
KL); per exit the generation quality of the plain and the tuned exits (BLEU, ROUGE-L, BERTScore
F1, mean length, empty rows) with paired bootstrap intervals over rows of tuned − plain; and the
run's phase times (with ``--plain``, the same run's times without the tuned lens beside them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results JSON of a run with --lens logit,tuned:PATH --tuned-exits")
    ap.add_argument("--plain", help="results JSON of the same run without the tuned lens (for its times)")
    args = ap.parse_args()
    from layerwise.paired import bootstrap_mean
    from layerwise.results import load_results

    res = load_results(args.results)
    tuned = res["lens"].get("tuned")
    if tuned is None:
        raise SystemExit(f"{args.results} has no tuned lens (run with --lens logit,tuned:PATH)")
    info = res["run"]["lens"]["tuned"]
    print(f"model {res['run']['model']['name']}, rows {[r['index'] for r in res['rows']][0]}..{res['rows'][-1]['index']}"
          f" ({res['run']['data']['rows']}), lens {info['path']} (sha256 {str(info['sha256'])[:16]}…, "
          f"training {json.dumps(info.get('training'))})")
    tf, ttf = res["lens"]["teacher_forced"], tuned["teacher_forced"]
    ft, tft = res["lens"]["first_token"], tuned["first_token"]
    print(f"\n## Per layer ({tf['positions']} teacher-forced positions; first token: {ft['rows']} rows)\n")
    print("| layer | KL logit | KL tuned | top-1 = final, logit | top-1 = final, tuned | xent logit | xent tuned "
          "| first-token KL logit | first-token KL tuned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in res["layers"]:
        print(f"| {k} | {_f(tf['kl_to_final']['mean'][k])} | {_f(ttf['kl_to_final']['mean'][k])} "
              f"| {_f(tf['top1_agree'][k], 2)} | {_f(ttf['top1_agree'][k], 2)} "
              f"| {_f(tf['xent']['mean'][k], 2)} | {_f(ttf['xent']['mean'][k], 2)} "
              f"| {_f(ft['kl_to_final']['mean'][k], 2)} | {_f(tft['kl_to_final']['mean'][k], 2)} |")
    L = res["run"]["model"]["num_layers"]
    for lo in (0, L // 2):
        a = [tf["kl_to_final"]["mean"][k] for k in range(lo, L)]
        b = [ttf["kl_to_final"]["mean"][k] for k in range(lo, L)]
        print(f"\nmean KL over layers {lo}..{L - 1}: logit {sum(a) / len(a):.3f}, tuned {sum(b) / len(b):.3f} "
              f"(ratio {sum(b) / sum(a):.2f})")

    plain = {e["layer"]: e for e in res["exits"]}
    t_exits = {e["layer"]: e for e in res.get("tuned_exits") or []}
    print("\n## Generation per exit (plain: blocks 1..k, final norm, head; tuned: translator k first)\n")
    print("| exit | lens | BLEU | ROUGE-L | BERTScore F1 | mean length | empty |")
    print("|---|---|---|---|---|---|---|")
    for k in sorted(plain):
        for name, e in (("plain", plain[k]), ("tuned", t_exits.get(k))):
            if e is None:
                continue
            print(f"| {k} | {name} | {_f(e['bleu'], 2)} | {_f(e['rougeL'])} | {_f(e.get('bertscore_f1'))} "
                  f"| {_f(e['mean_len'], 1)} | {e['empty']} |")
    print("\nPaired over rows, tuned − plain (mean, 95 % bootstrap interval; per-row sentence BLEU):\n")
    for k in sorted(t_exits):
        parts = []
        for m in ("bleu", "rougeL", "bertscore_f1"):
            pairs = [(r["tuned"]["scores"][str(k)].get(m), r["scores"][str(k)].get(m)) for r in res["rows"]]
            diffs = [a - b for a, b in pairs if a is not None and b is not None]
            if diffs:
                iv = bootstrap_mean(diffs)
                parts.append(f"{m} {iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]")
        changed = sum(r["tuned"]["tokens"][str(k)]["sha"] != r["tokens"][str(k)]["sha"] for r in res["rows"])
        print(f"- exit {k}: " + "; ".join(parts) + f"; {changed} of {len(res['rows'])} rows generate other tokens")

    t = res["timing"]
    print("\n## Times (s)\n")
    keys = ("load_s", "lens_s", "tuned_lens_s", "generate_s", "metrics_s", "total_s")
    if args.plain:
        p = load_results(args.plain)["timing"]
        print("| phase | with the tuned lens and tuned exits | without |\n|---|---|---|")
        for key in keys:
            print(f"| {key[:-2]} | {_f(t.get(key), 1)} | {_f(p.get(key), 1)} |")
    else:
        print("| phase | seconds |\n|---|---|")
        for key in keys:
            print(f"| {key[:-2]} | {_f(t.get(key), 1)} |")


if __name__ == "__main__":
    main()
