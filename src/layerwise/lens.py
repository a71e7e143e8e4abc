"""The logit lens: per-layer next-token statistics, streamed.

Layer k (1..L) is the output of block k, layer 0 the input of block 1 (the embeddings, after any
scaling or position embeddings the model adds). Layers 0..L-1 go through the final norm and the
head (:meth:`Adapter.unembed`); layer L is the base model's own ``last_hidden_state`` through the
head alone, i.e. exactly the model's logits.

Hidden states come from :meth:`Adapter.forward` (hooks on the blocks, only at the positions asked
for), and the statistics are computed layer by layer over chunks of positions, so an L × T × V
tensor never exists: peak extra memory is about ``chunk × V`` floats a few times over.

The lens also owns its inputs and outputs: :func:`pack_rows` lays out teacher-forced
``prompt | reference`` rows, and :func:`lens_section` / :func:`summary` / :func:`rounded` turn
statistics into the per-layer curves of the results JSON.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from .archs import Adapter
from .scan import Scan, scan_logits

STATS = ("entropy", "kl_to_final", "top1_agree", "final_top1_rank", "xent", "entropy_raw", "xent_raw")


def capture_hidden(adapter: Adapter, select: Any = None) -> contextlib.AbstractContextManager[dict[int, torch.Tensor]]:
    """Record layers 0..L-1 during a forward: :meth:`Adapter.capture` (layer L is the base model's
    ``last_hidden_state``; :meth:`Adapter.forward` gives all L+1 layers in one call)."""
    return adapter.capture(select)


@dataclass
class LayerStats:
    """Statistics for ``N`` positions at every layer: each tensor is ``(L+1, N)`` on the CPU."""

    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    top1_agree: torch.Tensor
    final_top1_rank: torch.Tensor
    xent: torch.Tensor | None
    entropy_raw: torch.Tensor | None
    xent_raw: torch.Tensor | None
    topk_ids: torch.Tensor | None  # (L+1, N, k)
    topk_probs: torch.Tensor | None
    top1_ids: torch.Tensor | None = None  # (L+1, N): each layer's most likely token (long)
    top1_prob: torch.Tensor | None = None  # (L+1, N): its probability

    def take(self, idx: torch.Tensor) -> "LayerStats":
        """The statistics at positions ``idx`` only."""
        return LayerStats(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[:, idx]
                             for f in fields(self)})


#: Rows of one head matmul in the lens: the head streams V × d weights per matmul, so more rows
#: run closer to the matmul's peak (CPU, 49,152 × 576 head: 105 GFLOP/s at 256 rows, 113 at 512),
#: at the cost of a few (rows × V) float32 buffers.
ROWS_PER_MATMUL = 384


def balanced_chunk(n: int, cap: int) -> int:
    """Positions per chunk when ``n`` positions are cut into as few chunks of at most ``cap`` as
    possible, of equal size: 552 positions under a cap of 384 are two chunks of 276, not 384 + 168
    (a short last chunk runs its matmuls at a fraction of the speed)."""
    if n <= 0:
        return 1
    pieces = -(-n // max(1, cap))
    return -(-n // pieces)


def layer_stats(
    adapter: Adapter,
    hidden: dict[int, torch.Tensor],
    targets: torch.Tensor | None = None,
    *,
    top_k: int = 0,
    raw: bool = False,
    rows_per_matmul: int = ROWS_PER_MATMUL,
) -> LayerStats:
    """Lens statistics from hidden states of layers 0..L, each ``(N, d)`` (positions flattened).

    ``hidden[L]`` must be the base model's (already normed) last hidden state. ``targets`` (N,)
    holds the true next token at each position, or -100 where it is unknown.

    The head is memory-bound for few rows, so several layers' positions share one matmul of about
    ``rows_per_matmul`` rows. Each matmul's logits are then read by :func:`scan_logits`, which
    gives every statistic in a few passes over cache-sized blocks of rows.
    """
    return _layer_stats(adapter, hidden, targets, top_k=top_k, raw=raw, rows_per_matmul=rows_per_matmul)[0]


def layer_stats_at(
    adapter: Adapter,
    hidden: dict[int, torch.Tensor],
    targets: torch.Tensor | None,
    at: torch.Tensor,
    *,
    top_k: int = 0,
    raw: bool = False,
    rows_per_matmul: int = ROWS_PER_MATMUL,
) -> tuple[LayerStats, LayerStats]:
    """:func:`layer_stats` at all N positions, and at the positions ``at`` (distinct indices) with
    the costlier extras too: the top-k lists and the raw (no-norm) lens. One pass: the positions
    of ``at`` go through the head once, their top-k lists read from the same logits as the rest;
    the raw lens (other inputs) is a head pass over ``at`` alone. The second result is the first
    at ``at`` (:meth:`LayerStats.take`) plus those extras."""
    at = torch.as_tensor(at, dtype=torch.long).cpu()
    st, topk_at = _layer_stats(adapter, hidden, targets, top_k=top_k, rows_per_matmul=rows_per_matmul, at=at)
    detail = st.take(at)
    if topk_at is not None:
        detail.topk_ids, detail.topk_probs = topk_at
    if raw:
        L = adapter.num_layers
        sub = {k: v[at.to(v.device)] for k, v in hidden.items()}
        r, _ = _layer_stats(adapter, sub, None if targets is None else targets[at.to(targets.device)], raw=True,
                            rows_per_matmul=rows_per_matmul, normed=False)
        detail.entropy_raw, detail.xent_raw = r.entropy_raw, r.xent_raw
        detail.entropy_raw[L] = detail.entropy[L]  # layer L is the model's output either way
        if detail.xent_raw is not None:
            detail.xent_raw[L] = detail.xent[L]
    return st, detail


def _layer_stats(
    adapter: Adapter,
    hidden: dict[int, torch.Tensor],
    targets: torch.Tensor | None,
    *,
    top_k: int = 0,
    raw: bool = False,
    rows_per_matmul: int = ROWS_PER_MATMUL,
    at: torch.Tensor | None = None,
    normed: bool = True,
) -> tuple[LayerStats, tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`layer_stats`; with ``at``, the top-k lists at those positions only, returned beside
    the statistics ((L+1, len(at), k) ids and probabilities), not in them. ``normed=False``: the
    raw lens of layers 0..L-1 alone (nothing else is computed: every other field stays zero)."""
    L = adapter.num_layers
    n = hidden[L].shape[0]
    nan = float("nan")
    out: dict[str, torch.Tensor] = {
        k: torch.zeros(L + 1, n) for k in ("entropy", "kl_to_final", "top1_agree", "final_top1_rank", "top1_prob")
    }
    want_xent = targets is not None
    if want_xent:
        out["xent"] = torch.full((L + 1, n), nan)
    if raw:
        out["entropy_raw"] = torch.zeros(L + 1, n)
        if want_xent:
            out["xent_raw"] = torch.full((L + 1, n), nan)
    m = n if at is None else len(at)
    topk_ids = torch.zeros(L + 1, m, top_k, dtype=torch.long) if top_k else None
    topk_probs = torch.zeros(L + 1, m, top_k) if top_k else None
    top1_ids = torch.zeros(L + 1, n, dtype=torch.long)
    jobs = ([(k, True) for k in range(L)] if normed else []) + ([(k, False) for k in range(L)] if raw else [])
    chunk = balanced_chunk(n, rows_per_matmul)
    per_group = max(1, rows_per_matmul // chunk)
    with torch.inference_mode():
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            tgt_chunk = targets[s:e] if want_xent else None
            # the positions of ``at`` in this chunk: as rows of the top-k lists, and of the chunk
            dst = None if at is None else ((at >= s) & (at < e)).nonzero().squeeze(-1)
            loc_chunk = None if dst is None else at[dst] - s

            def scan(k: int, is_normed: bool, z: torch.Tensor, final: Scan | None) -> Scan:
                # on the logits' device (the head's, which a device map may put apart from the hidden states)
                tgt = None if tgt_chunk is None else tgt_chunk.to(z.device)
                loc = None if loc_chunk is None else loc_chunk.to(z.device)
                pick = None
                if top_k and is_normed and loc is not None and loc.numel():
                    pick = torch.topk(z[loc], top_k, dim=-1)  # before the scan overwrites z
                sc = scan_logits(z, targets=tgt, top_k=top_k if is_normed and at is None else 0, top1=is_normed,
                                 rank_of=final.top1 if is_normed and k < L else None,
                                 against=final.exp if is_normed and k < L else None,
                                 keep_exp=k == L)
                ent_key, xent_key = ("entropy", "xent") if is_normed else ("entropy_raw", "xent_raw")
                out[ent_key][k, s:e] = sc.entropy().float().cpu()
                if want_xent:
                    out[xent_key][k, s:e] = sc.xent().float().cpu()
                if not is_normed:
                    return sc
                top1_ids[k, s:e] = sc.top1.cpu()
                out["top1_prob"][k, s:e] = sc.top1_prob().float().cpu()
                if k < L:
                    out["kl_to_final"][k, s:e] = sc.kl_from(final).float().cpu()
                    out["top1_agree"][k, s:e] = (sc.top1 == final.top1).float().cpu()
                    out["final_top1_rank"][k, s:e] = sc.rank.cpu()
                if top_k and at is None:
                    ids, probs = sc.topk()
                    topk_ids[k, s:e] = ids.cpu()
                    topk_probs[k, s:e] = probs.float().cpu()
                elif pick is not None:
                    topk_ids[k, dst] = pick.indices.cpu()
                    topk_probs[k, dst] = (pick.values.double() - sc.log_sum_exp()[loc].unsqueeze(-1)).exp().float().cpu()
                return sc

            # layer L: the model's own logits (ours to modify), scanned first: its probabilities
            # are what every other layer's KL and rank are taken against
            final = None
            if normed:
                final = scan(L, True, adapter.logits(adapter.prepare(hidden[L][s:e], norm=False)), None)
                out["top1_agree"][L, s:e] = 1.0  # (KL and rank to itself: 0)
            if raw and normed:  # layer L is the model's output either way
                out["entropy_raw"][L, s:e] = out["entropy"][L, s:e]
                if want_xent:
                    out["xent_raw"][L, s:e] = out["xent"][L, s:e]
            for g in range(0, len(jobs), per_group):
                group = jobs[g : g + per_group]
                x = torch.cat([adapter.prepare(hidden[k][s:e], norm=is_normed) for k, is_normed in group])
                z_all = adapter.logits(x).view(len(group), e - s, -1)
                del x
                for i, (k, is_normed) in enumerate(group):
                    scan(k, is_normed, z_all[i], final)
                del z_all
            del final
    st = LayerStats(
        entropy=out["entropy"],
        kl_to_final=out["kl_to_final"],
        top1_agree=out["top1_agree"],
        final_top1_rank=out["final_top1_rank"],
        xent=out.get("xent"),
        entropy_raw=out.get("entropy_raw"),
        xent_raw=out.get("xent_raw"),
        topk_ids=topk_ids if at is None else None,
        topk_probs=topk_probs if at is None else None,
        top1_ids=top1_ids,
        top1_prob=out["top1_prob"],
    )
    return st, (None if at is None or not top_k else (topk_ids, topk_probs))


@dataclass
class LensRecord:
    """Per-layer statistics of one sequence, as plain data (JSON-serialisable via ``asdict``)."""

    tokens: list[str]
    stats: dict[str, list[list[float]]]  # name -> [layer][position]
    topk: list[list[list[tuple[str, float]]]] | None  # [layer][position][rank] -> (token, prob)


def run_lens(
    bundle: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    top_k: int = 5,
    raw: bool = False,
) -> list[LensRecord]:
    """The logit lens over a batch of token sequences: every layer, every (non-pad) position.

    Position t's statistics describe the prediction of token t+1 (its ``xent`` is known for
    t < len-1). Returns one :class:`LensRecord` per sequence.
    """
    adapter: Adapter = bundle.adapter
    tok = bundle.tokenizer
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    dev = bundle.device
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    L = adapter.num_layers
    store = adapter.forward(input_ids, attention_mask)
    mask = attention_mask.bool()
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    targets[:, :-1][~mask[:, 1:]] = -100
    flat = {k: v[mask] for k, v in store.items()}
    st = layer_stats(adapter, flat, targets[mask], top_k=top_k, raw=raw)
    records = []
    offset = 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b]].tolist()
        n = len(ids)
        sl = slice(offset, offset + n)
        stats = {
            name: getattr(st, name)[:, sl].tolist()
            for name in STATS
            if getattr(st, name) is not None
        }
        topk = None
        if top_k:
            topk = [
                [
                    list(zip(tok.convert_ids_to_tokens(st.topk_ids[k, offset + t].tolist()),
                             st.topk_probs[k, offset + t].tolist()))
                    for t in range(n)
                ]
                for k in range(L + 1)
            ]
        records.append(LensRecord(tokens=tok.convert_ids_to_tokens(ids), stats=stats, topk=topk))
        offset += n
    return records


