"""The ``logit_lens`` fixture (layerwise.probe): the lens on a prompt of your own.

Every statistic is checked against an independent computation: a copy of the model cut to k
blocks (tests/tiny_models.truncated_copy), whose own logits are "the first k blocks + final norm +
head", with softmax, entropy and ranks worked out in float64 the textbook way — for every family
of tests/tiny_models.py. On the default model, the README's example runs as a user's test file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from layerwise.errors import ProbeError
from layerwise.probe import Probe
from tiny_models import FAMILIES, tiny_bundle, tiny_model, truncated_copy

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "layer by layer"  # TinyTokenizer: one token per character, after BOS


def reference_log_probs(family: str, ids: list[int]) -> torch.Tensor:
    """(L+1, V) float64: layer k's next-token log-probabilities at the last position, from a copy of
    the model cut to k blocks (k ≥ 1) and from Hugging Face's own embedding output (k = 0)."""
    model = tiny_model(family)
    bundle = tiny_bundle(family)
    L = bundle.num_layers
    x = torch.tensor([ids])
    rows = []
    with torch.no_grad():
        emb = model(input_ids=x, output_hidden_states=True).hidden_states[0][:, -1]
        rows.append(bundle.adapter.unembed(emb, norm=True)[0])
        for k in range(1, L):
            rows.append(truncated_copy(model, k)(input_ids=x).logits[0, -1].float())
        rows.append(model(input_ids=x).logits[0, -1].float())
    return torch.log_softmax(torch.stack(rows).double(), -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_statistic_is_the_cut_models(family):
    bundle = tiny_bundle(family)
    lens = Probe(bundle)(PROMPT)
    L = bundle.num_layers
    assert lens.ids == bundle.tokenizer.encode(PROMPT) and lens.position == len(lens.ids) - 1
    assert lens.num_layers == L and list(lens.layers) == list(range(L + 1))
    want = reference_log_probs(family, lens.ids)
    assert float((lens.log_probs.double() - want).abs().max()) < 1e-5
    for k in range(L + 1):
        lp = want[k]
        p = lp.exp()
        assert lens.entropy(k) == pytest.approx(float(-(p * lp).sum()), abs=1e-5)
        assert lens.kl_to_final(k) == pytest.approx(float((want[L].exp() * (want[L] - lp)).sum()), abs=1e-5)
        order = torch.argsort(lp, descending=True).tolist()
        assert lens.top_ids(k, 5) == order[:5]
        assert [t for t, _ in lens.top(k, 3)] == [bundle.tokenizer.decode([i]) for i in order[:3]]
        for tid in (order[0], order[7], order[-1]):
            assert lens.prob(k, tid) == pytest.approx(float(p[tid]), abs=1e-6)
            assert lens.rank(k, tid) == 1 + int((lp > lp[tid]).sum())
        assert lens.rank(k, order[0]) == 1 and lens.rank(k, order[4]) == 5
    # first_layer: brute force over every token that is top-3 at the last layer
    for tid in torch.argsort(want[L], descending=True)[:3].tolist():
        r = [1 + int((want[k] > want[k, tid]).sum()) for k in range(L + 1)]
        for rank in (1, 2, 5):
            inside = [x <= rank for x in r]
            first = None if not inside[L] else min(k for k in range(L + 1) if all(inside[k:]))
            assert lens.first_layer(tid, rank=rank) == first, (family, tid, rank, r)
    # a token never in the top 1 at the last layer has no first layer
    assert lens.first_layer(int(torch.argsort(want[L])[0])) is None


def test_the_probe_agrees_with_the_sweeps_statistics():
    """The probe's numbers are the lens's: entropy and top-1 at every layer as run_lens gives them."""
    from layerwise.lens import run_lens

    bundle = tiny_bundle("llama")
    lens = Probe(bundle)(PROMPT)
    rec = run_lens(bundle, torch.tensor([lens.ids]), top_k=1)[0]
    for k in lens.layers:
        assert lens.entropy(k) == pytest.approx(rec.stats["entropy"][k][-1], abs=1e-5)
        assert lens.top_ids(k, 1)[0] == lens.token_id(int(lens.top_ids(k, 1)[0]))
        assert rec.topk[k][-1][0][0] == f"t{lens.top_ids(k, 1)[0]}"


def test_cached_per_prompt_and_position():
    probe = Probe(tiny_bundle("llama"))
    a = probe(PROMPT)
    assert probe(PROMPT) is a
    b = probe(PROMPT, position=2)
    assert b is not a and b.position == 2 and probe(PROMPT, 2) is b
    assert probe(PROMPT, position=-1) is a
    # another position reads another distribution
    assert float((a.log_probs - b.log_probs).abs().max()) > 1e-3


@pytest.mark.parametrize("call, words", [
    (lambda lens: lens.prob(9, 5), "layer 9 is not a layer of this model (0..4"),
    (lambda lens: lens.entropy("4"), "layer '4' is not a layer of this model"),
    (lambda lens: lens.rank(1, 96), "token id 96 is outside the vocabulary (0..95)"),
    (lambda lens: lens.prob(1, 2.5), "a token must be a string or a token id, got 2.5"),
    (lambda lens: lens.prob(1, "ab"), "'ab' is not one token of this tokenizer: it encodes as 2 tokens ['t7', 't8']"),
    (lambda lens: lens.first_layer(5, rank=0), "rank must be a whole number ≥ 1, got 0"),
])
def test_bad_input_is_one_line(call, words):
    lens = Probe(tiny_bundle("llama"))(PROMPT)
    with pytest.raises(ProbeError) as exc:
        call(lens)
    assert words in str(exc.value) and "\n" not in str(exc.value) and " — " in str(exc.value)


def test_bad_prompt_or_position_is_one_line():
    probe = Probe(tiny_bundle("llama"))
    with pytest.raises(ProbeError, match="the prompt must be a non-empty string"):
        probe("")
    with pytest.raises(ProbeError, match=r"position 99 is outside the prompt's 15 tokens"):
        probe(PROMPT, position=99)


# ----------------------------------------------------------------------------------------------
# The default model: tokens as the model encodes them, and the README's example as a user's test


def test_tokens_are_encoded_as_the_model_would(default_bundle):
    lens = Probe(default_bundle)("The capital of France is")
    assert lens.token_id(" Paris") == 7042 and lens.token_id("Paris") == 38634  # the leading space matters
    assert lens.rank(30, " Paris") == 1 and lens.rank(30, "Paris") > 1
    with pytest.raises(ProbeError) as exc:
        lens.prob(30, " Eiffel")
    assert str(exc.value) == ("' Eiffel' is not one token of this tokenizer: it encodes as 2 tokens [' E', 'iffel'] — pass "
                              "exactly one token (leading spaces matter: a word after a space is usually ' word'), or its id")
    with pytest.raises(ProbeError) as exc:
        lens.prob(30, "Berlin")  # one token after a space, two at the start of a text
    assert str(exc.value).startswith("'Berlin' is not one token of this tokenizer: it encodes as 2 tokens ['Ber', 'lin']; "
                                     "' Berlin' (with a leading space, as after a word) is one token — ")


def readme_example() -> str:
    """The fenced Python block of README.md that uses ``logit_lens``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    found = [b for b in blocks if "def test_" in b and "logit_lens(" in b]
    assert len(found) == 1, "README.md has one example test that uses logit_lens"
    return found[0]


def test_the_readme_example_passes_on_the_default_model(pytester, monkeypatch):
    """As a user runs it: a test file with the README's example (and one with a bad token) under
    ``pytest --model smollm2-135m``; the example passes, the bad token fails with its one line."""
    from layerwise.models import cache_root

    monkeypatch.setenv("LAYERWISE_CACHE", str(cache_root()))  # pytester moves HOME: keep the converted model
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_readme=readme_example())
    pytester.makepyfile(test_typo="def test_typo(logit_lens):\n    logit_lens('The capital of France is').rank(30, ' Eiffel')\n")
    result = pytester.runpytest("--model", "smollm2-135m", "--no-layer-suite", "-p", "no:cacheprovider", "-rf")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "_ test_typo _" in line)
    assert lines[at + 1] == ("layerwise: ' Eiffel' is not one token of this tokenizer: it encodes as 2 tokens [' E', 'iffel'] — "
                             "pass exactly one token (leading spaces matter: a word after a space is usually ' word'), or its id")
    assert "Traceback" not in out and "probe.py" not in out
    # the model was loaded, but no evaluation ran: nothing is written
    assert not (pytester.path / "reports").exists()
