"""The lens statistics against a straightforward float64 reference (issue #18).

``layer_stats`` reads each layer's float32 logits in a few passes over cache-sized blocks
(:func:`layerwise.scan.scan_logits`). The reference here takes the same float32 logits and does
everything else the textbook way in float64: ``log_softmax``, ``p · log p``, ``argmax``, a sort.

- :func:`scan_logits` on given logits: every statistic within 1e-6 (relative to max(1, |value|))
  of float64, ranks, top-1 and top-k ids exactly — at the default model's vocabulary size, with
  exact ties at the maximum and masked (-inf) tokens;
- ``layer_stats`` on tiny models of several families, on a realistic vocabulary and on a slice of
  the default model: within 1e-5, integer statistics exact up to logits that float32 cannot
  order (the head's matmul may round a row differently when other rows share it).
"""

from __future__ import annotations

import os

import pytest
import torch

from layerwise import scan
from layerwise.lens import layer_stats, lens_section
from layerwise.scan import scan_logits
from tiny_models import tiny_bundle

torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))

TOL = 1e-5


def reference(layer_logits: list[torch.Tensor], targets: torch.Tensor | None, top_k: int = 0) -> dict[str, torch.Tensor]:
    """Float64 statistics of every layer from its float32 logits (the last one is the final layer)."""
    zf = layer_logits[-1].double()
    lpf = torch.log_softmax(zf, -1)
    pf = lpf.exp()
    t1f = zf.argmax(-1, keepdim=True)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("entropy", "kl_to_final", "top1_agree", "final_top1_rank",
                                                          "xent", "top1", "topk_ids", "topk_probs")}
    for z32 in layer_logits:
        z = z32.double()
        lp = torch.log_softmax(z, -1)
        p = lp.exp()
        out["entropy"].append(torch.special.entr(p).sum(-1))
        out["kl_to_final"].append(torch.where(pf > 0, pf * (lpf - lp), torch.zeros_like(p)).sum(-1))
        out["top1"].append(z.argmax(-1))
        out["top1_agree"].append((z.argmax(-1) == t1f.squeeze(-1)).double())
        out["final_top1_rank"].append((z > z.gather(-1, t1f)).sum(-1).double())
        if targets is not None:
            x = -lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out["xent"].append(torch.where(targets >= 0, x, torch.full_like(x, float("nan"))))
        if top_k:
            order = z.sort(dim=-1, descending=True, stable=True)  # ties: the lower id first
            out["topk_ids"].append(order.indices[:, :top_k])
            out["topk_probs"].append(p.gather(-1, order.indices[:, :top_k]))
    return {k: torch.stack(v) for k, v in out.items() if v}


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> float:
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not (got.isnan() ^ want.isnan()).any(), f"{what}: NaN pattern differs"
    err = ((got - want).abs() / want.abs().clamp(min=1)).nan_to_num(0.0)
    assert float(err.max()) <= tol, f"{what}: max error {float(err.max()):.3g} > {tol}"
    return float(err.max())


def realistic_logits(rows: int, vocab: int = 49152, seed: int = 0) -> torch.Tensor:
    """Logits shaped like SmolLM2's: a wide bulk (std ~4), a few tokens far above it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * 4
    top = torch.randint(0, vocab, (rows, 5), generator=g)
    z.scatter_(1, top, 15 + 10 * torch.rand(rows, 5, generator=g))
    return z


def scan_all(layer_logits: list[torch.Tensor], targets: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Every statistic of every layer through scan_logits, as layer_stats combines them."""
    final = scan_logits(layer_logits[-1].clone(), targets=targets, top_k=top_k, top1=True, keep_exp=True)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("entropy", "kl_to_final", "top1", "final_top1_rank",
                                                          "xent", "topk_ids", "topk_probs")}
    for i, z in enumerate(layer_logits):
        last = i == len(layer_logits) - 1
        sc = final if last else scan_logits(z.clone(), targets=targets, top_k=top_k, top1=True,
                                            rank_of=final.top1, against=final.exp)
        out["entropy"].append(sc.entropy())
        out["kl_to_final"].append(torch.zeros(z.shape[0], dtype=torch.float64) if last else sc.kl_from(final))
        out["top1"].append(sc.top1)
        out["final_top1_rank"].append(torch.zeros(z.shape[0]) if last else sc.rank)
        out["xent"].append(sc.xent())
        ids, probs = sc.topk()
        out["topk_ids"].append(ids)
        out["topk_probs"].append(probs)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("block", [scan.BLOCK_ELEMENTS, 1])
