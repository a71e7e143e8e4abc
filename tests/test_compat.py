"""The transformers internals layerwise relies on (layerwise/compat.py) and the forward primitive
(Adapter.forward), checked on every family's tiny model. CI runs this file on the lowest
supported transformers too (scripts/setup-floor.sh), so a release that changes one of them
fails here, naming the piece, rather than deep inside the decode."""

from __future__ import annotations

import pytest
import torch

from layerwise import compat
from tiny_models import FAMILIES, LAYERS, left_pad, tiny_bundle

PROMPTS = ([5, 6, 7, 8, 9, 10], [11, 12, 13])



def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert compat.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_gives_every_layer_at_the_positions_asked_for(family):
    b = tiny_bundle(family)
    ad = b.adapter
    ids, mask = left_pad(PROMPTS)
    full = ad.forward(ids, mask)
    assert sorted(full) == list(range(LAYERS + 1))
    assert all(v.shape == (2, ids.shape[1], full[0].shape[-1]) for v in full.values())
    # Layer L is the base model's own (normed) last hidden state, with the positions generate uses.
    with torch.no_grad():
        want = ad.decoder(input_ids=ids, attention_mask=mask, **compat.forward_kwargs(ad.decoder, mask)).last_hidden_state
    assert torch.equal(full[LAYERS], want)
    # Layers 0..L-1 of the unpadded row equal Hugging Face's own hidden_states.
    one = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        hs = b.model(input_ids=one, output_hidden_states=True).hidden_states
    got = ad.forward(one)
    for k in range(LAYERS):
        torch.testing.assert_close(got[k], hs[k], rtol=0, atol=1e-5)
    # select: a slice or an index tensor over the positions, the same numbers as the full pass.
    win = ad.forward(ids, mask, select=slice(2, 5))
    picks = ad.forward(ids, mask, select=torch.tensor([0, 3, 5]))
    for k in range(LAYERS + 1):
        assert torch.equal(win[k], full[k][:, 2:5]), k
        assert torch.equal(picks[k], full[k][:, [0, 3, 5]]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_is_filled_cropped_and_reshaped_per_row(family):
    b = tiny_bundle(family)
    ad = b.adapter
    ids, mask = left_pad(PROMPTS)
    T = ids.shape[1]
    cache = compat.new_cache(b.model.config)
    assert compat.cache_kwarg(ad.decoder) in ("cache", "past_key_values")
    ad.forward(ids, mask, cache=cache)
    layers = compat.cache_layers(cache)
    assert len(layers) == LAYERS
    assert cache.get_seq_length() == T
    compat.crop_cache(cache, 0)  # transformers 4.x's crop(0) would keep nothing
    assert cache.get_seq_length() == T
    compat.crop_cache(cache, 2)
    assert cache.get_seq_length() == T - 2
    keys = layers[1].keys.clone()
    assert keys.shape[0] == 2 and keys.shape[-2] == T - 2
    compat.select_cache_rows(layers[1], torch.arange(2).repeat(3))  # [a, b] -> [a, b, a, b, a, b]
    assert torch.equal(layers[1].keys, torch.cat([keys] * 3))
    compat.select_cache_rows(layers[1], torch.tensor([1, 4]))
    assert torch.equal(layers[1].keys, keys[[1, 0]])
    assert layers[1].values.shape[:-1] == layers[1].keys.shape[:-1]  # values follow the keys


def test_block_outputs_of_both_forms():
    h, w = torch.ones(2, 1, 4), torch.zeros(2, 3)
    assert compat.block_hidden(h) is h and compat.block_hidden((h, w)) is h
    assert compat.block_output(h, torch.zeros(1)) is h
    assert compat.block_output(h, (None, w))[1] is w and compat.block_output(h, (None, w))[0] is h
    assert compat.output_form(h) is None and compat.output_form((h, w)) == (None, None)
    assert compat.block_output(h, compat.output_form((h, w))) == (h, None)


def test_slice_block_call_cuts_rows_but_not_cache_position():
    mask = torch.ones(4, 1, 1, 7)
    cos_sin = (torch.ones(4, 1, 8), torch.ones(4, 1, 8))
    cache_position = torch.arange(6, 7)
    args, kwargs = compat.slice_block_call(
        (mask,), {"position_embeddings": cos_sin, "cache_position": cache_position, "use_cache": True}, 4, 2)
    assert args[0].shape[0] == 2
    assert [t.shape[0] for t in kwargs["position_embeddings"]] == [2, 2]
    assert kwargs["cache_position"] is cache_position and kwargs["use_cache"] is True


def test_accepts():
    class M:
        def forward(self, input_ids, position_ids=None):
            pass

    assert compat.accepts(M(), "position_ids") and not compat.accepts(M(), "cache")
    assert compat.cache_kwarg(M()) == "past_key_values"
