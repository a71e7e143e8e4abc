"""The regression gate is right: it passes on an unchanged rerun and fails on a changed model.

Runs in-process through the engine (``runner.evaluate`` + ``baseline.make_baseline/compare``),
the same functions ``layer_tests/test_baseline.py`` calls, at the size of a CI job: the default
model (SmolLM2-135M, 30 blocks, float32 on CPU), 8 rows, 24 new tokens, 16 teacher-forced tokens,
no BERTScore; and a tiny Llama (tests/tiny_models.py) on a 3-row prompts file.

How the tolerances (``baseline.DEFAULT_TOLERANCES``) were chosen — a number passes when it is
within ``max(abs, rel × |baseline|)``:

* Noise: greedy CPU runs are bit-for-bit repeatable. Measured run-to-run spread over every tracked
  number (exit BLEU / ROUGE-L, six lens curves at all 31 layers): **0**, and the results JSON minus
  ``timing`` is byte-identical. The closest thing to noise a CI machine sees is float rounding in
  other kernels; changing the batch composition (batch size 20 → 3 or 1: other padding, other
  matmul shapes) moves the numbers by at most 7e-6 and no greedy token — 3 to 4 orders of magnitude
  below every tolerance. So the tolerances are not noise margins: each is the smallest change worth
  failing a pull request over — 0.05 nats (or 5 %) of lens entropy / KL, 0.05 nats (or 2 %) of
  cross-entropy, 3 points of top-1 agreement, 0.01 ROUGE-L (or 5 %), 0.5 BLEU (or 10 %).
* What the perturbations moved (default model, blocks numbered 1..30 as layers are; measured when
  this file was written — rerun with ``-s`` to print the current numbers):

  - (a) Gaussian noise, std = 0.1 × each weight matrix's own std, added to every matrix of block 15:
    a 20 dB signal-to-noise corruption of one block of 30 (about what a broken re-quantization or a
    bad shard does). 23 numbers fail: first-token entropy at 9 layers ≥ 15 (worst layer 24,
    1.96 → 2.63 nats, allowed ±0.098), first-token top-1 agreement at 11 layers, ROUGE-L at exits
    23 and 30 (exit 23: 0.027 → 0.058, allowed ±0.01). Final BLEU moves 9.04 → 8.44, inside its
    ±0.90. A sweep of the noise level: 0.02 → 3 numbers (worst at 1.6 × its tolerance: the gate's
    resolution), 0.05 → 6, 0.1 → 23, 0.25 → 42 (final BLEU 6.1), 0.5 → 99 (final BLEU 0.25).
  - (b) blocks 10 and 11 swapped (their attention ``layer_idx`` swapped too, so each still owns its
    KV-cache slot): 100 numbers; final BLEU 9.04 → 6.07, exit-15 ROUGE-L 0.045 → 0.069, teacher-
    forced cross-entropy at layer 29 2.83 → 3.04 (±0.057), KL at layer 14 19.2 → 17.3 (±0.96).
    Entropy and cross-entropy move only at layers ≥ 10; KL and agreement (measured against the
    final layer) move everywhere.
  - (c) the final norm's weight × 1.05: a uniform rescale leaves every greedy token unchanged
    (argmax is scale-invariant) — only the lens sees it: 86 numbers, e.g. layer-0 cross-entropy
    114.3 → 120.0 (±2.29), layer-30 entropy 1.33 → 1.21 (±0.067). × 1.02 passes (worst at 1.0 ×
    tolerance).
  - (d) bfloat16 weights against the float32 baseline: 2 numbers — exit-15 ROUGE-L 0.045 → 0.031
    (−0.0136, allowed ±0.01) and first-token top-1 agreement at layer 29, 0 → 0.125 (one row of 8,
    allowed ±0.03). The lens curves move by at most 0.37 × their tolerance (teacher-forced entropy
    0.11 ×): bfloat16 fails the gate through flipped greedy tokens, not through the lens curves.
* The tiny Llama (4 blocks, hidden 32, vocabulary 96, 3 rows, 46 teacher-forced positions; its text
  scores are 0, so only the lens curves can move): unchanged rerun spread 0; noise 0.1 × std in
  block 2 → 3 numbers (top-1 agreement at layers 2–3, worst −0.67 on the first token); blocks 2 and
  3 swapped → 11 (cross-entropy at layer 4 +0.66 nats against ±0.11); final norm × 1.05 → 6 (KL
  and cross-entropy at layers 0–2); bfloat16 → 2, the narrowest miss measured: top-1 agreement at
  layers 2–3, one position of 46 flips (+0.043 against ±0.03).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import defaultdict
from typing import Any, Iterator

import pytest
import torch

from layerwise.baseline import compare, identity_mismatch, make_baseline
from layerwise.decoding import Decoding
from layerwise.io import dumps_json
from layerwise.models import bundle_from_model, load_model
from layerwise.runner import RunConfig, evaluate

torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))


def gate_config(**kw: Any) -> RunConfig:
    return RunConfig(limit=8, decoding=Decoding(max_new_tokens=24), teacher_forced_tokens=16, bertscore_model=None, **kw)


def as_saved(obj: Any) -> Any:
    """What a baseline looks like after a write and a load (no shared lists with the results)."""
    return json.loads(dumps_json(obj))


def without_timing(results: dict[str, Any]) -> str:
    return dumps_json({k: v for k, v in results.items() if k != "timing"})


# -- perturbations (in place, always restored) ---------------------------------------------------


@contextlib.contextmanager
def block_noise(bundle: Any, block: int, frac: float, seed: int = 0) -> Iterator[None]:
    """Add N(0, (frac · std(W))²) to every weight matrix W of one block (1-based block number)."""
    blk = bundle.adapter.blocks[block - 1]
    saved = {n: p.detach().clone() for n, p in blk.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for n, p in blk.named_parameters():
                if p.dim() >= 2:
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * float(saved[n].float().std()) * frac
                    p.add_(noise.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, p in blk.named_parameters():
                p.copy_(saved[n])
        assert all(torch.equal(p, saved[n]) for n, p in blk.named_parameters())


def _set_layer_idx(block: Any, idx: int) -> None:
    for m in block.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = idx


@contextlib.contextmanager
def swapped_blocks(bundle: Any, i: int, j: int) -> Iterator[None]:
    """Swap blocks i and j (1-based). The attention modules index the KV cache by their own
    ``layer_idx``; give each block the index of its new position, as a model built in that order
    would have (the engine sizes cache slot k for block k's rows)."""
    blocks = bundle.adapter.blocks
    a, b = blocks[i - 1], blocks[j - 1]
    try:
        blocks[i - 1], blocks[j - 1] = b, a
        _set_layer_idx(b, i - 1)
        _set_layer_idx(a, j - 1)
        yield
    finally:
        blocks[i - 1], blocks[j - 1] = a, b
        _set_layer_idx(a, i - 1)
        _set_layer_idx(b, j - 1)


@contextlib.contextmanager
def scaled_final_norm(bundle: Any, factor: float) -> Iterator[None]:
    w = bundle.adapter.final_norm.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(factor)
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)
        assert torch.equal(w, saved)


