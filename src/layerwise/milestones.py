"""Per-row milestones of the lens: where in depth each prediction is decided, and copy collapse.

Both follow from statistics the lens already has (:class:`layerwise.lens.LayerStats`, ``(L+1, N)``
tensors over N positions), with no further pass over the vocabulary:

* **Decision depth** of a position: the first layer from which the final layer's top-1 token stays
  top-1 at every deeper layer (``top1_agree`` is 1 from there to L), and the first layer from
  which it stays within the top 10 (``final_top1_rank`` < 10 from there on). Layer L always
  qualifies, so a depth is in 0..L; a position decided at layer 0 is predicted by the embeddings
  through the final norm and head.
* **Copy collapse** at a layer: the fraction of positions whose lens top-1 is the current input
  token (the token at that position), i.e. the layer "predicts" a repeat of what it reads.

:func:`milestones` adds both to a results ``lens`` section (declared in :mod:`layerwise.results`):
per section (first token, teacher-forced) the decision-depth histogram, mean and median, and the
fraction of rows decided by each layer (the gate's curve, ``decided_top1`` / ``decided_top10``),
and the per-layer copy rate.
"""

from __future__ import annotations

from typing import Any

import torch

#: The "stays within the top k" milestone besides top-1.
TOP_K_MILESTONE = 10


def decision_depth(stable: torch.Tensor) -> torch.Tensor:
    """``stable`` (L+1, N) bool — the property holds at (layer, position) — → (N,) the first layer
    from which it holds at every deeper layer (L+1 where it does not hold at layer L)."""
    Lp1 = stable.shape[0]
    # a suffix of layers where it holds everywhere: reverse cumulative product
    suffix = stable.flip(0).to(torch.int64).cumprod(0).flip(0)
    return Lp1 - suffix.sum(0)


def depth_distribution(depth: torch.Tensor, num_layers: int) -> dict[str, Any]:
    """Depths (N,) in 0..L → histogram over layers 0..L, mean, median and the cumulative fraction
    decided by each layer (the last is 1)."""
    from .lens import rounded

    n = int(depth.numel())
    counts = torch.bincount(depth.clamp(0, num_layers), minlength=num_layers + 1)[: num_layers + 1]
    if n == 0:
        return {"mean": None, "median": None, "counts": counts.tolist(), "decided": [None] * (num_layers + 1)}
    cum = counts.cumsum(0).double() / n
    return {
        "mean": rounded(depth.double().mean(), 4),
        "median": rounded(depth.double().median(), 4),  # the lower median of an even count
        "counts": counts.tolist(),
        "decided": [rounded(v) for v in cum.tolist()],
    }


def copy_rate(top1_ids: torch.Tensor, inputs: torch.Tensor) -> list[float | None]:
    """Per layer, the fraction of positions whose top-1 token is the input token there."""
    from .lens import rounded

    if top1_ids.shape[1] == 0:
        return [None] * top1_ids.shape[0]
    return [rounded(v) for v in (top1_ids == inputs.to(top1_ids.device).unsqueeze(0)).double().mean(1).tolist()]


def section_milestones(st: Any, inputs: torch.Tensor | None) -> dict[str, Any]:
    """The milestone fields of one lens section from its LayerStats (and the input token at each
    of its positions, for copy collapse)."""
    L = st.top1_agree.shape[0] - 1
    top1 = decision_depth(st.top1_agree > 0.5)
    topk = decision_depth(st.final_top1_rank < TOP_K_MILESTONE)
    d1, dk = depth_distribution(top1, L), depth_distribution(topk, L)
    out: dict[str, Any] = {
        "decision_depth": {"top1": d1, f"top{TOP_K_MILESTONE}": dk},
        "decided_top1": d1["decided"],
        f"decided_top{TOP_K_MILESTONE}": dk["decided"],
    }
    if inputs is not None and st.top1_ids is not None:
        out["copy_rate"] = copy_rate(st.top1_ids, inputs)
    return out


def window_inputs(prompt_ids: list[list[int]], ref_ids: list[list[int]], counts: list[int]) -> torch.Tensor:
    """The input token at each teacher-forced position, rows in order: a row's positions are its
    last prompt position and then its reference tokens but the last (``counts``: positions per row,
    as :class:`layerwise.lens.Packed` lays them out)."""
    out: list[int] = []
    for p, r, c in zip(prompt_ids, ref_ids, counts):
        out += ([p[-1]] + list(r))[:c]
    return torch.tensor(out, dtype=torch.long)


def milestones(lens: dict[str, Any], st_all: Any, st_first: Any, prompt_ids: list[list[int]],
               ref_ids: list[list[int]], counts: list[int]) -> dict[str, Any]:
    """Add the milestones to a results ``lens`` section (in place) and return it; ``counts`` is each
    row's number of teacher-forced positions (the order of ``st_all``)."""
    lens["first_token"].update(section_milestones(st_first, torch.tensor([p[-1] for p in prompt_ids], dtype=torch.long)))
    lens["teacher_forced"].update(section_milestones(st_all, window_inputs(prompt_ids, ref_ids, counts)))
    return lens
