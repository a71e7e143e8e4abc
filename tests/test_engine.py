"""Correctness of the engine (lens + early exit) against independent computations.

Every supported family is checked on a tiny random model (tests/tiny_models.py):

- layer L of the lens is the model's own logits; layer k < L is exactly the logits of a copy of
  the model cut to its first k blocks (so the final norm is applied, and "layer k" is the output
  of block k); layer 0 is the embedding output through the final norm and head;
- early exit at k generates exactly what ``generate`` of the cut copy generates (greedy),
  whether the prompts are batched with left padding or not, and whether the exits share one
  call or not.

The references are Hugging Face's own ``forward`` / ``generate`` on unpadded single prompts and
``truncated_copy``, which never goes through layerwise's hooks or gated blocks.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.archs import Adapter
from layerwise.decoding import Decoding, _pick, default_exits, generate_exits, prefill
from layerwise.lens import capture_hidden, layer_stats, layer_stats_at, run_lens
from tiny_models import FAMILIES, LAYERS, VOCAB, left_pad, tiny_bundle, tiny_model, truncated_copy

torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))

N_NEW = 10
PROMPT_LENS = (4, 9, 14)
TOL = 1e-4
EOS = 2


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def prompts(seed: int = 0) -> list[list[int]]:
    """Three prompts of different lengths, no pad/bos/eos ids (0, 1, 2) inside."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]



@functools.lru_cache(maxsize=None)
def ref_model(family: str, k: int):
    """The model cut to its first k blocks (the model itself for k = L)."""
    model = tiny_model(family)
    return model if k == LAYERS else truncated_copy(model, k)


@functools.lru_cache(maxsize=None)
def hf_greedy(family: str, k: int, prompt: tuple[int, ...], n: int = N_NEW) -> list[int]:
    """Hugging Face greedy generation of the k-block model on one unpadded prompt."""
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = ref_model(family, k).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            pad_token_id=0, eos_token_id=EOS,
        )
    return out[0, ids.shape[1]:].tolist()


@functools.lru_cache(maxsize=None)
def hf_logits(family: str, k: int, prompt: tuple[int, ...]) -> torch.Tensor:
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        return ref_model(family, k)(input_ids=ids).logits[0].float()


def batched_exits(family: str, exits: tuple[int, ...], compact_fraction: float = 0.25, seqs=None, n: int = N_NEW):
    seqs = seqs or prompts()
    ids, mask = left_pad(seqs)
    return generate_exits(tiny_bundle(family), ids, mask, list(exits), Decoding(max_new_tokens=n),
                          compact_fraction=compact_fraction)