# -- reporting -----------------------------------------------------------------------------------


def describe(devs: list[Any]) -> str:
    """Which metrics moved where, by how much, against what tolerance."""
    if not devs:
        return "  gate passes: every tracked number within tolerance"
    by_metric: dict[str, list[Any]] = defaultdict(list)
    for d in devs:
        by_metric[d.metric].append(d)
    lines = [f"  {len(devs)} numbers outside tolerance:"]
    for metric, ds in by_metric.items():
        worst = max(ds, key=lambda d: float("inf") if d.value is None else abs(d.value - d.baseline) / max(d.allowed, 1e-12))
        layers = ",".join(str(d.layer) for d in ds)
        delta = "missing" if worst.value is None else f"{worst.value - worst.baseline:+.4g}"
        lines.append(f"    {metric:28s} at layers {layers}; worst layer {worst.layer}: {worst.baseline:.4g} → "
                     f"{worst.value if worst.value is None else round(worst.value, 4)} ({delta}, allowed ±{worst.allowed:.3g})")
    return "\n".join(lines)


def max_spread(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two results over every number the gate tracks."""
    ba, bb = make_baseline(a), make_baseline(b)
    diffs = [0.0]
    for ea, eb in zip(ba["exits"], bb["exits"]):
        diffs += [abs(ea[k] - eb[k]) for k in ("bleu", "rougeL") if ea[k] is not None]
    for name, vals in ba["lens"].items():
        diffs += [abs(x - y) for x, y in zip(vals, bb["lens"][name]) if x is not None and y is not None]
    return max(diffs)


def exits_line(res: dict[str, Any]) -> str:
    return "  exits (layer: BLEU / ROUGE-L): " + ", ".join(f"{e['layer']}: {e['bleu']:.2f} / {e['rougeL']:.3f}" for e in res["exits"])


def gate(name: str, baseline: dict[str, Any], res: dict[str, Any]) -> list[Any]:
    assert identity_mismatch(baseline, res) is None  # compared, not refused
    devs = compare(baseline, res)
    print(f"\n[{name}]\n{describe(devs)}\n{exits_line(res)}")
    return devs


# -- the default model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(default_bundle):
    res = evaluate(gate_config(), bundle=default_bundle)
    print("\n[reference, float32]\n" + exits_line(res))
    return res, as_saved(make_baseline(res))


@pytest.mark.slow
def test_unchanged_rerun_passes_and_is_byte_identical(default_bundle, reference):
    first, baseline = reference
    again = evaluate(gate_config(), bundle=default_bundle)
    spread = max_spread(first, again)
    print(f"\n[unchanged rerun] run-to-run spread over every tracked number: {spread}")
    assert gate("unchanged rerun", baseline, again) == []
    assert spread == 0.0
    assert without_timing(first) == without_timing(again)


@pytest.mark.slow
def test_rounding_noise_is_far_below_tolerance(default_bundle, reference):
    """Another batch size pads and multiplies differently: float rounding, the noise floor of any
    CPU. It must stay orders of magnitude inside the tolerances (and the gate must pass)."""
    first, baseline = reference
    res = evaluate(gate_config(batch_size=3), bundle=default_bundle)
    spread = max_spread(first, res)
    print(f"\n[batch size 3 instead of 20] largest change of any tracked number: {spread:.3g}")
    assert gate("batch size 3", baseline, res) == []
    assert spread < 1e-3
    assert [r["generations"] for r in res["rows"]] == [r["generations"] for r in first["rows"]]


@pytest.mark.slow
def test_gate_fails_on_noise_in_one_block(default_bundle, reference):
    _, baseline = reference
    with block_noise(default_bundle, block=15, frac=0.1):
        res = evaluate(gate_config(), bundle=default_bundle)
    devs = gate("(a) noise 0.1 × weight std in block 15", baseline, res)
    assert devs, "the gate passed a model with a corrupted block"
    assert all(d.layer >= 15 for d in devs if d.metric.endswith("entropy")), "layers below the noisy block cannot move"


@pytest.mark.slow
def test_gate_fails_on_two_blocks_swapped(default_bundle, reference):
    _, baseline = reference
    with swapped_blocks(default_bundle, 10, 11):
        res = evaluate(gate_config(), bundle=default_bundle)
    devs = gate("(b) blocks 10 and 11 swapped", baseline, res)
    assert devs, "the gate passed a model with two blocks swapped"
    assert {d.metric for d in devs} & {"bleu", "rougeL"}, "swapped blocks change the generated text"
    # a layer's own entropy and cross-entropy depend only on the blocks below it (KL and agreement
    # are measured against the final layer, so they move everywhere)
    assert all(d.layer >= 10 for d in devs if d.metric.endswith(("entropy", "xent")))


@pytest.mark.slow
def test_gate_fails_on_final_norm_perturbed(default_bundle, reference):
    first, baseline = reference
    with scaled_final_norm(default_bundle, 1.05):
        res = evaluate(gate_config(), bundle=default_bundle)
    devs = gate("(c) final norm weight × 1.05", baseline, res)
    assert devs, "the gate passed a model with a changed final norm"
    # the lens applies the final norm at every layer: the lens curves catch it
    assert any(d.metric.startswith(("teacher_forced.", "first_token.")) for d in devs)


@pytest.mark.slow
def test_gate_fails_on_bfloat16_against_a_float32_baseline(reference):
    _, baseline = reference
    assert baseline["model"]["dtype"] == "float32"
    bf16 = load_model("smollm2-135m", dtype="bfloat16", device="cpu")
    assert bf16.info["dtype"] == "bfloat16"
    res = evaluate(gate_config(), bundle=bf16)
    devs = gate("(d) bfloat16 against the float32 baseline", baseline, res)
    assert devs, "the gate passed bfloat16 weights against a float32 baseline"


# -- a tiny model family -------------------------------------------------------------------------

TINY_ROWS = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, nice to meet you."},
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from tiny_models import TinyTokenizer, tiny_model

    prompts = tmp_path_factory.mktemp("tiny-gate") / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS), encoding="utf-8")
    model = copy.deepcopy(tiny_model("llama"))  # the cached one is shared with other tests
    bundle = bundle_from_model(model, TinyTokenizer(), name="tiny-llama")

    def cfg() -> RunConfig:
        return RunConfig(prompts=str(prompts), limit=None, prompt_format="raw", decoding=Decoding(max_new_tokens=12),
                         teacher_forced_tokens=16, bertscore_model=None, exit_layers=[1, 2, 3, 4])

    first = evaluate(cfg(), bundle=bundle)
    return bundle, cfg, first, as_saved(make_baseline(first))


def test_tiny_unchanged_rerun_passes(tiny_setup):
    bundle, cfg, first, baseline = tiny_setup
    again = evaluate(cfg(), bundle=bundle)
    assert gate("tiny: unchanged rerun", baseline, again) == []
    assert max_spread(first, again) == 0.0
    assert without_timing(first) == without_timing(again)


@pytest.mark.parametrize("change", ["noise in block 2", "blocks 2 and 3 swapped", "final norm × 1.05"])
def test_tiny_gate_fails_on_a_changed_model(tiny_setup, change):
    bundle, cfg, _, baseline = tiny_setup
    ctx = {"noise in block 2": lambda: block_noise(bundle, 2, 0.1),
           "blocks 2 and 3 swapped": lambda: swapped_blocks(bundle, 2, 3),
           "final norm × 1.05": lambda: scaled_final_norm(bundle, 1.05)}[change]
    with ctx():
        res = evaluate(cfg(), bundle=bundle)
    assert gate(f"tiny: {change}", baseline, res), f"the gate passed the tiny model with {change}"
    # and restoring the model restores the numbers exactly
    assert compare(baseline, evaluate(cfg(), bundle=bundle)) == []


def test_tiny_bfloat16(tiny_setup):
    bundle, cfg, first, baseline = tiny_setup
    low = bundle_from_model(copy.deepcopy(bundle.model).to(torch.bfloat16), bundle.tokenizer, name="tiny-llama-bf16")
    res = evaluate(cfg(), bundle=low)
    assert res["run"]["model"]["dtype"] == "bfloat16"
    devs = gate("tiny: bfloat16 against float32", baseline, res)
    print(f"  largest change of any tracked number: {max_spread(first, res):.4g}")
    assert devs, "the gate passed bfloat16 weights against a float32 baseline"


# -- where the model changed: the first divergent layer (issue #13) -----------------------------------


@contextlib.contextmanager
def mlp_noise(bundle: Any, block: int, frac: float = 0.2, seed: int = 0) -> Iterator[None]:
    """Noise in one block's MLP only."""
    mlp = bundle.adapter.blocks[block - 1].mlp
    saved = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for n, p in mlp.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * float(saved[n].std()) * frac)
        yield
    finally:
        with torch.no_grad():
            for n, p in mlp.named_parameters():
                p.copy_(saved[n])


