"""The fast path equals the simple reference path.

``run_sweep`` (one forward over ``prompt | reference`` for all rows, its KV cache cropped to the
prompts and reused for decoding, all exits decoded together with gated blocks, finished rows
dropped) must give the same tokens as Hugging Face ``generate`` on a copy of the model cut to k
blocks, and the same statistics as the lens run on each row alone — for every family's tiny
model and for the default model.
"""

import pytest

torch = pytest.importorskip("torch")

from tiny_models import FAMILIES, tiny_bundle, truncated_copy  # noqa: E402

# float32 rounding of a padded batch vs one unpadded row (other matmul shapes): up to 1.9e-6 on
# transformers 5.24 and 4.57, 1.4e-5 on 4.56 (Gemma-2, xent at layer 3); the same comparison in
# float64 agrees exactly, and a real error (a position, the norm, a block off) is > 1e-2.
TOL = 5e-5


def _reference_tokens(model, prompt_ids, pad, k, n):
    ref = truncated_copy(model, k) if k < len_blocks(model) else model
    out = []
    for p in prompt_ids:  # one prompt at a time: no padding anywhere in the reference
        ids = torch.tensor([p])
        g = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=pad)
        out.append(g[0, len(p):].tolist())
    return out


def len_blocks(model):
    from layerwise.archs import Adapter

    return Adapter(model).num_layers


def _check(bundle, prompt_ids, ref_ids, exits, n):
    from layerwise.decoding import Decoding, eos_ids
    from layerwise.lens import run_lens
    from layerwise.runner import RunConfig, run_sweep

    cfg = RunConfig(decoding=Decoding(max_new_tokens=n), teacher_forced_tokens=max(map(len, ref_ids)))
    sw = run_sweep(bundle, prompt_ids, ref_ids, exits, cfg)
    pad = bundle.tokenizer.pad_token_id
    for k in exits:
        want = _reference_tokens(bundle.model, prompt_ids, pad, k, n)
        for p, (got, ref) in enumerate(zip(sw.tokens[k], want)):
            assert got == ref[: len(got)], f"exit {k}, row {p}: sweep {got} vs truncated generate {ref}"
            assert len(got) == n or got[-1] in eos_ids(bundle), f"exit {k}, row {p}: stopped early without EOS"
    worst = 0.0
    offset = 0
    for p, (prompt, ref) in enumerate(zip(prompt_ids, ref_ids)):
        rec = run_lens(bundle, torch.tensor([prompt + ref]), top_k=0)[0]
        start = len(prompt) - 1
        for t in range(len(ref)):
            for name in ("entropy", "kl_to_final", "xent"):
                mine = getattr(sw.stats, name)[:, offset + t].tolist()
                for k, v in enumerate(mine):
                    worst = max(worst, abs(v - rec.stats[name][k][start + t]))
        offset += len(ref)
    assert worst <= TOL, f"sweep statistics differ from the per-row lens by {worst:.3g}"
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_equals_reference_on_tiny_models(family):
    torch.manual_seed(3)
    prompt_ids = [torch.randint(3, 96, (n,)).tolist() for n in (5, 9, 7)]
    ref_ids = [torch.randint(3, 96, (n,)).tolist() for n in (4, 6, 2)]
    _check(tiny_bundle(family), prompt_ids, ref_ids, [1, 2, 4], 8)


def test_sweep_equals_reference_on_the_default_model(default_bundle):
    from layerwise.data import default_prompts_path, format_prompt, load_examples

    tok = default_bundle.tokenizer
    ex = load_examples(default_prompts_path(), 3)
    prompt_ids = [tok.encode(format_prompt(e, "alpaca", tok)) for e in ex]
    ref_ids = [tok.encode(e.reference, add_special_tokens=False)[:12] for e in ex]
    worst = _check(default_bundle, prompt_ids, ref_ids, [8, 15, 23, 30], 16)
    print(f"largest statistic difference sweep vs per-row lens: {worst:.2g}")
