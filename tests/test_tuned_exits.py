"""Early exit through the tuned lens, against an independent computation.

The reference for a tuned exit at k is a copy of the model cut to its first k blocks
(``truncated_copy``) whose final norm is preceded by translator k, written here as the tuned-lens
package writes it (``h + Linear(h)``, a ``torch.nn.Linear`` holding ``weight[k]`` and
``bias[k]``) — generating with Hugging Face ``generate``, one unpadded prompt at a time. Our tuned
exits are rows of the same batched, left-padded, KV-cached decode as the plain exits.
"""

from __future__ import annotations

import functools

import pytest
import torch

from layerwise.decoding import Decoding, generate_exits
from layerwise.tuned import TunedLens
from tiny_models import FAMILIES, LAYERS, left_pad, random_lens, tiny_bundle, tiny_model, truncated_copy

N_NEW = 10
EOS = 2
FAMILIES_CHECKED = FAMILIES  # every family of the tiny-model zoo


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield



class Translator(torch.nn.Module):
    """tuned-lens's translator: ``h + Linear(h)`` (the residual form), in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        return (x + self.linear(x)).to(h.dtype)


def tuned_truncated_copy(model, k: int, lens: TunedLens):
    """The model cut to k blocks, translator k inserted right before its final norm."""
    from layerwise.archs import ARCHITECTURES

    spec = ARCHITECTURES[model.config.model_type]
    ref = truncated_copy(model, k, spec)
    parent_path, _, attr = spec.final_norm.rpartition(".")
    parent = ref.get_submodule(parent_path)
    norm = getattr(parent, attr)
    assert norm is not None, f"{model.config.model_type}: no final norm to put the translator before"
    setattr(parent, attr, torch.nn.Sequential(Translator(lens.weight[k], lens.bias[k]), norm))
    return ref


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 9, 14)]



@functools.lru_cache(maxsize=None)
def _bundle_and_lens(family: str):
    b = tiny_bundle(family)
    return b, random_lens(b, seed=sum(map(ord, family)))


def reference(family: str, k: int, prompt: list[int], n: int = N_NEW) -> tuple[list[int], torch.Tensor]:
    """HF greedy tokens and first-step logits of the k-block copy with translator k."""
    _, lens = _bundle_and_lens(family)
    ref = tuned_truncated_copy(tiny_model(family), k, lens)
    ids = torch.tensor([prompt])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       pad_token_id=0, eos_token_id=EOS)
    logits = ref(input_ids=ids).logits[0, -1].float()
    return out[0, ids.shape[1]:].tolist(), logits


@pytest.mark.parametrize("family", FAMILIES_CHECKED)
def test_tuned_exit_is_the_truncated_copy_with_translator_k(family):
    """Plain exits 1..L and tuned exits 1..L-1 in ONE batched decode: every tuned exit generates,
    token for token, what HF generate of the k-block copy with translator k generates."""
    b, lens = _bundle_and_lens(family)
    seqs = prompts()
    ids, mask = left_pad(seqs)
    exits = list(range(1, LAYERS + 1))
    tuned = list(range(1, LAYERS))
    g = generate_exits(b, ids, mask, exits, Decoding(max_new_tokens=N_NEW), tuned=lens, tuned_exits=tuned)
    assert g.tuned_exits == tuned and sorted(g.tuned_tokens) == tuned
    differs = 0
    for k in tuned:
        for i, s in enumerate(seqs):
            want, want_logits = reference(family, k, s)
            got = g.tuned_tokens[k][i]
            assert got == want, f"{family} tuned exit {k} prompt {i}: {got} != HF generate {want}"
            torch.testing.assert_close(g.tuned_first_logits[k][i], want_logits, rtol=1e-4, atol=1e-4)
            differs += got != g.tokens[k][i]
    assert differs, f"{family}: the translators changed no generation (the test would not see a missing translator)"


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_plain_exits_are_unchanged_by_tuned_rows(family):
    b, lens = _bundle_and_lens(family)
    ids, mask = left_pad(prompts(1))
    exits = [1, 2, LAYERS]
    plain = generate_exits(b, ids, mask, exits, Decoding(max_new_tokens=N_NEW))
    both = generate_exits(b, ids, mask, exits, Decoding(max_new_tokens=N_NEW), tuned=lens, tuned_exits=[1, 3])
    assert both.tokens == plain.tokens
    for k in exits:
        torch.testing.assert_close(both.first_logits[k], plain.first_logits[k], rtol=0, atol=0)


@pytest.mark.parametrize("compact_fraction", [0.0, 1.0])
def test_tuned_exits_together_equal_alone(compact_fraction):
    """Compaction (finished rows dropped) keeps each tuned row on its translator."""
    b, lens = _bundle_and_lens("llama")
    ids, mask = left_pad(prompts(2))
    together = generate_exits(b, ids, mask, [1, 2, 3, 4], Decoding(max_new_tokens=N_NEW), tuned=lens,
                              tuned_exits=[1, 2, 3], compact_fraction=compact_fraction)
    for k in (1, 2, 3):
        alone = generate_exits(b, ids, mask, [4], Decoding(max_new_tokens=N_NEW), tuned=lens, tuned_exits=[k])
        assert together.tuned_tokens[k] == alone.tuned_tokens[k], f"tuned exit {k}"


def test_tuned_and_plain_exits_share_one_decode():
    """One model call per generated token whatever the number of exits: tuned rows ride along."""
    b, lens = _bundle_and_lens("llama")
    ids, mask = left_pad(prompts())
    calls = []
    handle = b.model.register_forward_pre_hook(lambda *_a: calls.append(1))
    try:
        g = generate_exits(b, ids, mask, [1, 2, 4], Decoding(max_new_tokens=N_NEW), tuned=lens, tuned_exits=[1, 2, 3])
    finally:
        handle.remove()
    assert len(calls) == g.steps <= N_NEW - 1


def test_an_untrained_lens_decodes_like_the_plain_exits():
    b = tiny_bundle("gemma2")
    lens = TunedLens(b.num_layers, b.info["hidden_size"])
    ids, mask = left_pad(prompts())
    g = generate_exits(b, ids, mask, [1, 2, 3], Decoding(max_new_tokens=N_NEW), tuned=lens, tuned_exits=[1, 2, 3])
    assert g.tuned_tokens == g.tokens


def test_the_hook_is_removed_and_tuned_exits_need_a_lens():
    from layerwise.errors import ConfigError

    b, lens = _bundle_and_lens("llama")
    ids, mask = left_pad(prompts())
    norm = b.adapter.final_norm
    before = dict(norm._forward_pre_hooks)
    generate_exits(b, ids, mask, [2], Decoding(max_new_tokens=3), tuned=lens, tuned_exits=[1])
    assert dict(norm._forward_pre_hooks) == before
    with pytest.raises(ConfigError, match="tuned exits need a tuned lens"):
        generate_exits(b, ids, mask, [2], Decoding(max_new_tokens=3), tuned_exits=[1])
