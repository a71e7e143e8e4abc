"""Layer drift between two models: how far each layer's lens distribution moved.

For two models with the same tokenizer and depth (a checkpoint and its quantized or fine-tuned
version), run both over the same ``prompt | reference`` sequences and compute, at every layer
and teacher-forced position, KL(reference model's lens ‖ other model's lens) and whether their
top-1 tokens agree. The per-layer curve answers "where in depth does quantization hurt".
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def _hidden(bundle: Any, seq: Any, mask: Any, window: slice) -> dict[int, Any]:
    import torch

    from .decoding import _accepts
    from .lens import capture_hidden, position_ids_from_mask

    adapter = bundle.adapter
    dev = bundle.device
    seq, mask = seq.to(dev), mask.to(dev)
    kwargs = {"position_ids": position_ids_from_mask(mask)} if _accepts(adapter.decoder, "position_ids") else {}
    with torch.inference_mode(), capture_hidden(adapter, select=window) as store:
        out = adapter.decoder(input_ids=seq, attention_mask=mask, use_cache=False, **kwargs)
    store[adapter.num_layers] = out.last_hidden_state[:, window]
    return store


def layer_drift(a: Any, b: Any, prompt_ids: list[list[int]], ref_ids: list[list[int]],
                rows_per_matmul: int = 256) -> dict[str, Any]:
    """KL(a_k ‖ b_k) and top-1 agreement per layer k, over the reference positions."""
    import torch

    from .runner import _r, _summary

    L = a.adapter.num_layers
    if b.adapter.num_layers != L:
        raise ConfigError(f"the two models have {L} and {b.adapter.num_layers} blocks", "compare models of the same depth")
    va, vb = a.info["vocab_size"], b.info["vocab_size"]
    if va != vb:
        raise ConfigError(f"the two models have vocabularies of {va} and {vb} tokens", "compare models with the same tokenizer")
    pad = a.tokenizer.pad_token_id or 0
    S = max(map(len, prompt_ids))
    R = max(max((len(r) for r in ref_ids), default=1), 1)
    seq = torch.full((len(prompt_ids), S + R), pad, dtype=torch.long)
    mask = torch.zeros_like(seq)
    valid = torch.zeros((len(prompt_ids), R), dtype=torch.bool)
    for j, (p, r) in enumerate(zip(prompt_ids, ref_ids)):
        seq[j, S - len(p):S] = torch.tensor(p)
        mask[j, S - len(p):S] = 1
        if r:
            seq[j, S:S + len(r)] = torch.tensor(r)
            mask[j, S:S + len(r)] = 1
        valid[j, :max(1, len(r))] = True
    window = slice(S - 1, S - 1 + R)
    ha = {k: v[valid.to(v.device)] for k, v in _hidden(a, seq, mask, window).items()}
    hb = {k: v[valid.to(v.device)] for k, v in _hidden(b, seq, mask, window).items()}
    n = ha[L].shape[0]
    kl = torch.zeros(L + 1, n)
    agree = torch.zeros(L + 1, n)
    with torch.inference_mode():
        for s in range(0, n, rows_per_matmul):
            e = min(n, s + rows_per_matmul)
            for k in range(L + 1):
                za = a.adapter.unembed(ha[k][s:e], norm=k < L)
                zb = b.adapter.unembed(hb[k][s:e].to(za.device), norm=k < L).to(za.device)
                lpa, lpb = torch.log_softmax(za, -1), torch.log_softmax(zb, -1)
                kl[k, s:e] = (lpa.exp() * (lpa - lpb)).sum(-1).cpu()
                agree[k, s:e] = (za.argmax(-1) == zb.argmax(-1)).float().cpu()
    out = _summary(kl)
    return {"kl_mean": out["mean"], "kl_q25": out["q25"], "kl_q75": out["q75"],
            "top1_agree": [_r(v) for v in agree.mean(1).tolist()], "positions": n}