# ----------------------------------------------------------------------------------------------
# Teacher-forced rows: ``prompt | reference``, left-padded


@dataclass
class Packed:
    """Rows ``prompt | reference`` in one left-padded batch: the prompts end at column ``S`` (all
    rows alike), the references follow from there. ``targets[j, i]`` is reference token i of row j
    (-100 past its end); ``valid[j, i]`` marks the positions whose lens is taken: every reference
    token, and at least the first response position of a row without one."""

    ids: torch.Tensor  # (B, S + R)
    mask: torch.Tensor  # (B, S + R)
    targets: torch.Tensor  # (B, R)
    valid: torch.Tensor  # (B, R) bool
    prompt_len: int  # S

    @property
    def window(self) -> slice:
        """The positions predicting reference tokens 0..R-1: prompt's last token onwards."""
        S = self.prompt_len
        return slice(S - 1, S - 1 + self.targets.shape[1])


def pack_rows(prompt_ids: list[list[int]], ref_ids: list[list[int]] | None, pad: int) -> Packed:
    """Pack rows ``prompt | reference`` left-padded to a common prompt length ``S``, the references
    right-padded to the longest one (``R`` ≥ 1 columns). ``ref_ids=None``: the prompts alone (R = 0)."""
    S = max(map(len, prompt_ids))
    R = 0 if ref_ids is None else max(max((len(r) for r in ref_ids), default=1), 1)
    B = len(prompt_ids)
    ids = torch.full((B, S + R), pad, dtype=torch.long)
    mask = torch.zeros((B, S + R), dtype=torch.long)
    targets = torch.full((B, R), -100, dtype=torch.long)
    valid = torch.zeros((B, R), dtype=torch.bool)
    for j, p in enumerate(prompt_ids):
        ids[j, S - len(p):S] = torch.tensor(p)
        mask[j, S - len(p):S] = 1
        if ref_ids is None:
            continue
        r = ref_ids[j]
        if r:
            ids[j, S:S + len(r)] = torch.tensor(r)
            mask[j, S:S + len(r)] = 1
            targets[j, :len(r)] = torch.tensor(r)
        valid[j, :max(1, len(r))] = True
    return Packed(ids=ids, mask=mask, targets=targets, valid=valid, prompt_len=S)


