"""One layer's logits → its next-token statistics, in a few passes over cache-sized blocks of rows.

The logit lens (:func:`layerwise.lens.layer_stats`) and the multi-exit decode
(:func:`layerwise.decoding.generate_exits`) both need, for rows of V logits: the log-sum-exp, the
entropy, the top-1 token, and for the lens also KL to the final layer, ranks, cross-entropy and
top-k. Computed the textbook way (``log_softmax``, then ``p · log p``, ``argmax``, ``topk``), each
is a separate pass over a rows × V tensor far larger than the cache, several in float64 — together
slower than the head's matmul that made the logits. Here they come out of one read of the logits
plus a few passes over a block of rows that stays in the cache.

With y = z - max(z) (≤ 0, exact near the maximum), e = exp(y) and S = Σ e:

- log-sum-exp ``lse = max + log S``;
- entropy ``H = -Σ p log p = log S - Σ e·y / S``;
- cross-entropy ``lse - z[target]``;
- ``KL(final ‖ k) = Σ p_f (log p_f - log p_k) = (Σ e_f·y_f - Σ e_f·y_k) / S_f + log S_k - log S_f``,
  where e_f and S_f come from the final layer's own scan, so that its probabilities e_f / S_f sum to
  one by construction (a float32 log-sum-exp leaves Σ p_f = 1 ± 2e-6, an error that grows with the
  KL: 3e-4 nats at KL = 155).

Sums over the vocabulary are float32 (torch adds them pairwise: relative error ~1e-7) except those
the KL takes differences of — the final layer's S_f and Σ e_f·y_f, and Σ e_f·y_k, whose terms can
be hundreds of nats — which accumulate in float64; the per-row terms combine in float64. Ranks
compare the logits themselves (in log-probabilities float32 rounding can merge neighbours), a
logit ranking above the reference's only by more than 2^-20 of its size (float32 noise, so that
batching cannot move a rank across an exact tie), and the
top-1 is the first maximum, as ``torch.argmax`` gives it, found from the maxima of 256-wide segments
(``argmax`` itself is a slow pass). Checked against a float64 reference in
tests/test_lens_numerics.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Logits per block on the CPU (1 MiB of float32): each pass after the first reads from cache.
BLOCK_ELEMENTS = 1 << 18
_SEG = 256
#: Relative margin by which a logit must exceed the reference token's to rank above it (2^-20).
RANK_MARGIN = 2.0 ** -20
_EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number


@dataclass
class Scan:
    """What :func:`scan_logits` read from one layer's logits (c rows): per-row terms, float32 or
    (the final layer's sums, ``sum_fy``, ``target_gap``) float64; the methods combine them in float64."""

    max: torch.Tensor  # (c,) max logit
    sum_exp: torch.Tensor  # (c,) S = Σ exp(z - max)
    sum_ey: torch.Tensor  # (c,) Σ exp(z - max)·(z - max)
    exp: torch.Tensor | None  # (c, V) exp(z - max), when kept (the final layer's, for the KL of others)
    top1: torch.Tensor | None  # (c,) first argmax
    rank: torch.Tensor | None  # (c,) number of logits above the one of ``rank_of``
    sum_fy: torch.Tensor | None  # (c,) Σ e_f·(z - max), e_f = ``against``
    target_gap: torch.Tensor | None  # (c,) max - z[target] (NaN where the target is unknown)
    topk_vals: torch.Tensor | None
    topk_ids: torch.Tensor | None

    def log_sum_exp(self) -> torch.Tensor:
        return self.max.double() + self.sum_exp.double().log()

    def entropy(self) -> torch.Tensor:
        s = self.sum_exp.double()
        return s.log() - self.sum_ey.double() / s

    def top1_prob(self) -> torch.Tensor:
        """The probability of the most likely token: exp(max - lse) = 1 / S."""
        return self.sum_exp.double().reciprocal()

    def xent(self) -> torch.Tensor:
        assert self.target_gap is not None
        return self.target_gap + self.sum_exp.double().log()

    def kl_from(self, final: "Scan") -> torch.Tensor:
        """KL(final ‖ this layer), from this scan's ``sum_fy`` (``against=final.exp``)."""
        assert self.sum_fy is not None
        sf = final.sum_exp.double()
        return (final.sum_ey.double() - self.sum_fy.double()) / sf + self.sum_exp.double().log() - sf.log()

    def topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, probabilities) of the top-k tokens."""
        assert self.topk_vals is not None and self.topk_ids is not None
        return self.topk_ids, (self.topk_vals.double() - self.log_sum_exp().unsqueeze(-1)).exp()


def scan_logits(
    z: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    top_k: int = 0,
    top1: bool = False,
    rank_of: torch.Tensor | None = None,
    against: torch.Tensor | None = None,
    keep_exp: bool = False,
) -> Scan:
    """Read one layer's logits ``z`` (c, V), float32, contiguous — and overwrite them with
    ``z - max``. Options: ``targets`` (c,) true next tokens (-100: unknown); ``top_k``; ``top1``:
    the first argmax; ``rank_of`` (c,) token ids whose rank (logits strictly above it) is counted;
    ``against`` (c, V): a distribution's unnormalised probabilities, Σ against·(z - max) per row;
    ``keep_exp``: keep exp(z - max) (c, V)."""
    if z.dtype != torch.float32 or not z.is_contiguous():
        raise ValueError("scan_logits reads contiguous float32 logits")
    c, V = z.shape
    dev = z.device
    f32 = {"dtype": torch.float32, "device": dev}
    f64 = {"dtype": torch.float64, "device": dev}
    mx = torch.empty(c, **f32)
    sum_exp = torch.empty(c, **(f64 if keep_exp else f32))
    sum_ey = torch.empty(c, **(f64 if keep_exp else f32))
    top = torch.empty(c, dtype=torch.long, device=dev) if top1 else None
    rank = torch.empty(c, **f32) if rank_of is not None else None
    sum_fy = torch.empty(c, **f64) if against is not None else None
    gap = None
    tgt = known = None
    if targets is not None:
        known = targets >= 0
        tgt = targets.clamp(min=0).unsqueeze(-1)
        gap = torch.empty(c, dtype=torch.float64, device=dev)
    vals = ids = None
    if top_k:
        vals = torch.empty(c, top_k, **f32)
        ids = torch.empty(c, top_k, dtype=torch.long, device=dev)
    # On the CPU, blocks of rows small enough for the cache: each pass after the first is cheap.
    # Elsewhere (a GPU), every row at once.
    rows = max(2, min(c, BLOCK_ELEMENTS // V)) if dev.type == "cpu" else c
    exps = torch.empty(c, V, **f32) if keep_exp else None
    scratch = torch.empty(rows, V, **f32) if not keep_exp else None
    cmp = torch.empty(rows, V, **f32) if rank_of is not None else None
    prod = torch.empty(rows, V, **f32) if (keep_exp or against is not None) else None
    seg = min(_SEG, V)
    nseg, tail = divmod(V, seg)
    offs = torch.arange(seg, device=dev)
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        b = r1 - r0
        zb = z[r0:r1]
        # maxima of seg-wide segments, then the row's maximum and first argmax from them
        seg_max = zb.as_strided((b, nseg, seg), (V, seg, 1)).amax(-1)
        if tail:
            seg_max = torch.cat([seg_max, zb[:, nseg * seg:].amax(-1, keepdim=True)], 1)
        m = seg_max.amax(-1, keepdim=True)
        mx[r0:r1] = m.squeeze(-1)
        if top is not None:
            j = seg_max.argmax(-1, keepdim=True)  # first segment holding the maximum
            where = (j * seg + offs).clamp_(max=V - 1)  # a short last segment repeats index V-1
            top[r0:r1] = (j * seg + zb.gather(-1, where).argmax(-1, keepdim=True)).squeeze(-1)
        if rank_of is not None:
            # a logit counts as above the reference only by more than float32 noise (~1e-6 of its
            # size): an exact tie perturbed by batching must not move the rank
            ref = zb.gather(-1, rank_of[r0:r1].unsqueeze(-1))
            ref = ref + ref.abs().clamp(min=1.0) * RANK_MARGIN
            torch.sum(torch.gt(zb, ref, out=cmp[:b]), -1, out=rank[r0:r1])
        if tgt is not None:
            gap[r0:r1] = (m.double() - zb.gather(-1, tgt[r0:r1]).double()).squeeze(-1)
        if top_k:
            torch.topk(zb, top_k, dim=-1, out=(vals[r0:r1], ids[r0:r1]))
        y = zb.sub_(m)
        eb = exps[r0:r1] if exps is not None else scratch[:b]
        # exp of an argument below -87 is a denormal or 0, and ~50× slower to compute: clamped,
        # such a term is < 2e-38 instead of smaller still (nothing, next to S ≥ 1).
        torch.clamp(y, min=_EXP_FLOOR, out=eb).exp_()
        if keep_exp:  # the final layer: its sums in float64 (they normalise every layer's KL)
            torch.sum(eb, -1, dtype=torch.float64, out=sum_exp[r0:r1])
            torch.sum(torch.mul(eb, y, out=prod[:b]), -1, dtype=torch.float64, out=sum_ey[r0:r1])
        else:
            torch.sum(eb, -1, out=sum_exp[r0:r1])
            torch.linalg.vecdot(eb, y, out=sum_ey[r0:r1])
        if against is not None:
            # Σ e_f·y: the final's mass may sit where this layer's y is -100s; float32 would keep
            # only ~7 digits of it, which the KL (a difference of such sums) needs
            torch.sum(torch.mul(against[r0:r1], y, out=prod[:b]), -1, dtype=torch.float64, out=sum_fy[r0:r1])
    # Logits of -inf (masked tokens): their clamped exp is not 0, and 0·(-inf) is NaN. Such rows
    # (rare) again, exactly: exp(-inf) = 0 and those terms 0.
    bad = ~sum_ey.isfinite()
    if sum_fy is not None:
        bad |= ~sum_fy.isfinite()
    if bool(bad.any()):
        _masked_rows(z, bad.nonzero().squeeze(-1), sum_exp, sum_ey, exps, against, sum_fy)
    if gap is not None:
        gap.masked_fill_(~known, float("nan"))
    return Scan(max=mx, sum_exp=sum_exp, sum_ey=sum_ey, exp=exps, top1=top, rank=rank, sum_fy=sum_fy,
                target_gap=gap, topk_vals=vals, topk_ids=ids)


def _masked_rows(y: torch.Tensor, rows: torch.Tensor, sum_exp: torch.Tensor, sum_ey: torch.Tensor,
                 exps: torch.Tensor | None, against: torch.Tensor | None, sum_fy: torch.Tensor | None) -> None:
    yr = y[rows].double()
    er = yr.exp()
    zero = torch.zeros_like(yr)
    sum_exp[rows] = er.sum(-1).to(sum_exp.dtype)
    sum_ey[rows] = torch.where(er > 0, er * yr, zero).sum(-1).to(sum_ey.dtype)
    if exps is not None:
        exps[rows] = er.float()
    if against is not None and sum_fy is not None:
        ar = against[rows].double()
        sum_fy[rows] = torch.where(ar > 0, ar * yr, zero).sum(-1)