def test_scan_logits_is_float64_exact_at_a_realistic_vocabulary(monkeypatch, block):
    """Three layers of realistic logits: entropy, KL, cross-entropy and top-k probabilities within
    1e-6 of float64; top-1, ranks and top-k ids exactly. ``block=1``: two rows per block (the
    smallest), the numbers do not depend on the blocking."""
    monkeypatch.setattr(scan, "BLOCK_ELEMENTS", block)
    rows, V = 7, 49152
    layers = [realistic_logits(rows, V, seed) for seed in range(3)]
    layers[1] = layers[2] + 0.5 * torch.randn(rows, V, generator=torch.Generator().manual_seed(9))  # close to final
    targets = torch.randint(0, V, (rows,), generator=torch.Generator().manual_seed(5))
    targets[3] = -100
    got, want = scan_all(layers, targets, 5), reference(layers, targets, 5)
    for name in ("entropy", "kl_to_final", "xent", "topk_probs"):
        assert_close(got[name], want[name], 1e-6, name)
    for name in ("top1", "final_top1_rank", "topk_ids"):
        assert torch.equal(got[name].long(), want[name].long()), name
    assert float(want["kl_to_final"][0].min()) > 10, "a layer far from the final one (large KL) is covered"


def test_scan_logits_ties_and_masked_tokens():
    """Exact ties at the maximum (top-1 is the first, as torch.argmax; the rank counts only logits
    strictly above), a tie inside the last short segment, and -inf logits (masked tokens: their
    p·log p is 0, not NaN)."""
    V = 1000  # not a multiple of the 256-wide segments
    z = realistic_logits(6, V, seed=3)
    z[0, 10] = z[0, 700] = z[0].max() + 1  # tie at the maximum across segments
    z[1, 990] = z[1, 995] = z[1].max() + 1  # tie inside the short last segment
    z[2, ::3] = float("-inf")  # masked tokens
    z[3, 500:] = float("-inf")
    final = realistic_logits(6, V, seed=4)
    final[2, ::3] = float("-inf")
    final[4, 123] = final[4, 456] = final[4].max() + 1
    z[4, 456] = z[4].max() + 2  # layer's max sits on the final's second tied maximum
    targets = torch.tensor([10, 700, 3, 999, 5, -100])
    got, want = scan_all([z, final], targets, 3), reference([z, final], targets, 3)
    assert got["top1"][0].tolist()[:2] == [10, 990]
    for name in ("entropy", "kl_to_final", "xent", "topk_probs"):
        assert_close(got[name], want[name], 1e-6, name)
    for name in ("top1", "final_top1_rank", "topk_ids"):
        assert torch.equal(got[name].long(), want[name].long()), name
    assert torch.isinf(got["kl_to_final"][0, 3]) and torch.isinf(want["kl_to_final"][0, 3])  # layer k masks final's mass


# ----------------------------------------------------------------------------------------------
# layer_stats end to end: the logits come from the head's matmul inside layer_stats


def _hidden(bundle, tokens: list[list[int]]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    ids = torch.tensor(tokens)
    store = bundle.adapter.forward(ids)
    hidden = {k: v.flatten(0, 1) for k, v in store.items()}
    tg = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1).flatten()
    return hidden, tg