# ----------------------------------------------------------------------------------------------
# Per-layer summaries of LayerStats, as they go into the results JSON


def rounded(x: float, nd: int = 6) -> float | None:
    """``x`` rounded to ``nd`` decimals; NaN → None (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def summary(t: torch.Tensor) -> dict[str, list[float | None]]:
    """(L+1, N) tensor → per-layer mean / q25 / q75 over the positions (NaNs ignored)."""
    rows = []
    for layer in t:
        v = layer[~torch.isnan(layer)]
        rows.append(v)
    def q(v: Any, p: float) -> float:
        return float(torch.quantile(v, p)) if v.numel() else float("nan")
    return {
        "mean": [rounded(v.mean()) if v.numel() else None for v in rows],
        "q25": [rounded(q(v, 0.25)) for v in rows],
        "q75": [rounded(q(v, 0.75)) for v in rows],
    }


def median(t: torch.Tensor) -> torch.Tensor:
    """Per-row median of a (rows, n) tensor, n ≥ 1: the middle value, or the mean of the two
    middle values for an even n (``torch.median`` gives the lower one)."""
    v = t.sort(dim=1).values
    n = t.shape[1]
    return (v[:, (n - 1) // 2].double() + v[:, n // 2].double()) / 2


def lens_section(st: LayerStats, sel: Any) -> dict[str, Any]:
    """Per-layer summaries of a LayerStats restricted to the positions ``sel``."""

    def sub(x: Any) -> Any:
        return None if x is None else x[:, sel]

    rank = sub(st.final_top1_rank)
    out: dict[str, Any] = {
        "entropy": summary(sub(st.entropy)),
        "kl_to_final": summary(sub(st.kl_to_final)),
        "top1_agree": [rounded(v) for v in sub(st.top1_agree).mean(1).tolist()],
        "final_top1_rank": {"mean": [rounded(v) for v in rank.mean(1).tolist()],
                            "median": [rounded(v) for v in median(rank).tolist()]},
    }
    if st.entropy_raw is not None:
        out["entropy_raw"] = summary(sub(st.entropy_raw))
    if st.xent is not None:
        out["xent"] = summary(sub(st.xent))
    if st.xent_raw is not None:
        out["xent_raw"] = summary(sub(st.xent_raw))
    return out


def concat_stats(parts: list[LayerStats]) -> LayerStats:
    """LayerStats of several batches joined along the positions."""
    if len(parts) == 1:
        return parts[0]
    joined = {}
    for f in fields(LayerStats):
        vals = [getattr(p, f.name) for p in parts]
        joined[f.name] = None if vals[0] is None else torch.cat(vals, dim=1)
    return LayerStats(**joined)


def per_row_records(st_all: LayerStats, st_first: LayerStats, counts: list[int]) -> dict[str, Any]:
    """Row-level lens records, the gate's evidence of where a model changed: per layer, each row's
    first-token top-1 id, and each row's teacher-forced top-1 agreement with the final layer (the
    mean over that row's positions; ``counts`` gives each row's number of positions, in order)."""
    out: dict[str, Any] = {}
    if st_first.topk_ids is not None and st_first.topk_ids.shape[-1]:
        out["first_top1"] = st_first.topk_ids[:, :, 0].tolist()
    agree = st_all.top1_agree
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    out["tf_agree"] = [[rounded(layer[a:b].mean(), 4) if b > a else None for a, b in zip(bounds, bounds[1:])]
                       for layer in agree]
    return out


def lens_results(st_all: LayerStats, st_first: LayerStats, counts: list[int], *, rows: int, exits: list[int],
                 example_rows: list[int], token_text: Any, grid: Any = None) -> dict[str, Any]:
    """The results' ``lens`` section from a sweep's statistics (declared in results.Lens).

    ``example_rows``: the row indices (in the prompts file) of the first rows, whose top-k lists
    at the exits are kept; ``grid``: (LayerStats with top-1, row index, input token ids) or None.
    """
    L = st_all.entropy.shape[0] - 1
    first = lens_section(st_first, slice(None))
    first["rows"] = rows
    teacher = lens_section(st_all, slice(None))
    teacher["positions"] = int(st_all.entropy.shape[1])
    out: dict[str, Any] = {"first_token": first, "teacher_forced": teacher,
                           "per_row": per_row_records(st_all, st_first, counts)}
    if st_first.topk_ids is not None:
        out["examples"] = [
            {"row": row, "top": {
                str(k): [{"token": token_text(int(tid)), "id": int(tid), "prob": rounded(p)}
                         for tid, p in zip(st_first.topk_ids[k, i].tolist(), st_first.topk_probs[k, i].tolist())]
                for k in exits}}
            for i, row in enumerate(example_rows)
        ]
    if grid is not None:
        gs, row, inputs = grid
        n = len(inputs)
        out["grid"] = {
            "row": row,
            "positions": [token_text(t) for t in inputs],
            "layers": list(range(L + 1)),
            "top_token": [[token_text(int(gs.top1_ids[k, p])) for p in range(n)] for k in range(L + 1)],
            "top_prob": [[rounded(gs.top1_prob[k, p], 4) for p in range(n)] for k in range(L + 1)],
        }
    return out
