"""Length buckets (layerwise.buckets): the same hidden states, cache and decode as one padded forward."""

from __future__ import annotations

import itertools

import pytest
import torch

from layerwise import buckets, compat
from layerwise.config import Decoding
from layerwise.decoding import Prefill, generate_exits
from layerwise.lens import pack_rows
from tiny_models import FAMILIES, tiny_bundle

PROMPTS = [[5, 6, 7], [9] * 40, [11, 12, 13, 14], [3] + list(range(20, 60)), [3 + i % 90 for i in range(90)], [7, 8]]
REFS = [[4, 5, 6], [7], [8, 9, 10, 11, 12], [], [13, 14], [15, 16, 17]]


def brute_force(lengths: list[int], extra: int, overhead: int) -> float:
    """The least cost over every split of the length-sorted rows into consecutive groups."""
    s = sorted(lengths)
    n = len(s)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        cost, start = 0.0, 0
        for j in range(1, n + 1):
            if j == n or cuts[j - 1]:
                cost += (j - start) * (s[j - 1] + extra) + overhead
                start = j
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_plan_is_optimal(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    lengths = torch.randint(1, 120, (n,), generator=g).tolist()
    extra, overhead = int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(0, 80, (1,), generator=g))
    groups = buckets.plan(lengths, extra, overhead)
    assert sorted(i for grp in groups for i in grp) == list(range(n))  # every row once
    cost = sum(len(grp) * (max(lengths[i] for i in grp) + extra) + overhead for grp in groups)
    assert cost == brute_force(lengths, extra, overhead)


def test_plan_examples() -> None:
    assert buckets.plan([51, 88, 52, 51], 0, 32) == [[0, 2, 3], [1]]
    assert buckets.plan([51, 88, 52, 51], 0, 10_000) == [[0, 1, 2, 3]]  # padding cheaper than a call


@pytest.mark.parametrize("family", FAMILIES)
def test_bucketed_forward_equals_padded(family: str) -> None:
    bundle = tiny_bundle(family)
    adapter = bundle.adapter
    packed = pack_rows(PROMPTS, REFS, 0)
    S = packed.prompt_len
    ref_cache, cache = compat.new_cache(bundle.model.config), compat.new_cache(bundle.model.config)
    want = adapter.forward(packed.ids, packed.mask, cache=ref_cache, select=packed.window)
    got = buckets.forward(adapter, packed.ids, packed.mask, S, cache=cache, select=packed.window, overhead=8)
    assert set(got) == set(want)
    if not buckets.applies(adapter, cache, packed.window):  # the one padded forward, as before
        for k in want:
            assert torch.equal(got[k], want[k])
        return
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    for a, b in zip(compat.cache_layers(cache), compat.cache_layers(ref_cache)):
        assert a.keys.shape == b.keys.shape
        valid = packed.mask.bool()[:, -a.keys.shape[2]:]  # a sliding-window layer keeps the last positions
        torch.testing.assert_close(a.keys.transpose(1, 2)[valid], b.keys.transpose(1, 2)[valid], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values.transpose(1, 2)[valid], b.values.transpose(1, 2)[valid], rtol=1e-4, atol=1e-4)
    # ...and decoding continues from the merged cache as from the padded one.
    out = {}
    for name, c, store in (("padded", ref_cache, want), ("bucketed", cache, got)):
        compat.crop_cache(c, packed.targets.shape[1])
        L = adapter.num_layers
        pre = Prefill(cache=c, mask=packed.mask[:, :S], last_hidden={k: store[k][:, 0] for k in (1, L)})
        out[name] = generate_exits(bundle, packed.ids[:, :S], packed.mask[:, :S], [1, L], Decoding(max_new_tokens=6),
                                   prefilled=pre, verify_family=False).tokens
    assert out["bucketed"] == out["padded"]


def test_buckets_apply_where_expected() -> None:
    """The fast path runs for plain KV caches; sliding-window caches take the padded forward."""
    packed = pack_rows(PROMPTS, REFS, 0)
    applies = {}
    for family in FAMILIES:
        b = tiny_bundle(family)
        applies[family] = buckets.applies(b.adapter, compat.new_cache(b.model.config), packed.window)
    assert applies["llama"] and applies["qwen2"] and applies["gpt2"]
    assert not buckets.applies(tiny_bundle("llama").adapter, None, None)  # every position: not bucketed
    print(applies)


def test_preallocated_layers_behave_like_concatenation() -> None:
    """compat.preallocated: updates written in place and rows reordered give the keys and values
    the plain concatenating layer gives, also past the room asked for (it grows)."""
    from tiny_models import configs

    cfg = configs()["llama"]
    g = torch.Generator().manual_seed(0)
    plain, fast = compat.new_cache(cfg), compat.new_cache(cfg)
    first = torch.randn(6, 2, 5, 8, generator=g), torch.randn(6, 2, 5, 8, generator=g)
    for c in (plain, fast):
        c.update(*first, 0)
    layer_p, layer_f = compat.cache_layers(plain)[0], compat.cache_layers(fast)[0]
    with compat.preallocated([layer_f], 2):
        assert "layerwise_buffers" in vars(layer_f)
        for step in range(5):  # 5 tokens into room for 2
            kv = torch.randn(layer_p.keys.shape[0], 2, 1, 8, generator=g), torch.randn(layer_p.keys.shape[0], 2, 1, 8, generator=g)
            for c in (plain, fast):
                c.update(*kv, 0)
            if step == 2:
                keep = torch.tensor([0, 2, 3, 5])
                compat.select_cache_rows(layer_p, keep)
                compat.select_cache_rows(layer_f, keep)
            assert torch.equal(layer_f.keys, layer_p.keys) and torch.equal(layer_f.values, layer_p.values)
    assert "update" not in vars(layer_f) and layer_f.keys.is_contiguous()
    assert torch.equal(layer_f.keys, layer_p.keys)