def naive_stats(logits: torch.Tensor, final: torch.Tensor, targets: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Entropy, KL(final || this), cross-entropy from log_softmax, the textbook way."""
    lp = torch.log_softmax(logits.double(), -1)
    lpf = torch.log_softmax(final.double(), -1)
    out = {
        "entropy": -(lp.exp() * lp).sum(-1),
        "kl_to_final": (lpf.exp() * (lpf - lp)).sum(-1),
        "top1_agree": (logits.argmax(-1) == final.argmax(-1)).double(),
        "final_top1_rank": (logits > logits.gather(-1, final.argmax(-1, keepdim=True))).sum(-1).double(),
    }
    if targets is not None:
        t = torch.tensor(targets)
        known = t >= 0
        x = -lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out["xent"] = torch.where(known, x, torch.full_like(x, float("nan")))
    return out


def assert_close(got, want, tol=TOL, what=""):
    got = got.detach() if isinstance(got, torch.Tensor) else got
    want = want.detach() if isinstance(want, torch.Tensor) else want
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    both_nan = got.isnan() & want.isnan()
    assert not (got.isnan() ^ want.isnan()).any(), f"{what}: NaN pattern differs"
    diff = (got - want).abs().masked_fill(both_nan, 0)
    assert float(diff.max()) <= tol, f"{what}: max abs diff {float(diff.max()):.3g} > {tol}"


# ----------------------------------------------------------------------------------------------
# 1 (a), (b): the lens against the model's own logits and against truncated copies


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_L_is_the_models_logits(family):
    b = tiny_bundle(family)
    ad, L = b.adapter, b.num_layers
    assert L == LAYERS
    seqs = prompts()
    p = seqs[-1]
    ids = torch.tensor([p])
    with torch.no_grad():
        last = ad.decoder(input_ids=ids).last_hidden_state
        want = b.model(input_ids=ids).logits[0].float()
    got = ad.unembed(last, norm=False)[0]
    assert_close(got, want, what=f"{family}: unembed(last_hidden_state, norm=False) vs model logits")

    # The lens over a left-padded batch: layer L of each prompt == its unpadded model logits.
    ids_b, mask_b = left_pad(seqs)
    recs = run_lens(b, ids_b, mask_b, top_k=3)
    for rec, s in zip(recs, seqs):
        final = hf_logits(family, L, tuple(s))
        naive = naive_stats(final, final, s[1:] + [-100])
        assert rec.tokens == [f"t{i}" for i in s]
        assert_close(rec.stats["entropy"][L], naive["entropy"], what=f"{family}: entropy at L")
        assert_close(rec.stats["xent"][L], naive["xent"], what=f"{family}: xent at L")
        assert rec.stats["kl_to_final"][L] == [0.0] * len(s)
        assert rec.stats["top1_agree"][L] == [1.0] * len(s)
        assert rec.stats["final_top1_rank"][L] == [0.0] * len(s)
        probs = torch.softmax(final.double(), -1)
        top = probs.topk(3, -1)
        for t in range(len(s)):
            names = [tok for tok, _ in rec.topk[L][t]]
            assert names == [f"t{i}" for i in top.indices[t].tolist()]
            assert_close([pr for _, pr in rec.topk[L][t]], top.values[t], what=f"{family}: top-k probs at L")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_k_is_the_truncated_models_logits(family):
    b = tiny_bundle(family)
    ad, L = b.adapter, b.num_layers
    seqs = prompts()
    p = seqs[-1]
    ids = torch.tensor([p])
    with torch.no_grad(), capture_hidden(ad) as store:
        hf = b.model(input_ids=ids, output_hidden_states=True)
    assert sorted(store) == list(range(L)), "capture_hidden records layers 0..L-1"
    ids_b, mask_b = left_pad(seqs)
    recs = run_lens(b, ids_b, mask_b, top_k=0, raw=True)
    final_by_prompt = [hf_logits(family, L, tuple(s)) for s in seqs]
    for k in range(L):
        # Hugging Face's own hidden_states[k] (k < L) is the input of block k+1.
        assert_close(store[k], hf.hidden_states[k], tol=1e-5, what=f"{family}: captured layer {k} vs hidden_states[{k}]")
        want = hf_logits(family, k, tuple(p))  # first k blocks, then the model's norm and head
        got = ad.unembed(store[k], norm=True)[0]
        assert_close(got, want, what=f"{family}: layer {k} lens vs {k}-block copy")
        # The comparison discriminates: without the norm, or one block off, it would fail.
        if ad.final_norm is not None:
            raw = ad.unembed(store[k], norm=False)[0]
            assert float((raw - want).abs().max()) > 1e-2, f"{family}: the final norm makes no difference at layer {k}"
        for other in {k - 1, k + 1} & set(range(L)):
            off = ad.unembed(store[other], norm=True)[0]
            assert float((off - want).abs().max()) > 1e-2, f"{family}: layers {k} and {other} are indistinguishable"
        # The lens (padded batch, streamed stats) at layer k == naive stats of the k-block copy.
        for rec, s, final in zip(recs, seqs, final_by_prompt):
            naive = naive_stats(hf_logits(family, k, tuple(s)), final, s[1:] + [-100])
            for name in ("entropy", "kl_to_final", "xent", "top1_agree", "final_top1_rank"):
                assert_close(rec.stats[name][k], naive[name], what=f"{family}: {name} at layer {k}")
    # Layer 0: the embedding output (input of block 1) through the final norm and head.
    emb = hf.hidden_states[0]
    assert_close(ad.unembed(emb, norm=True)[0], hf_logits(family, 0, tuple(p)), what=f"{family}: layer 0")


# ----------------------------------------------------------------------------------------------
# 1 (c)-(f): early exit against generate


def _check_tokens(got: list[int], want: list[int], what: str) -> None:
    assert got == want, f"{what}: {got} != {want}"
    assert len(got) == N_NEW or (got and got[-1] == EOS and EOS not in got[:-1]), f"{what}: bad stop {got}"


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_at_L_is_plain_generate(family):
    seqs = prompts()
    g = batched_exits(family, (LAYERS,))
    assert g.exits == [LAYERS]
    for i, s in enumerate(seqs):
        _check_tokens(g.tokens[LAYERS][i], hf_greedy(family, LAYERS, tuple(s)), f"{family} exit L prompt {i}")
        assert_close(g.first_logits[LAYERS][i], hf_logits(family, LAYERS, tuple(s))[-1], what=f"{family}: first logits at L")


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_at_k_is_truncated_generate(family):
    seqs = prompts()
    for k in range(1, LAYERS):
        g = batched_exits(family, (k,))
        for i, s in enumerate(seqs):
            _check_tokens(g.tokens[k][i], hf_greedy(family, k, tuple(s)), f"{family} exit {k} prompt {i}")
            assert_close(g.first_logits[k][i], hf_logits(family, k, tuple(s))[-1], what=f"{family}: first logits at {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_unbatched(family):
    seqs = prompts()
    exits = tuple(range(1, LAYERS + 1))
    batched = batched_exits(family, exits)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s])
        alone = generate_exits(tiny_bundle(family), ids, torch.ones_like(ids), list(exits), Decoding(max_new_tokens=N_NEW))
        for k in exits:
            assert batched.tokens[k][i] == alone.tokens[k][0], f"{family} exit {k} prompt {i}: batched != alone"
            # and both are what Hugging Face generates with the k-block model
            _check_tokens(alone.tokens[k][0], hf_greedy(family, k, tuple(s)), f"{family} exit {k} prompt {i} alone")


@pytest.mark.parametrize("compact_fraction", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_call_with_several_exits_equals_separate_calls(family, compact_fraction):
    exits = tuple(range(1, LAYERS + 1))
    together = batched_exits(family, exits, compact_fraction=compact_fraction)
    assert together.exits == list(exits)
    for k in exits:
        separate = batched_exits(family, (k,))
        assert together.tokens[k] == separate.tokens[k], f"{family} exit {k}: together != separate"
        assert_close(together.first_logits[k], separate.first_logits[k], tol=1e-5, what=f"{family} first logits {k}")


def test_exit_order_does_not_matter_and_prefill_can_be_reused():
    b = tiny_bundle("llama")
    ids, mask = left_pad(prompts())
    a = generate_exits(b, ids, mask, [1, 4, 2], Decoding(max_new_tokens=N_NEW))
    pre = prefill(b, ids, mask, [4, 2, 1])
    c = generate_exits(b, ids, mask, [2, 1, 4], Decoding(max_new_tokens=N_NEW), prefilled=pre)
    assert a.exits == c.exits == [1, 2, 4]
    assert a.tokens == c.tokens


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_prompts_longer_than_the_sliding_window(family):
    """Prompts past the 64-token sliding window of the tiny mistral/gemma2 (their caches trim)."""
    window = tiny_model(family).config.sliding_window
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (window + 6, window + 26, 5)]
    res = batched_exits(family, tuple(range(1, LAYERS + 1)), seqs=seqs, n=24)
    for k in range(1, LAYERS + 1):
        for i, s in enumerate(seqs):
            assert res.tokens[k][i] == hf_greedy(family, k, tuple(s), 24), f"{family} exit {k} prompt {i}"


def test_engine_leaves_the_model_as_it_found_it():
    """No hooks or patched forwards remain after the lens and after early exit."""
    b = tiny_bundle("llama")
    ids, mask = left_pad(prompts())
    def hooks():  # (transformers may install its own output-capturing hooks; those stay)
        return [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in b.adapter.blocks]

    def own_forwards():  # an instance's own ``forward`` (transformers 4.x leaves its bound method there
        return [m.__dict__.get("forward") for m in b.adapter.blocks]  # after output_hidden_states)

    with torch.no_grad():
        before = b.model(input_ids=ids, attention_mask=mask).logits
    hooks_before, forwards_before = hooks(), own_forwards()
    run_lens(b, ids, mask, top_k=1)
    batched_exits("llama", (1, 3))
    assert hooks() == hooks_before
    assert own_forwards() == forwards_before
    for block in b.adapter.blocks:
        own = block.__dict__.get("forward")
        assert own is None or getattr(own, "__func__", None) is type(block).forward, "a patched forward remains"
    with torch.no_grad():
        after = b.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_a_budget_of_one_token():
    seqs = prompts()
    g = batched_exits("gpt2", (1, 4), n=1)
    for k in (1, 4):
        assert g.tokens[k] == [hf_greedy("gpt2", k, tuple(s), 1) for s in seqs]
        assert all(len(t) == 1 for t in g.tokens[k])


def test_the_prompts_exercise_eos_and_the_full_budget():
    """Guard on the test data: some rows stop at EOS early, some run the whole budget."""
    lens = [len(t) for f in FAMILIES for k in range(1, LAYERS + 1) for t in batched_exits(f, (k,)).tokens[k]]
    assert any(n < N_NEW for n in lens) and any(n == N_NEW for n in lens)


@pytest.mark.parametrize("L, want", [(1, [1]), (2, [1, 2]), (4, [1, 2, 3, 4]), (30, [8, 15, 23, 30]), (32, [8, 16, 24, 32]), (7, [2, 4, 6, 7])])
def test_default_exits(L, want):
    assert default_exits(L) == want
    assert default_exits(L) == sorted({math.ceil(q * L / 4) for q in range(1, 5)})


# ----------------------------------------------------------------------------------------------
# 2: properties of the lens statistics over random sequences


def _lens_inputs(family: str, tokens: list[int]):
    b = tiny_bundle(family)
    ad, L = b.adapter, b.num_layers
    ids = torch.tensor([tokens])
    with torch.inference_mode(), capture_hidden(ad) as store:
        out = ad.decoder(input_ids=ids)
    store[L] = out.last_hidden_state
    hidden = {k: v[0] for k, v in store.items()}
    targets = torch.tensor(tokens[1:] + [-100])
    return b, hidden, targets


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["llama", "gpt2"]),
    tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
    rows=st.integers(1, 300),
)
def test_lens_statistics_properties(family, tokens, rows):
    b, hidden, targets = _lens_inputs(family, tokens)
    ad, L, n = b.adapter, b.num_layers, len(tokens)
    s = layer_stats(ad, hidden, targets, top_k=5, raw=True, rows_per_matmul=rows)
    logV = math.log(VOCAB)
    assert s.entropy.shape == (L + 1, n)
    assert float(s.entropy.min()) >= -1e-4 and float(s.entropy.max()) <= logV + 1e-4
    assert float(s.entropy_raw.min()) >= -1e-4 and float(s.entropy_raw.max()) <= logV + 1e-4
    assert float(s.kl_to_final.min()) >= -1e-4
    assert (s.kl_to_final[L] == 0).all()
    assert (s.top1_agree[L] == 1).all()
    assert ((s.top1_agree == 0) | (s.top1_agree == 1)).all()
    assert (s.final_top1_rank >= 0).all() and (s.final_top1_rank[L] == 0).all()
    assert (s.final_top1_rank[s.top1_agree == 1] == 0).all()  # (rank 0 without agreement: exact ties)
    assert (s.topk_probs.sum(-1) <= 1 + 1e-5).all()
    assert (s.topk_probs[..., :-1] >= s.topk_probs[..., 1:]).all()
    assert (s.topk_probs > 0).all()
    assert s.xent[:, -1].isnan().all() and not s.xent[:, :-1].isnan().any()

    final = b.model(input_ids=torch.tensor([tokens])).logits[0].float().detach()
    with torch.inference_mode():
        for k in range(L + 1):
            z = ad.unembed(hidden[k], norm=(k != L))
            assert_close(torch.softmax(z.double(), -1).sum(-1), torch.ones(n), tol=1e-6, what="softmax sums to 1")
            if k == L:
                assert_close(z, final, what="layer L vs logits")
            naive = naive_stats(z, final, targets.tolist())
            for name in ("entropy", "kl_to_final", "xent", "top1_agree", "final_top1_rank"):
                assert_close(getattr(s, name)[k], naive[name], what=f"{family} {name} layer {k} rows={rows}")
            tk = torch.softmax(z.double(), -1).topk(5, -1)
            assert_close(s.topk_probs[k], tk.values, what="top-k probs")
            # Without the norm the logits are large (|z| up to ~100 here), so float32 gives less.
            raw = ad.unembed(hidden[k], norm=False)
            raw_naive = naive_stats(raw, final, targets.tolist())
            assert_close(s.entropy_raw[k], raw_naive["entropy"], tol=1e-3, what=f"raw entropy layer {k}")
            assert_close(s.xent_raw[k], raw_naive["xent"], tol=1e-3, what=f"raw xent layer {k}")


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["llama", "gpt2"]),
    tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
    rows=st.integers(1, 300),
    data=st.data(),
)
def test_layer_stats_at_is_layer_stats_at_those_positions_from_one_pass(family, tokens, rows, data):
    """The sweep's lens (one pass; top-k lists and the raw lens only at chosen positions) equals
    layer_stats over all positions and over those positions with the extras, and sends each
    normed (layer, position) through the head once."""
    b, hidden, targets = _lens_inputs(family, tokens)
    ad, L, n = b.adapter, b.num_layers, len(tokens)
    at = torch.tensor(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))))
    calls: list[int] = []
    real = Adapter.logits

    def counting(self, x):
        calls.append(int(x.shape[0]))
        return real(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Adapter, "logits", counting)
        whole, detail = layer_stats_at(ad, hidden, targets, at, top_k=4, raw=True, rows_per_matmul=rows)
    assert sum(calls) == (L + 1) * n + L * len(at), "normed: every layer once; raw: layers 0..L-1 at the positions of at"
    ref_all = layer_stats(ad, hidden, targets, rows_per_matmul=rows)
    ref_at = layer_stats(ad, {k: v[at] for k, v in hidden.items()}, targets[at], top_k=4, raw=True)
    assert whole.topk_ids is None and whole.entropy_raw is None
    for name in ("entropy", "kl_to_final", "xent", "top1_agree", "final_top1_rank", "top1_prob"):
        assert_close(getattr(whole, name), getattr(ref_all, name), tol=1e-5, what=f"{name}, all positions")
    for name in ("entropy", "kl_to_final", "xent", "entropy_raw", "topk_probs", "top1_prob"):
        assert_close(getattr(detail, name), getattr(ref_at, name), tol=1e-5, what=f"{name} at {at.tolist()}")
    assert torch.equal(detail.top1_ids, ref_at.top1_ids)
    # the lists' first ids (later ranks may swap where two probabilities tie in float32)
    assert torch.equal(detail.topk_ids[..., 0], ref_at.topk_ids[..., 0])
    assert_close(detail.top1_prob, detail.topk_probs[..., 0], tol=1e-6, what="top-1 probability = first of the top-k")


class _WideAdapter:
    """A stand-in adapter with a realistic vocabulary (49,152 like SmolLM2) and logits of
    realistic size (|z| up to ~30), for the numerics of layer_stats at scale."""

    def __init__(self, layers: int = 3, d: int = 64, vocab: int = 49152, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_layers = layers
        self.w = torch.randn(vocab, d, generator=g) * 0.6
        self.norm = torch.nn.LayerNorm(d)

    def prepare(self, hidden, *, norm=True):
        return self.norm(hidden) if norm else hidden

    def logits(self, x):
        return (x @ self.w.T).float()

    def unembed(self, hidden, *, norm=True):
        return self.logits(self.prepare(hidden, norm=norm))


def test_layer_stats_is_accurate_at_a_realistic_vocabulary():
    """Entropy, KL and cross-entropy within 1e-4 of a float64 log_softmax when V = 49,152
    (float32 dot products over V must be summed carefully)."""
    ad = _WideAdapter()
    L, n = ad.num_layers, 12
    g = torch.Generator().manual_seed(1)
    hidden = {k: torch.randn(n, 64, generator=g) * (1 + k) for k in range(L + 1)}
    # Layer L is the base model's last hidden state, already normed: logits of std ~5, max ~25,
    # as SmolLM2's final layer (std 4.2, max 29 on the Alpaca prompt).
    hidden[L] = torch.nn.functional.layer_norm(hidden[L], (64,))
    targets = torch.randint(0, 49152, (n,), generator=g)
    with torch.inference_mode():
        s = layer_stats(ad, hidden, targets, top_k=2)
        final = ad.unembed(hidden[L], norm=False)
        for k in range(L + 1):
            naive = naive_stats(ad.unembed(hidden[k], norm=(k != L)), final, targets.tolist())
            for name in ("entropy", "kl_to_final", "xent"):
                assert_close(getattr(s, name)[k], naive[name], what=f"V=49152 {name} layer {k}")


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["llama", "gpt2"]),
    seqs=st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=20), min_size=1, max_size=3),
)
def test_lens_of_a_padded_batch_equals_each_sequence_alone(family, seqs):
    b = tiny_bundle(family)
    ids, mask = left_pad(seqs)
    together = run_lens(b, ids, mask, top_k=2)
    for rec, s in zip(together, seqs):
        alone = run_lens(b, torch.tensor(s), top_k=2)[0]
        assert rec.tokens == alone.tokens
        for name, rows in alone.stats.items():
            assert_close(rec.stats[name], rows, what=f"{family} {name}")


# ----------------------------------------------------------------------------------------------
# 3: sampling


def _sample(seed: int, **kw):
    ids, mask = left_pad(prompts())
    dec = Decoding(max_new_tokens=N_NEW, do_sample=True, seed=seed, **kw)
    return generate_exits(tiny_bundle("llama"), ids, mask, [1, 2, 3, 4], dec).tokens


def test_sampling_same_seed_same_tokens():
    assert _sample(7, temperature=1.5) == _sample(7, temperature=1.5)


def test_sampling_different_seeds_differ():
    outs = [_sample(seed, temperature=3.0) for seed in range(4)]
    distinct = {repr(o) for o in outs}
    assert len(distinct) >= 3, "four seeds gave (almost) the same samples"


def test_sampling_top_k_1_and_tiny_top_p_are_greedy():
    greedy = batched_exits("llama", (1, 2, 3, 4)).tokens
    assert _sample(3, top_k=1, temperature=2.0) == greedy
    assert _sample(4, top_p=1e-6, temperature=2.0) == greedy


def test_pick_samples_from_the_filtered_softmax():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 6000
    gen = torch.Generator().manual_seed(0)
    for kw, warp in [
        ({}, None),
        ({"top_k": 3}, TopKLogitsWarper(3)),
        ({"top_p": 0.8}, TopPLogitsWarper(0.8)),
        ({"temperature": 0.5, "top_p": 0.9}, TopPLogitsWarper(0.9)),
    ]:
        dec = Decoding(do_sample=True, **kw)
        x = logits / dec.temperature
        if warp is not None:
            x = warp(None, x.clone())
        want = torch.softmax(x, -1)[0]
        draws = _pick(logits.expand(n, -1), dec, gen)
        freq = torch.bincount(draws, minlength=6).double() / n
        assert ((want == 0) <= (freq == 0)).all(), f"{kw}: sampled a filtered-out token"
        assert_close(freq, want, tol=0.03, what=f"sampling frequencies {kw}")


# ----------------------------------------------------------------------------------------------
# 4: streaming — the lens never builds an L x T x V tensor


def test_layer_stats_matmuls_stay_within_rows_per_matmul(default_bundle, monkeypatch):
    """512 tokens of the default model: every head call sees at most rows_per_matmul rows, and
    every (layer, position) is unembedded exactly once. The head is replaced by a cheap stand-in
    (a fixed projection to 16 "tokens") so that this check takes a second, not a minute; the real
    head is measured in test_lens_peak_memory_512_tokens."""
    b = default_bundle
    ad, L = b.adapter, b.num_layers
    ids = torch.randint(100, 40000, (512,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), capture_hidden(ad) as store:
        out = ad.decoder(input_ids=ids.unsqueeze(0))
    store[L] = out.last_hidden_state
    hidden = {k: v[0] for k, v in store.items()}
    proj = torch.randn(hidden[0].shape[-1], 16, generator=torch.Generator().manual_seed(2))
    rows: list[int] = []

    def small_head(self, x):
        rows.append(int(x.shape[0]))
        return (x @ proj).float()

    monkeypatch.setattr(Adapter, "logits", small_head)
    targets = torch.cat([ids[1:] % 16, torch.tensor([-100])])  # ids of the 16-token stand-in head
    for rpm in (256, 100, 1000):
        rows.clear()
        s = layer_stats(ad, hidden, targets, top_k=3, raw=True, rows_per_matmul=rpm)
        assert max(rows) <= rpm, f"a head call with {max(rows)} rows > rows_per_matmul={rpm}"
        assert sum(rows) == (2 * L + 1) * 512, "each layer (normed and raw) and position exactly once"
        if rpm == 256:
            ref = s
        else:  # chunking does not change any number
            for name in ("entropy", "kl_to_final", "xent", "final_top1_rank", "entropy_raw", "topk_probs"):
                assert_close(getattr(s, name), getattr(ref, name), tol=1e-5, what=f"{name} rows_per_matmul={rpm}")


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, time, torch
    from layerwise.archs import Adapter
    from layerwise.lens import run_lens
    from layerwise.models import load_model
    rows = []
    real = Adapter.logits
    def counting(self, x):
        rows.append(int(x.shape[0]))
        return real(self, x)
    Adapter.logits = counting
    b = load_model("smollm2-135m")
    rows.clear()  # the load-time proof's head calls are not the lens's
    ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        b.model(ids[:, :8])
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    recs = run_lens(b, ids, top_k=5)
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"rss_delta_mb": (r1 - r0) / 1024, "max_rows": max(rows),
          "total_rows": sum(rows), "layers": b.num_layers, "vocab": b.info["vocab_size"],
          "positions": len(recs[0].tokens), "seconds": dt}))
    """
)


@pytest.mark.slow
def test_lens_peak_memory_512_tokens(default_bundle):
    """run_lens on 512 tokens of the default model, real head, in a fresh process: peak RSS growth
    stays far below one L x T x V float32 tensor (31 x 512 x 49152 x 4 B = 3.1 GB)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    full_mb = (r["layers"] + 1) * 512 * r["vocab"] * 4 / 2**20
    print(f"\nrun_lens 512 tokens, default model: peak RSS delta {r['rss_delta_mb']:.0f} MB "
          f"(an L x T x V float32 tensor: {full_mb:.0f} MB), largest head call {r['max_rows']} rows, "
          f"{r['seconds']:.1f} s")
    assert r["positions"] == 512
    assert r["max_rows"] <= 256
    assert r["total_rows"] == (r["layers"] + 1) * 512
    assert r["rss_delta_mb"] < 600
