"""The logit lens: per-layer next-token statistics, streamed.

Layer k (1..L) is the output of block k, layer 0 the input of block 1 (the embeddings, after any
scaling or position embeddings the model adds). Layers 0..L-1 go through the final norm and the
head (:meth:`Adapter.unembed`); layer L is the base model's own ``last_hidden_state`` through the
head alone, i.e. exactly the model's logits.

Hidden states are captured with hooks on the blocks (only at the positions asked for), and the
statistics are computed layer by layer over chunks of positions, so an L × T × V tensor never
exists: peak extra memory is about ``chunk × V`` floats a few times over.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .archs import Adapter

STATS = ("entropy", "kl_to_final", "top1_agree", "final_top1_rank", "xent", "entropy_raw", "xent_raw")


def cache_kwarg(model: Any) -> str:
    """Name of the KV-cache argument (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions for a left-padded batch, the way ``generate`` makes them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@contextlib.contextmanager
def capture_hidden(adapter: Adapter, select: Any = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record layers 0..L-1 (input of block 1, outputs of blocks 1..L-1) during a forward.

    ``select`` indexes the position axis (a slice or index tensor) so only what is needed is kept.
    Layer L is not recorded here: take it from the base model's ``last_hidden_state``.
    """
    store: dict[int, torch.Tensor] = {}
    sel = slice(None) if select is None else select
    blocks = adapter.blocks
    handles = []

    def pre_hook(_mod: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        store[0] = h[:, sel].detach().clone()  # a copy: a view would keep the whole (B, T, d) tensor alive

    handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for j in range(len(blocks) - 1):

        def hook(_mod: Any, _args: Any, out: Any, k: int = j + 1) -> None:
            h = out[0] if isinstance(out, (tuple, list)) else out
            store[k] = h[:, sel].detach().clone()

        handles.append(blocks[j].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


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


def layer_stats(
    adapter: Adapter,
    hidden: dict[int, torch.Tensor],
    targets: torch.Tensor | None = None,
    *,
    top_k: int = 0,
    raw: bool = False,
    rows_per_matmul: int = 256,
) -> LayerStats:
    """Lens statistics from hidden states of layers 0..L, each ``(N, d)`` (positions flattened).

    ``hidden[L]`` must be the base model's (already normed) last hidden state. ``targets`` (N,)
    holds the true next token at each position, or -100 where it is unknown.

    The head is memory-bound for few rows, so several layers' positions share one matmul of about
    ``rows_per_matmul`` rows.
    """
    L = adapter.num_layers
    n = hidden[L].shape[0]
    nan = float("nan")
    out: dict[str, torch.Tensor] = {
        k: torch.zeros(L + 1, n) for k in ("entropy", "kl_to_final", "top1_agree", "final_top1_rank")
    }
    want_xent = targets is not None
    if want_xent:
        out["xent"] = torch.full((L + 1, n), nan)
    if raw:
        out["entropy_raw"] = torch.zeros(L + 1, n)
        if want_xent:
            out["xent_raw"] = torch.full((L + 1, n), nan)
    topk_ids = torch.zeros(L + 1, n, top_k, dtype=torch.long) if top_k else None
    topk_probs = torch.zeros(L + 1, n, top_k) if top_k else None
    jobs = [(k, True) for k in range(L)] + ([(k, False) for k in range(L)] if raw else [])
    chunk = max(1, min(n, rows_per_matmul))
    per_group = max(1, rows_per_matmul // chunk)
    with torch.inference_mode():
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            zf = adapter.logits(adapter.prepare(hidden[L][s:e], norm=False))  # (c, V), ours to modify
            logpf = zf.sub_(zf.logsumexp(-1, keepdim=True))  # in place: log-probabilities of layer L
            pf = logpf.exp()
            top1_f = logpf.argmax(-1)
            scratch = torch.empty_like(logpf)
            tgt = known = None
            if want_xent:
                tgt = targets[s:e].to(logpf.device)
                known = tgt >= 0
                tgt = tgt.clamp(min=0)

            # Memory: besides the logits of the chunk only p and one scratch buffer exist (every
            # other step works in place), so a chunk costs about 5 × rows × V floats.
            # Sums over the vocabulary accumulate in float64: a sequential float32 reduction over
            # ~50k terms (e.g. CPU einsum) loses ~1e-3 nats, and float32 results can depend on
            # how many threads split the sum.
            def record(k: int, normed: bool, logp: torch.Tensor) -> None:
                ent_key, xent_key = ("entropy", "xent") if normed else ("entropy_raw", "xent_raw")
                p = pf if k == L else logp.exp()
                torch.mul(p, logp, out=scratch)
                out[ent_key][k, s:e] = (-scratch.sum(-1, dtype=torch.float64)).float().cpu()
                if tgt is not None:
                    x = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                    out[xent_key][k, s:e] = torch.where(known, x, torch.full_like(x, nan)).cpu()
                if not normed:
                    return
                if k < L:
                    torch.sub(logpf, logp, out=scratch).mul_(pf)
                    out["kl_to_final"][k, s:e] = scratch.sum(-1, dtype=torch.float64).float().cpu()
                # ranks by log-probability = ranks by logit
                out["top1_agree"][k, s:e] = (logp.argmax(-1) == top1_f).float().cpu()
                ref = logp.gather(-1, top1_f.unsqueeze(-1))
                out["final_top1_rank"][k, s:e] = torch.count_nonzero(logp > ref, dim=-1).float().cpu()
                if top_k:
                    vals, ids = logp.topk(top_k, dim=-1)
                    topk_ids[k, s:e] = ids.cpu()
                    topk_probs[k, s:e] = vals.exp().cpu()

            record(L, True, logpf)
            out["kl_to_final"][L, s:e] = 0.0
            if raw:  # layer L is the model's output either way
                out["entropy_raw"][L, s:e] = out["entropy"][L, s:e]
                if want_xent:
                    out["xent_raw"][L, s:e] = out["xent"][L, s:e]
            for g in range(0, len(jobs), per_group):
                group = jobs[g : g + per_group]
                x = torch.cat([adapter.prepare(hidden[k][s:e], norm=normed) for k, normed in group])
                z_all = adapter.logits(x).view(len(group), e - s, -1)
                del x
                z_all.sub_(z_all.logsumexp(-1, keepdim=True))  # in place: log-probabilities
                for i, (k, normed) in enumerate(group):
                    record(k, normed, z_all[i])
                del z_all
    return LayerStats(
        entropy=out["entropy"],
        kl_to_final=out["kl_to_final"],
        top1_agree=out["top1_agree"],
        final_top1_rank=out["final_top1_rank"],
        xent=out.get("xent"),
        entropy_raw=out.get("entropy_raw"),
        xent_raw=out.get("xent_raw"),
        topk_ids=topk_ids,
        topk_probs=topk_probs,
    )


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
    with torch.inference_mode(), capture_hidden(adapter) as store:
        out = adapter.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    store[L] = out.last_hidden_state
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