@contextlib.contextmanager
def attention_output_zeroed(bundle: Any, block: int) -> Iterator[None]:
    o = bundle.adapter.blocks[block - 1].self_attn.o_proj.weight
    saved = o.detach().clone()
    try:
        with torch.no_grad():
            o.zero_()
        yield
    finally:
        with torch.no_grad():
            o.copy_(saved)


@pytest.mark.parametrize("change, expected", [
    ("mlp noise in block 1", 1), ("mlp noise in block 3", 3), ("attention output of block 2 zeroed", 2),
    ("attention output of block 4 zeroed", 4), ("blocks 2 and 3 swapped", 2), ("final norm × 1.05", 0),
])
def test_the_first_divergent_layer_is_the_changed_block(tiny_setup, change, expected):
    """When only block k changes, layers 0..k-1 are the same computation: the gate locates the
    change at layer k (the output of block k); a changed final norm moves every layer's lens (0)."""
    from layerwise.baseline import judge

    bundle, cfg, _, baseline = tiny_setup
    ctx = {"mlp noise in block 1": lambda: mlp_noise(bundle, 1), "mlp noise in block 3": lambda: mlp_noise(bundle, 3),
           "attention output of block 2 zeroed": lambda: attention_output_zeroed(bundle, 2),
           "attention output of block 4 zeroed": lambda: attention_output_zeroed(bundle, 4),
           "blocks 2 and 3 swapped": lambda: swapped_blocks(bundle, 2, 3),
           "final norm × 1.05": lambda: scaled_final_norm(bundle, 1.05)}[change]
    with ctx():
        res = evaluate(cfg(), bundle=bundle)
    v = judge(baseline, res, name="tiny.json")
    print(f"\n[{change}] {v.line()}\n  {v.divergence}")
    assert v.first_divergent == expected, v.divergence
    assert judge(baseline, evaluate(cfg(), bundle=bundle), name="tiny.json").first_divergent is None  # restored