def _check_layer_stats(adapter, hidden, targets, top_k: int, rows_per_matmul: int, what: str) -> dict[str, float]:
    """layer_stats vs the float64 reference on the head's logits (computed here one layer at a
    time). Integer statistics may differ only where the reference itself has a near-tie."""
    L = adapter.num_layers
    s = layer_stats(adapter, hidden, targets, top_k=top_k, raw=True, rows_per_matmul=rows_per_matmul)
    with torch.inference_mode():
        logits = [adapter.unembed(hidden[k], norm=(k != L)) for k in range(L + 1)]
        raw = [adapter.unembed(hidden[k], norm=False) for k in range(L)] + [logits[L]]
    want = reference(logits, targets, top_k)
    want_raw = reference(raw, targets)
    errs = {}
    for name in ("entropy", "kl_to_final", "xent"):
        errs[name] = assert_close(getattr(s, name), want[name], TOL, f"{what} {name}")
    errs["entropy_raw"] = assert_close(s.entropy_raw, want_raw["entropy"], TOL, f"{what} entropy_raw")
    errs["xent_raw"] = assert_close(s.xent_raw, want_raw["xent"], TOL, f"{what} xent_raw")
    if top_k:
        errs["topk_probs"] = assert_close(s.topk_probs, want["topk_probs"], TOL, f"{what} topk_probs")
    # Near-ties: logits within 1e-5 (relative) of the one compared against.
    z = torch.stack(logits).double()
    t1f = z[L].argmax(-1)
    ref = z.gather(-1, t1f.expand(L + 1, -1).unsqueeze(-1))
    close = ((z - ref).abs() <= 1e-5 * ref.abs().clamp(min=1)).sum(-1) - 1
    rank_err = (s.final_top1_rank - want["final_top1_rank"]).abs()
    assert (rank_err <= close).all(), f"{what} final_top1_rank differs beyond near-ties"
    top2 = z.topk(2, -1).values
    tie = (top2[..., 0] - top2[..., 1]) <= 1e-5 * top2[..., 0].abs().clamp(min=1)
    unsure = tie | tie[L]
    assert ((s.top1_agree == want["top1_agree"]) | unsure).all(), f"{what} top1_agree differs beyond near-ties"
    if top_k:
        same = (s.topk_ids == want["topk_ids"]).all(-1)
        assert (same | unsure).all(), f"{what} top-k ids differ beyond near-ties"
    return errs


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
@pytest.mark.parametrize("rows_per_matmul", [256, 7])
def test_layer_stats_matches_float64_on_tiny_models(family, rows_per_matmul):
    """Soft-capped logits (Gemma-2), a projection between norm and head (OPT), a LayerNorm (GPT-2);
    several layers per matmul (256) and several matmuls per layer (7)."""
    b = tiny_bundle(family)
    g = torch.Generator().manual_seed(1)
    hidden, targets = _hidden(b, torch.randint(3, 96, (3, 11), generator=g).tolist())
    _check_layer_stats(b.adapter, hidden, targets, 4, rows_per_matmul, family)


@pytest.mark.slow
def test_layer_stats_matches_float64_on_the_default_model(default_bundle):
    """A slice of the default model (2 rows × 12 positions, 31 layers, V = 49,152)."""
    b = default_bundle
    tok = b.tokenizer
    rows = [tok.encode("The capital of France is Paris, and the capital of Spain is")[:12],
            tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return")[:12]]
    hidden, targets = _hidden(b, rows)
    errs = _check_layer_stats(b.adapter, hidden, targets, 5, 256, "default model")
    print("\nlargest error vs float64 (relative to max(1, |x|)):", {k: f"{v:.2g}" for k, v in errs.items()})


def test_median_rank_is_the_usual_median():
    """final_top1_rank's median: the mean of the two middle values for an even count."""
    from layerwise.lens import LayerStats

    rank = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 1000.0, 8.0], [5.0, 1.0, 2.0, float(7)]])
    z = torch.zeros_like(rank)
    st = LayerStats(entropy=z, kl_to_final=z, top1_agree=z, final_top1_rank=rank, xent=None, entropy_raw=None,
                    xent_raw=None, topk_ids=None, topk_probs=None)
    assert lens_section(st, slice(None))["final_top1_rank"]["median"] == [0.0, 5.5, 3.5]
    assert lens_section(st, slice(0, 3))["final_top1_rank"]["median"] == [0.0, 3.0, 2.0]


def test_balanced_chunks_cover_the_positions_in_equal_pieces() -> None:
    from layerwise.lens import balanced_chunk

    assert balanced_chunk(552, 384) == 276
    assert balanced_chunk(384, 384) == 384 and balanced_chunk(385, 384) == 193
    assert balanced_chunk(10, 384) == 10 and balanced_chunk(0, 384) == 1
    for n in range(1, 2000, 37):
        c = balanced_chunk(n, 384)
        pieces = -(-n // c)
        assert c <= 384 and pieces == -(-n // 384)  # as few chunks as the cap allows
        assert n - (pieces - 1) * c > 0 and c - (n - (pieces - 1) * c) < pieces  # the last one is not short
