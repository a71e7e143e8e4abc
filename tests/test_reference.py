"""The lens statistics against independent references on the default model.

What the runner computes — rows ``prompt | reference`` packed left-padded (``lens.pack_rows``), one
``Adapter.forward`` over the teacher-forced window, ``lens.layer_stats`` — is compared, position
by position and layer by layer, with two computations that share none of that code:

* **float64**: each row alone (no padding) through the model with Hugging Face's
  ``output_hidden_states``; the model's own final norm and head copied to float64, and softmax,
  entropy, cross-entropy, KL(final ‖ layer) and the top-1 token the textbook way in float64;
* **tuned-lens** (``tuned_lens.nn.LogitLens``, its own way of finding the final norm and the
  unembedding; the package is installed ``--no-deps`` by scripts/setup.sh, as its declared
  dependencies — wandb, datasets, torchdata, plotly — are not needed for the lens): its logits
  for layers 0..L-1 (layer L: the model's logits, as tuned-lens takes them), statistics in float64.

Entropy and cross-entropy agree within 1e-5 nats, KL within 1e-5 relative (1e-5 × max(KL, 1)
nats), and every top-1 token is equal.
"""

from __future__ import annotations

import copy

import pytest
import torch

from layerwise.data import default_prompts_path, format_prompt, load_examples
from layerwise.lens import layer_stats, pack_rows

ROWS = 4
TF_TOKENS = 24
TOL = 1e-5


@pytest.fixture(scope="module")
def rows(default_bundle):
    tok = default_bundle.tokenizer
    examples = load_examples(default_prompts_path(), ROWS)
    prompts = [tok.encode(format_prompt(ex, "alpaca", tok)) for ex in examples]
    refs = [tok.encode(ex.reference, add_special_tokens=False)[:TF_TOKENS] for ex in examples]
    return prompts, refs


@pytest.fixture(scope="module")
def ours(default_bundle, rows):
    """The runner's path: per row, (L+1, positions) statistics of its teacher-forced window."""
    prompts, refs = rows
    ad = default_bundle.adapter
    packed = pack_rows(prompts, refs, default_bundle.tokenizer.pad_token_id)
    store = ad.forward(packed.ids, packed.mask, select=packed.window)
    flat = {k: v[packed.valid] for k, v in store.items()}
    st = layer_stats(ad, flat, packed.targets[packed.valid])
    out, at = [], 0
    for r in refs:
        n = len(r)
        out.append({name: getattr(st, name)[:, at:at + n] for name in ("entropy", "xent", "kl_to_final")}
                   | {"top1": st.top1_ids[:, at:at + n]})
        at += n
    return out


def stats64(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """(L+1) × (n, V) logits → float64 statistics, (L+1, n) each."""
    lpf = torch.log_softmax(logits[-1].double(), -1)
    out: dict[str, list[torch.Tensor]] = {"entropy": [], "xent": [], "kl_to_final": [], "top1": []}
    for z in logits:
        lp = torch.log_softmax(z.double(), -1)
        out["entropy"].append(-(lp.exp() * lp).sum(-1))
        out["xent"].append(-lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        out["kl_to_final"].append((lpf.exp() * (lpf - lp)).sum(-1))
        out["top1"].append(lp.argmax(-1))
    return {k: torch.stack(v) for k, v in out.items()}


def hf_hidden(bundle, prompt: list[int], ref: list[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, slice]:
    """One row alone: Hugging Face's hidden states (L+1 of them, the last one normed), its logits,
    and the positions that predict the reference tokens."""
    ids = torch.tensor([prompt + ref])
    with torch.inference_mode():
        out = bundle.model(input_ids=ids, output_hidden_states=True)
    S = len(prompt)
    return out.hidden_states, out.logits[0], slice(S - 1, S - 1 + len(ref))


def assert_agree(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> dict[str, float]:
    worst = {}
    for name in ("entropy", "xent"):
        d = float((got[name].double() - want[name]).abs().max())
        assert d <= TOL, f"{what}: {name} differs by {d:.3g} nats"
        worst[name] = d
    kl_err = (got["kl_to_final"].double() - want["kl_to_final"]).abs() / want["kl_to_final"].abs().clamp(min=1.0)
    worst["kl_rel"] = float(kl_err.max())
    assert worst["kl_rel"] <= TOL, f"{what}: KL differs by {worst['kl_rel']:.3g} relative"
    flips = (got["top1"] != want["top1"]).nonzero().tolist()
    assert not flips, f"{what}: top-1 differs at (layer, position) {flips[:5]}"
    return worst


def test_lens_statistics_equal_a_float64_computation(default_bundle, rows, ours):
    bundle = default_bundle
    L = bundle.num_layers
    norm = copy.deepcopy(bundle.adapter.final_norm).double()
    head = copy.deepcopy(bundle.model.get_output_embeddings()).double()
    prompts, refs = rows
    worst: dict[str, float] = {}
    for i, (p, r) in enumerate(zip(prompts, refs)):
        hidden, _logits, win = hf_hidden(bundle, p, r)
        with torch.inference_mode():
            # hidden_states[k], k < L, is layer k; hidden_states[L] already went through the final norm
            logits = [head(norm(hidden[k][0, win].double())) for k in range(L)] + [head(hidden[L][0, win].double())]
        want = stats64(logits, torch.tensor(r))
        for k, v in assert_agree(ours[i], want, f"row {i}").items():
            worst[k] = max(worst.get(k, 0.0), v)
    print(f"largest differences from float64 over {sum(map(len, refs))} positions × {L + 1} layers: {worst}")


def test_lens_statistics_equal_tuned_lens_logit_lens(default_bundle, rows, ours):
    pytest.importorskip("tuned_lens", reason="tuned-lens is installed --no-deps by scripts/setup.sh")
    from tuned_lens.nn import LogitLens

    bundle = default_bundle
    L = bundle.num_layers
    lens = LogitLens.from_model(bundle.model)
    prompts, refs = rows
    worst: dict[str, float] = {}
    for i, (p, r) in enumerate(zip(prompts, refs)):
        hidden, model_logits, win = hf_hidden(bundle, p, r)
        with torch.inference_mode():
            logits = [lens(hidden[k][0, win], idx=k) for k in range(L)] + [model_logits[win]]
        want = stats64(logits, torch.tensor(r))
        for k, v in assert_agree(ours[i], want, f"row {i} (tuned-lens)").items():
            worst[k] = max(worst.get(k, 0.0), v)
    print(f"largest differences from tuned-lens's LogitLens: {worst}")
