"""The layer-level properties the shipped suite asserts, as plain functions over the results dict.

Each returns a list of failure messages (empty: the property holds) naming layers and numbers, so
the tests in ``layer_tests/`` stay one line and the properties can be tested on synthetic data.

Why these statistics (measured on SmolLM2-135M, docs in layer_tests/README.md): lens entropy is
not monotone in depth on a healthy model — at the first response position it *rises* with depth,
and teacher-forced it falls through about three quarters of the depth and rises again in the
last blocks. So the entropy property is a trend (Spearman ρ) over the first three quarters, plus
"the final layer is far from uniform"; KL to the final layer and top-1 agreement with it are
tested as trends — KL over the last third of the layers (in the middle it can rise: on SmolLM2
it climbs from 15 nats after block 1 to 21 after block 12 before falling to 0), agreement over all
layers; quality by exit layer is not ordered among
the early exits, so it is tested as "the final exit beats every earlier one by a margin".
"""

from __future__ import annotations

import math
from typing import Any, Sequence


class Check(list):
    """The failure messages of one property (empty: it holds) and the numbers it measured, which
    the shipped tests attach to their JUnit records (``record_property``)."""

    def __init__(self, problems: Sequence[str] = (), values: dict[str, Any] | None = None) -> None:
        super().__init__(problems)
        self.values: dict[str, Any] = dict(values or {})

    @property
    def ok(self) -> bool:
        return not self

    @property
    def message(self) -> str:
        return "\n".join(self)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("spearman needs two sequences of the same length ≥ 2")
    rx, ry = _ranks(list(xs)), _ranks(list(ys))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def _fmt_curve(vals: Sequence[float | None], layers: Sequence[int]) -> str:
    return ", ".join(f"{k}:{v:.2f}" for k, v in zip(layers, vals) if v is not None)


def lens_of(results: dict[str, Any], lens: str = "logit") -> dict[str, Any]:
    """The lens sections a trend reads: the logit lens's (``results["lens"]``), or with
    ``lens="tuned"`` the tuned lens's (``results["lens"]["tuned"]``, same shape)."""
    if lens == "logit":
        return results["lens"]
    if lens == "tuned":
        tuned = results["lens"].get("tuned")
        if tuned is None:
            from .errors import ConfigError

            raise ConfigError("--trend-lens tuned: these results have no tuned lens",
                              "run with --lens logit,tuned:PATH, or pass --trend-lens logit")
        return tuned
    raise ValueError(f"unknown lens {lens!r}")


def _named(lens: str) -> str:
    return "" if lens == "logit" else f"{lens}-lens "


def entropy_trend(results: dict[str, Any], rho_max: float, final_max_frac: float, lens_name: str = "logit") -> Check:
    lens = lens_of(results, lens_name)["teacher_forced"]["entropy"]["mean"]
    L = len(lens) - 1
    V = results["run"]["model"]["vocab_size"]
    upto = math.ceil(3 * L / 4)
    layers = list(range(1, upto + 1))
    vals = [lens[k] for k in layers]
    rho = spearman(layers, vals)
    out = []
    if not rho <= rho_max:
        out.append(f"teacher-forced {_named(lens_name)}lens entropy does not fall over layers 1..{upto}: Spearman ρ = {rho:.2f} "
                   f"(must be ≤ {rho_max}); mean entropy by layer {_fmt_curve(vals, layers)}")
    limit = final_max_frac * math.log(V)
    if not lens[L] <= limit:
        out.append(f"layer {L} (the model's output) has mean entropy {lens[L]:.2f} nats, above "
                   f"{final_max_frac} × ln V = {limit:.2f}: the model is close to uniform")
    return Check(out, {"entropy_trend_rho": _round(rho), "final_entropy": _round(lens[L])})


