"""The shared-prefix decode attention (layerwise.attention) against sdpa over the repeated cache,
and the multi-exit decode with it against the decode without it."""

import pytest

torch = pytest.importorskip("torch")

from tiny_models import FAMILIES, left_pad, tiny_bundle, tiny_model  # noqa: E402


def _sdpa(query, key, value, mask, scaling):
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("E", [3, 1])
@pytest.mark.parametrize("hkv,g", [(2, 1), (3, 3), (1, 4)])
def test_attend_equals_sdpa_over_the_repeated_cache(hkv, g, E):
    """P prompts (left-padded), rows exit-major with some rows missing (compaction), t generated
    positions per row: the attention equals sdpa over prompt keys + the row's own keys — in the
    two-part layout (E = 3 groups reach the block) and in the one-buffer layout (E = 1)."""
    from layerwise.attention import SharedPrefix

    gen = torch.Generator().manual_seed(hkv * 10 + g)
    P, S, D, room = 3, 7, 8, 5
    lengths = [7, 4, 2]
    pmask = torch.tensor([[0] * (S - n) + [1] * n for n in lengths])
    keys = torch.randn(P, hkv, S, D, generator=gen)
    values = torch.randn(P, hkv, S, D, generator=gen)

    class Layer:
        pass

    layer = Layer()
    layer.keys, layer.values = keys, values
    row_prompt = torch.arange(P).repeat(E)
    row_slot = torch.tensor([e for e in range(E) for _ in range(P)])
    n_rows = P * E
    sp = SharedPrefix([layer], pmask, row_prompt, row_slot, [n_rows], room)
    own_k, own_v = [[] for _ in range(n_rows)], [[] for _ in range(n_rows)]
    alive = list(range(n_rows))
    for t in range(room):
        if t == 2:  # drop rows 1 and 4 (as the decode drops finished rows)
            keep = torch.tensor([i for i, r in enumerate(alive) if r not in (1, 4)], dtype=torch.long)
            sp.keep(keep, [len(alive)])
            alive = [alive[i] for i in keep.tolist()]
        n = len(alive)  # a block runs on all its rows at every step (finished rows ride along)
        q = torch.randn(n, hkv * g, 1, D, generator=gen)
        k = torch.randn(n, hkv, 1, D, generator=gen)
        v = torch.randn(n, hkv, 1, D, generator=gen)
        got = sp.attend(0, q, k, v, scaling=0.3)
        for i in range(n):
            own_k[alive[i]].append(k[i])
            own_v[alive[i]].append(v[i])
        for i in range(n):
            r, p = alive[i], int(row_prompt[alive[i]])
            kk = torch.cat([keys[p]] + own_k[r], dim=1)[None]
            vv = torch.cat([values[p]] + own_v[r], dim=1)[None]
            m = torch.cat([pmask[p].bool(), torch.ones(len(own_k[r]), dtype=torch.bool)])[None, None, None]
            want = _sdpa(q[i:i + 1], kk, vv, m, 0.3)
            torch.testing.assert_close(got[i:i + 1], want, atol=1e-6, rtol=1e-5)
        sp.t += 1


def test_shares_only_where_proved():
    from layerwise import compat
    from layerwise.attention import shares
    from layerwise.decoding import prefill

    ids, mask = left_pad([[5, 6, 7], [8, 9]])

    def layers_of(bundle):
        return compat.cache_layers(prefill(bundle, ids, mask, [bundle.adapter.num_layers]).cache)

    b = tiny_bundle("llama")
    L = b.adapter.num_layers
    assert shares(b.model, layers_of(b), L, "cpu")
    assert not shares(b.model, layers_of(b), L, "cuda")
    # Gemma-2's tiny model runs eager attention with soft-capping; Mistral's has a sliding window.
    for fam in ("gemma2", "mistral"):
        fb = tiny_bundle(fam)
        assert not shares(fb.model, layers_of(fb), fb.adapter.num_layers, "cpu"), fam


def test_registry_is_restored():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from layerwise.attention import SharedPrefix

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    sp = SharedPrefix.__new__(SharedPrefix)
    with pytest.raises(RuntimeError):
        with sp.installed():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
            raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_with_and_without_sharing(family, monkeypatch):
    """Every family: the same tokens with the shared prefix as with the repeated cache, and the
    same per-step entropies (float rounding); families where it does not apply decode as before."""
    import layerwise.attention as attention
    from layerwise.decoding import Decoding, generate_exits

    b = tiny_bundle(family)
    L = b.adapter.num_layers
    prompts = [[1, 5, 9, 13, 7, 22, 40], [1, 30, 31], [1, 17, 4, 4, 9], [1, 60]]
    ids, mask = left_pad(prompts)
    dec = Decoding(max_new_tokens=12)
    exits = sorted({1, max(1, L // 2), L})
    calls = []
    real = attention.SharedPrefix.attend

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(attention.SharedPrefix, "attend", counted)
    with_sharing = generate_exits(b, ids, mask, exits, dec, verify_family=False)
    used = bool(calls)
    monkeypatch.setattr(attention, "shares", lambda *a: False)
    without = generate_exits(b, ids, mask, exits, dec, verify_family=False)
    if family in ("llama", "qwen2", "phi3"):
        assert used, f"{family}: the shared prefix should apply"
    for k in exits:
        assert with_sharing.tokens[k] == without.tokens[k], (family, k)
        for a, c in zip(with_sharing.entropies[k], without.entropies[k]):
            assert a == pytest.approx(c, abs=2e-5), (family, k)
