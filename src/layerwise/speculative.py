"""Speculative-acceptance forecast: is exit layer k a usable draft for self-speculative decoding?

In self-speculative (early-exit) decoding, the first k blocks + final norm + head — exactly this
project's early exit at k — draft γ tokens greedily, and the full model checks them in one forward,
keeping the longest prefix that equals its own greedy choices plus one token of its own. Along the
full model's greedy text, every drafted token that is checked was drafted on a prefix the full
model agrees with, so whether it is accepted is whether exit k's argmax equals the full model's
next token there. Hence the forecast, teacher-forced on the final exit's own greedy generation:

* ``α_k`` — the fraction of those positions where exit k's argmax equals the full model's;
* ``E = (1 − α^(γ+1)) / (1 − α)`` — the expected number of tokens each full-model forward yields
  with a draft of γ tokens, if each drafted token is accepted independently with probability α
  (Leviathan et al. 2023): 1 when no draft is ever accepted, γ + 1 when every one is.

Real acceptance runs in streaks, so E is a forecast; ``bench/speculative.py`` measures it against
transformers' ``generate(..., assistant_early_exit=k)`` on the default model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_DRAFT_TOKENS


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens per full-model forward with drafts of ``gamma`` tokens accepted
    independently with probability ``alpha``: (1 − α^(γ+1)) / (1 − α), and γ + 1 at α = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class Forecast:
    """Per exit: the acceptance rate over all positions, and per row (in row order)."""

    gamma: int
    positions: int
    alpha: dict[int, float]
    row_alpha: dict[int, list[float | None]]
    final_matches_text: float  # the fraction of positions whose full-model argmax is the generated token
    flags: dict[int, list[list[bool]]]  # exit -> per row, per generated position: exit's argmax = the full model's

    def expected(self, exit_layer: int) -> float:
        return expected_tokens(self.alpha[exit_layer], self.gamma)


def acceptance(bundle: Any, prompt_ids: list[list[int]], generated: list[list[int]], exits: list[int], *,
               gamma: int = DEFAULT_DRAFT_TOKENS, batch_size: int = 20, rows_per_matmul: int = 256,
               on_batch: Any = None) -> Forecast:
    """The forecast for ``exits``, teacher-forced on ``generated`` (per row, the final exit's
    greedy tokens after ``prompt_ids``): one forward per batch of ``prompt | generated`` rows,
    then each exit's argmax at every generated position against the final layer's.

    The positions are those that predict generated tokens 0..n-1 (the last prompt position and
    each generated token but the last). A row with no generated token contributes none."""
    import torch

    from .families import batch_prompts
    from .lens import pack_rows

    adapter = bundle.adapter
    L = adapter.num_layers
    dev = bundle.device
    tok = bundle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    step = batch_size if batch_prompts(str(adapter.model_type), bundle.info.get("lens_proof")) else 1
    hits = {k: 0 for k in exits}
    row_alpha: dict[int, list[float | None]] = {k: [] for k in exits}
    flags: dict[int, list[list[bool]]] = {k: [] for k in exits}
    positions = same_as_text = 0
    for b0 in range(0, len(prompt_ids), step):
        rows = range(b0, min(len(prompt_ids), b0 + step))
        packed = pack_rows([prompt_ids[i] for i in rows], [generated[i] for i in rows], pad)
        has = torch.tensor([len(generated[i]) > 0 for i in rows])
        valid = packed.valid & has.unsqueeze(1)  # pack_rows keeps one position of an empty row
        store = adapter.forward(packed.ids.to(dev), packed.mask.to(dev), select=packed.window)
        counts = valid.sum(1).tolist()
        with torch.inference_mode():
            flat = {k: store[k][valid.to(store[k].device)] for k in {*exits, L}}
            n = int(valid.sum())
            chunk = max(1, rows_per_matmul)
            top: dict[int, torch.Tensor] = {}
            for k in sorted({*exits, L}):
                parts = [adapter.unembed(flat[k][s:s + chunk], norm=(k != L)).argmax(-1).cpu() for s in range(0, n, chunk)]
                top[k] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        positions += n
        same_as_text += int((top[L] == packed.targets[valid]).sum())
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        for k in exits:
            agree = top[k] == top[L]
            hits[k] += int(agree.sum())
            row_alpha[k] += [float(agree[a:b].double().mean()) if b > a else None for a, b in zip(bounds, bounds[1:])]
            flags[k] += [agree[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
        del store, flat
        if on_batch is not None:
            on_batch(len(rows))
    alpha = {k: (hits[k] / positions if positions else float("nan")) for k in exits}
    return Forecast(gamma=gamma, positions=positions, alpha=alpha, row_alpha=row_alpha,
                    final_matches_text=same_as_text / positions if positions else float("nan"), flags=flags)


@dataclass
class Rounds:
    """Counts of a self-speculative decode: full-model forwards, drafted tokens checked, accepted."""

    steps: int = 0
    checked: int = 0
    accepted: int = 0
    tokens: int = 0

    def __iadd__(self, other: "Rounds") -> "Rounds":
        self.steps += other.steps
        self.checked += other.checked
        self.accepted += other.accepted
        self.tokens += other.tokens
        return self


def simulate(flags: list[bool], gamma: int, budget: int) -> Rounds:
    """What greedy self-speculative decoding does along one row's text, given at each generated
    position whether the draft's argmax equals the full model's (``flags``, one per generated
    token): each round drafts min(γ, budget − generated − 1) tokens, the full model keeps the
    longest agreeing prefix and adds one token of its own, until the text (``len(flags)`` tokens,
    ending at EOS or the budget) is complete. Exact for the counts of transformers' assisted
    decoding with ``assistant_early_exit`` and a constant γ — the per-position acceptances are no
    forecast; only E's assumption that they are independent is."""
    n = len(flags)
    out = Rounds()
    pos = 0
    while pos < n:
        g = max(0, min(gamma, budget - pos - 1))
        m = 0
        while m < g and pos + m < n and flags[pos + m]:
            m += 1
        m = min(m, n - pos - 1)  # accepted tokens past the end (EOS, budget) are cut
        out.steps += 1
        out.accepted += m
        out.checked += min(m + 1, g)
        pos += m + 1
    out.tokens = n
    return out