def kl_trend(results: dict[str, Any], rho_max: float, lens_name: str = "logit") -> Check:
    kl = lens_of(results, lens_name)["teacher_forced"]["kl_to_final"]["mean"]
    L = len(kl) - 1
    out = []
    if abs(kl[L]) > 1e-6:
        out.append(f"KL(final ‖ layer {L}) = {kl[L]:.3g}, must be 0: layer {L} is not the model's output")
    start = (2 * L) // 3
    layers = list(range(start, L + 1))
    vals = [kl[k] for k in layers]
    rho = spearman(layers, vals)
    if not rho <= rho_max:
        out.append(f"{_named(lens_name)}KL to the final layer does not fall over the last third (layers {start}..{L}): Spearman ρ = "
                   f"{rho:.2f} (must be ≤ {rho_max}); mean KL by layer {_fmt_curve(vals, layers)}")
    return Check(out, {"kl_trend_rho": _round(rho), "kl_at_L": _round(kl[L])})


def agreement_trend(results: dict[str, Any], rho_min: float, lens_name: str = "logit") -> Check:
    agree = lens_of(results, lens_name)["teacher_forced"]["top1_agree"]
    L = len(agree) - 1
    out = []
    if agree[L] != 1.0:
        out.append(f"top-1 agreement of layer {L} with itself is {agree[L]}, must be 1")
    layers = list(range(L + 1))
    rho = spearman(layers, agree)
    if not rho >= rho_min:
        out.append(f"{_named(lens_name)}top-1 agreement with the final layer does not rise with depth: Spearman ρ = {rho:.2f} "
                   f"(must be ≥ {rho_min}); agreement by layer {_fmt_curve(agree, layers)}")
    return Check(out, {"agreement_trend_rho": _round(rho)})


def quality_by_exit(results: dict[str, Any], min_rouge_gain: float, min_bleu_gain: float,
                    check_bertscore: bool = False) -> Check:
    exits = sorted(results["exits"], key=lambda e: e["layer"])
    final = exits[-1]
    out = []
    for metric, gain in (("rougeL", min_rouge_gain), ("bleu", min_bleu_gain)) + ((("bertscore_f1", 0.0),) if check_bertscore else ()):
        if final.get(metric) is None:
            if metric == "bertscore_f1":
                out.append("BERTScore is disabled (--bertscore-model none) but --check-bertscore asks for it")
            continue
        for e in exits[:-1]:
            if e.get(metric) is None:
                continue
            if not final[metric] >= e[metric] + gain:
                out.append(f"{metric}: final exit layer {final['layer']} scores {final[metric]:.4g}, not ≥ exit layer "
                           f"{e['layer']}'s {e[metric]:.4g} + {gain}")
    values = {f"exit{e['layer']}_{m}": e.get(m) for e in exits for m in ("bleu", "rougeL", "bertscore_f1")
              if e.get(m) is not None}
    return Check(out, values)


def _round(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def drift_limit(results: dict[str, Any], max_kl: float | None) -> Check:
    """With a reference model (``--drift-against``): every layer's mean KL(reference ‖ this model)
    stays ≤ ``max_kl``. The message starts with where the model first departs from the reference."""
    drift = results["lens"].get("drift")
    if drift is None:
        return Check([], {})
    kl = drift["kl_mean"]
    worst = max(range(len(kl)), key=lambda k: -1.0 if kl[k] is None else kl[k])
    first = drift.get("first_divergent")
    values = {"drift_worst_layer": worst, "drift_worst_kl": kl[worst], "drift_first_divergent": first}
    if max_kl is None:
        return Check([], values)
    over = [k for k, v in enumerate(kl) if v is not None and v > max_kl]
    if not over:
        return Check([], values)
    where = "every layer matches the reference" if first is None else (
        f"departs from {drift.get('against')} first at layer {first}" + ("" if first == 0 else f" (the output of block {first})"))
    return Check([f"{where}; mean KL(reference ‖ this model) exceeds {max_kl} at layers {', '.join(map(str, over))} "
                  f"(worst: layer {worst}, {kl[worst]:.4g} nats)"], values)
