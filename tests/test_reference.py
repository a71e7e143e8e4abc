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

Both references start from Hugging Face's hidden states of each row alone, and so do we
(``layer_stats`` on those states): entropy and cross-entropy agree within 1e-5 nats, KL within 1e-5
relative (1e-5 × max(KL, 1) nats), and every top-1 token is equal — against a float64 head, beyond
what the float32 head itself moves the numbers. The runner's packed, left-padded forward is then
compared with the rows alone (float32 rounding of a differently batched forward, ≤ 1e-4).
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


def assert_agree(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str,
                 tol: torch.Tensor | float = TOL) -> dict[str, float]:
    """Entropy and cross-entropy within ``tol`` nats (a number, or one per layer), KL within
    ``tol`` relative (× max(KL, 1) nats), every top-1 equal."""
    tol = torch.as_tensor(tol, dtype=torch.float64).reshape(-1, 1)  # (layers or 1, 1)
    worst = {}
    for name in ("entropy", "xent"):
        diff = (got[name].double() - want[name]).abs()
        over = diff - tol
        at = divmod(int(over.argmax()), diff.shape[1])
        assert float(over.max()) <= 0, (f"{what}: {name} differs by {float(diff[at]):.3g} nats at (layer, position) "
                                        f"{at}, allowed {float(tol[min(at[0], len(tol) - 1)]):.3g}")
        worst[name] = float(diff.max())
    kl_err = (got["kl_to_final"].double() - want["kl_to_final"]).abs() / want["kl_to_final"].abs().clamp(min=1.0)
    worst["kl_rel"] = float(kl_err.max())
    assert float((kl_err - tol).max()) <= 0, f"{what}: KL differs by {worst['kl_rel']:.3g} relative"
    flips = (got["top1"] != want["top1"]).nonzero().tolist()
    assert not flips, f"{what}: top-1 differs at (layer, position) {flips[:5]}"
    return worst


def ours_alone(bundle, p: list[int], r: list[int]) -> tuple[dict[str, torch.Tensor], tuple, torch.Tensor, slice]:
    """Our statistics (``layer_stats``) of one row from Hugging Face's own hidden states of that row
    alone: the same float32 numbers the references start from, so only the statistics differ."""
    hidden, logits, win = hf_hidden(bundle, p, r)
    st = layer_stats(bundle.adapter, {k: h[0, win] for k, h in enumerate(hidden)}, torch.tensor(r))
    got = {name: getattr(st, name) for name in ("entropy", "xent", "kl_to_final")} | {"top1": st.top1_ids}
    return got, hidden, logits, win


def test_lens_statistics_equal_a_float64_computation(default_bundle, rows):
    """Our statistics against the textbook in float64 — (1) from the model's own float32 norm and
    head: within 1e-5; (2) with norm and head in float64 as well: within 1e-5 beyond what the
    float32 head itself moves the number (measured here as |(1) − (2)| per layer: layer 0 of the
    default model has logits up to ~176, one float32 ulp = 1.5e-5, and its float32 head alone moves
    the cross-entropy by up to ~5e-5)."""
    bundle = default_bundle
    L = bundle.num_layers
    norm32, head32 = bundle.adapter.final_norm, bundle.model.get_output_embeddings()
    norm, head = copy.deepcopy(norm32).double(), copy.deepcopy(head32).double()
    prompts, refs = rows
    worst32: dict[str, float] = {}
    worst: dict[str, float] = {}
    head_effect = torch.zeros(L + 1, dtype=torch.float64)
    for i, (p, r) in enumerate(zip(prompts, refs)):
        got, hidden, _logits, win = ours_alone(bundle, p, r)
        with torch.inference_mode():
            # hidden_states[k], k < L, is layer k; hidden_states[L] already went through the final norm
            logits32 = [head32(norm32(hidden[k][0, win])) for k in range(L)] + [head32(hidden[L][0, win])]
            logits = [head(norm(hidden[k][0, win].double())) for k in range(L)] + [head(hidden[L][0, win].double())]
        want32, want = stats64(logits32, torch.tensor(r)), stats64(logits, torch.tensor(r))
        effect = torch.stack([(want32[n] - want[n]).abs().amax(1) for n in ("entropy", "xent")]).amax(0)
        head_effect = torch.maximum(head_effect, effect)
        for k, v in assert_agree(got, want32, f"row {i}, float32 head").items():
            worst32[k] = max(worst32.get(k, 0.0), v)
        for k, v in assert_agree(got, want, f"row {i}, float64 head", tol=TOL + effect).items():
            worst[k] = max(worst.get(k, 0.0), v)
    n = sum(map(len, refs))
    print(f"\nlargest differences over {n} positions × {L + 1} layers: from float64 statistics of the float32 "
          f"head {worst32}; from a float64 head {worst} (the float32 head alone moves entropy/xent by up to "
          f"{float(head_effect.max()):.2g}, at layer {int(head_effect.argmax())})")


def test_the_runners_packed_path_equals_each_row_alone(default_bundle, rows, ours):
    """The runner packs rows left-padded into one forward; the same statistics from each row alone
    differ only by float32 rounding of a differently batched forward (≤ 1e-4 nats; top-1 equal)."""
    prompts, refs = rows
    worst: dict[str, float] = {}
    for i, (p, r) in enumerate(zip(prompts, refs)):
        got, *_ = ours_alone(default_bundle, p, r)
        want = {k: v.double() for k, v in got.items() if k != "top1"} | {"top1": got["top1"]}
        for k, v in assert_agree(ours[i], want, f"row {i}, packed vs alone", tol=1e-4).items():
            worst[k] = max(worst.get(k, 0.0), v)
    print(f"\nlargest differences, packed vs alone: {worst}")


def test_lens_statistics_equal_tuned_lens_logit_lens(default_bundle, rows):
    pytest.importorskip("tuned_lens", reason="tuned-lens is installed --no-deps by scripts/setup.sh")
    from tuned_lens.nn import LogitLens

    bundle = default_bundle
    L = bundle.num_layers
    lens = LogitLens.from_model(bundle.model)
    prompts, refs = rows
    worst: dict[str, float] = {}
    for i, (p, r) in enumerate(zip(prompts, refs)):
        got, hidden, model_logits, win = ours_alone(bundle, p, r)
        with torch.inference_mode():
            logits = [lens(hidden[k][0, win], idx=k) for k in range(L)] + [model_logits[win]]
        want = stats64(logits, torch.tensor(r))
        for k, v in assert_agree(got, want, f"row {i} (tuned-lens)").items():
            worst[k] = max(worst.get(k, 0.0), v)
    print(f"\nlargest differences from tuned-lens's LogitLens: {worst}")