def skipped_because(exits: list[int], num_layers: int, do_sample: bool) -> str | None:
    """Why a run gets no forecast, or None."""
    if num_layers not in exits:
        return f"the forecast reads the final exit's own generation: add layer {num_layers} to --exit-layers"
    if do_sample:
        return "the forecast is for greedy decoding (drafts checked against the full model's argmax); this run samples"
    return None


def forecast_phase(bundle: Any, prompt_ids: list[list[int]], tokens: dict[int, list[list[int]]], exits: list[int],
                   config: Any, progress: Any) -> tuple[Forecast | None, str | None]:
    """The runner's ``forecast`` phase: (the forecast, None), or (None, why there is none)."""
    L = bundle.adapter.num_layers
    why_not = skipped_because(exits, L, config.decoding.do_sample)
    if why_not is not None:
        return None, why_not
    with progress.phase("forecast", total=len(prompt_ids), unit="row") as ph:
        fc = acceptance(bundle, prompt_ids, tokens[L], exits, gamma=config.draft_tokens,
                        batch_size=config.batch_size, on_batch=ph.update)
        ph.note(f"acceptance at {len(exits)} exits over {fc.positions} positions of the final exit's text")
    return fc, None


def forecast_section(fc: Forecast | None, gamma: int, why_not: str | None) -> dict[str, Any]:
    """``run.speculative`` of the results (declared in results.Speculative)."""
    from .lens import rounded

    if fc is None:
        return {"gamma": gamma, "skipped": why_not or "not computed"}
    return {"gamma": gamma, "positions": fc.positions, "final_matches_text": rounded(fc.final_matches_text)}


def attach(fc: Forecast, exit_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Each exit's ``accept_rate`` (α) and ``accept_tokens`` (E at γ) into the exit rows, and each
    row's own α into its per-exit scores (the gate's paired comparison over rows)."""
    from .lens import rounded

    for e in exit_rows:
        k = e["layer"]
        if k in fc.alpha:
            a = fc.alpha[k]
            e["accept_rate"] = rounded(a)
            e["accept_tokens"] = None if a != a else rounded(fc.expected(k), 4)
    for i, r in enumerate(rows):
        for k, per_row in fc.row_alpha.items():
            r["scores"].setdefault(str(k), {})["accept_rate"] = None if per_row[i] is None else rounded(per_row[i])