@pytest.mark.slow
def test_the_failure_message_names_the_perturbed_block_first(default_bundle, reference):
    """Must-show of issue #13: noise in one block of the default model; the failure message's first
    line names that block's layer, then the summary lines, then at most 20 details."""
    from layerwise.baseline import judge

    _, baseline = reference
    with block_noise(default_bundle, block=15, frac=0.1):
        res = evaluate(gate_config(), bundle=default_bundle)
    v = judge(baseline, res, name="baselines/smollm2-135m.json")
    msg = v.message("reports/results.json")
    print("\n" + msg)
    first = msg.splitlines()[0]
    assert v.status == "failed" and v.first_divergent == 15
    assert "departs from the baseline at layer 15 (the output of block 15)" in first
    lines = msg.splitlines()
    assert 3 <= len([ln for ln in lines if not ln.startswith("  ")]) <= 5  # the summary before the detail
    assert len([ln for ln in lines if ln.startswith("  ")]) <= 21
    assert any(ln.startswith("rows whose generation changed: exit 8: 0/8, exit 15:") for ln in lines)


# -- across depth: relative exits (issue #13) ------------------------------------------------------


def test_a_relative_exit_baseline_gates_a_model_of_another_depth(tiny_setup, tmp_path):
    """A baseline made with --exit-layers 25%,50%,75%,100% on an 8-block model gates a copy cut to
    7 blocks: compared, not refused — exits matched by relative position, curves on normalised depth."""
    import transformers
    from tiny_models import TinyTokenizer, truncated_copy

    from layerwise.baseline import identity_mismatch, judge

    _, cfg, _, _ = tiny_setup
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    deep = transformers.AutoModelForCausalLM.from_config(c).eval()
    shallow = truncated_copy(deep, 7)
    rel = dict(exit_layers=["25%", "50%", "75%", "100%"])
    base_res = evaluate(dataclasses_replace(cfg(), **rel), bundle=bundle_from_model(deep, TinyTokenizer(), name="deep"))
    assert base_res["run"]["exit_layers"] == [2, 4, 6, 8] and base_res["run"]["exit_spec"] == ["25%", "50%", "75%", "100%"]
    baseline = as_saved(make_baseline(base_res))
    res = evaluate(dataclasses_replace(cfg(), **rel), bundle=bundle_from_model(shallow, TinyTokenizer(), name="shallow"))
    assert res["run"]["exit_layers"] == [2, 4, 6, 7]
    assert identity_mismatch(baseline, res) is None
    v = judge(baseline, res, name="deep.json")
    print("\n" + v.message())
    assert v.matched_exits == [["25%", 2], ["50%", 4], ["75%", 6], ["100%", 7]]
    assert "relative exits, baseline 8 blocks, this model 7" in v.line()
    assert any("depth" in (d.where or "") for d in v.deviations)  # curves compared on normalised depth
    # an absolute-exit baseline is refused for another depth, and says why
    absolute = as_saved(make_baseline(evaluate(cfg(), bundle=bundle_from_model(deep, TinyTokenizer(), name="deep"))))
    res_abs = evaluate(dataclasses_replace(cfg(), exit_layers=[1, 2, 3, 4]), bundle=bundle_from_model(shallow, TinyTokenizer()))
    assert "num_layers: baseline 8 vs run 7" in identity_mismatch(absolute, res_abs)


