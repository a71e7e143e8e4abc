"""Layer drift between two models: how far each layer's lens distribution moved.

For two models with the same tokenizer and depth (a checkpoint and its quantized or fine-tuned
version), run both over the same ``prompt | reference`` sequences and compute, at every layer
and teacher-forced position, KL(reference model's lens ‖ other model's lens) and whether their
top-1 tokens agree. The per-layer curve answers "where in depth does quantization hurt".
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def layer_drift(a: Any, b: Any, prompt_ids: list[list[int]], ref_ids: list[list[int]],
                *, batch_size: int = 20, rows_per_matmul: int = 256) -> dict[str, Any]:
    """KL(a_k ‖ b_k) and top-1 agreement per layer k, over the reference positions.

    The rows go through both models ``batch_size`` at a time (one at a time where either model
    may not be left-padded, as in the sweep), each batch as ``prompt | reference`` left-padded
    (:func:`layerwise.lens.pack_rows`).
    """
    import torch

    from .lens import pack_rows, rounded, summary

    L = a.adapter.num_layers
    if b.adapter.num_layers != L:
        raise ConfigError(f"the two models have {L} and {b.adapter.num_layers} blocks", "compare models of the same depth")
    va, vb = a.info["vocab_size"], b.info["vocab_size"]
    if va != vb:
        raise ConfigError(f"the two models have vocabularies of {va} and {vb} tokens", "compare models with the same tokenizer")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}", "pass a positive batch size")
    from .families import batch_prompts

    if not all(batch_prompts(str(m.adapter.model_type), m.info.get("lens_proof")) for m in (a, b)):
        batch_size = 1  # a model whose numbers move with left padding: one row at a time, as the sweep does
    pad = a.tokenizer.pad_token_id or 0
    kls, agrees = [], []
    for r0 in range(0, len(prompt_ids), batch_size):
        rows = slice(r0, r0 + batch_size)
        packed = pack_rows(prompt_ids[rows], ref_ids[rows], pad)
        ha = _hidden(a, packed)
        hb = _hidden(b, packed)
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
        kls.append(kl)
        agrees.append(agree)
    kl, agree = torch.cat(kls, dim=1), torch.cat(agrees, dim=1)
    out = summary(kl)
    worst = kl.max(1).values.tolist()
    first = next((k for k, w in enumerate(worst) if w > NOISE_FLOOR), None)
    return {"kl_mean": out["mean"], "kl_q25": out["q25"], "kl_q75": out["q75"],
            "top1_agree": [rounded(v) for v in agree.mean(1).tolist()], "positions": int(kl.shape[1]),
            "first_divergent": first}


#: Both models see the same inputs in the same batches: layers below a change are the same
#: computation and give KL exactly 0; any position above this is a departure.
NOISE_FLOOR = 1e-6


def _hidden(bundle: Any, packed: Any) -> dict[int, Any]:
    """Hidden states of every layer at the packed rows' valid reference positions, ``(n, d)``."""
    dev = bundle.device
    store = bundle.adapter.forward(packed.ids.to(dev), packed.mask.to(dev), select=packed.window)
    return {k: v[packed.valid.to(v.device)] for k, v in store.items()}