def dataclasses_replace(cfg: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# -- drift: both models in one run locate the change exactly (issue #13) ---------------------------


@pytest.mark.parametrize("block", [1, 3])
def test_drift_locates_a_changed_block_exactly_and_gates(tiny_setup, block):
    """With the reference in the same run, KL(reference ‖ candidate) is exactly 0 below the changed
    block: the first divergent layer is the block's; --max-drift-kl turns it into a gate."""
    from layerwise.checks import drift_limit
    from layerwise.drift import layer_drift

    bundle, cfg, _, _ = tiny_setup
    ref = bundle_from_model(copy.deepcopy(bundle.model), bundle.tokenizer, name="reference")
    prompt_ids = [bundle.tokenizer.encode(r["instruction"]) for r in TINY_ROWS]
    ref_ids = [bundle.tokenizer.encode(r["output"], add_special_tokens=False) for r in TINY_ROWS]
    with mlp_noise(bundle, block):
        drift = layer_drift(ref, bundle, prompt_ids, ref_ids)
    assert drift["first_divergent"] == block
    assert all(v == 0.0 for v in drift["kl_mean"][:block]) and drift["kl_mean"][block] > 0
    res = {"lens": {"drift": dict(drift, against="reference")}}
    assert drift_limit(res, None).ok  # recorded, not gated
    failed = drift_limit(res, 1e-6)
    assert not failed.ok and failed.message.startswith(f"departs from reference first at layer {block} (the output of block {block})")
    assert drift_limit(res, 1e6).ok
    assert layer_drift(ref, bundle, prompt_ids, ref_ids)["first_divergent"] is None  # restored: identical


@pytest.mark.slow
def test_a_relative_baseline_of_the_default_model_gates_it_with_its_last_block_removed(default_bundle):
    """Must-show of issue #13: a relative-exit baseline of SmolLM2-135M (30 blocks) gating a copy
    with its last block removed (29 blocks): compared, exits matched by relative position."""
    from tiny_models import truncated_copy

    from layerwise.baseline import judge

    rel = dict(exit_layers=["25%", "50%", "75%", "100%"])
    base_res = evaluate(gate_config(**rel), bundle=default_bundle)
    baseline = as_saved(make_baseline(base_res))
    cut = bundle_from_model(truncated_copy(default_bundle.model, 29), default_bundle.tokenizer, name="SmolLM2-135M, 29 blocks")
    res = evaluate(gate_config(**rel), bundle=cut)
    v = judge(baseline, res, name="smollm2-135m-relative.json")
    print("\n" + v.message("reports/results.json"))
    assert base_res["run"]["exit_layers"] == [8, 15, 23, 30] and res["run"]["exit_layers"] == [8, 15, 22, 29]
    assert v.gated and v.matched_exits == [["25%", 8], ["50%", 15], ["75%", 22], ["100%", 29]]
    assert "relative exits, baseline 30 blocks, this model 29" in v.line()
