"""bitsandbytes 4-bit NF4 on CPU, on the default model: it loads, the lens at layer L is the

quantized model's own logits, early exit at L is its own generate, the layer suite runs, its
results differ from float32 (it is a different model), and the drift statistic sees it."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

SMALL = dict(limit=4, teacher_forced_tokens=8, bertscore_model=None)


@pytest.fixture(scope="module")
def q4():
    from layerwise.models import Quantization, load_model

    return load_model("smollm2-135m", quantization=Quantization("4bit", "nf4"))


def test_4bit_loads_and_records_quantization(q4, default_bundle):
    q = q4.info["quantization"]
    assert q == {"method": "bitsandbytes-4bit", "quant_type": "nf4", "compute_dtype": "float32", "double_quant": True}
    assert any("de-quantized" in n for n in q4.info.get("notes", []))
    assert q4.info["weight_bytes"] < 0.5 * default_bundle.info["weight_bytes"]
    # the weights' bytes count bitsandbytes' per-block absmax beside the packed parameters
    from layerwise.models import quant_state_bytes

    packed = sum(p.numel() * p.element_size() for p in q4.model.parameters())
    consts = quant_state_bytes(q4.model)
    blocks = sum(p.numel() * 2 for p in q4.model.parameters() if getattr(p, "quant_state", None) is not None) // 64
    assert blocks <= consts and q4.info["weight_bytes"] == packed + consts  # at least a byte of absmax per block
    assert quant_state_bytes(default_bundle.model) == 0
    assert "Linear4bit" in type(q4.model.model.layers[0].mlp.down_proj).__name__


def test_4bit_lens_at_L_equals_its_logits_and_early_exit_equals_generate(q4):
    from layerwise.decoding import Decoding, generate_exits

    enc = q4.tokenizer(["The capital of France is", "Name three primary colors."], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = q4.model(**enc).logits.float()
        base = q4.adapter.decoder(**enc).last_hidden_state
        lens_l = q4.adapter.unembed(base, norm=False)
    m = enc.attention_mask.bool()
    assert (logits[m] - lens_l[m]).abs().max().item() <= 1e-4
    g = generate_exits(q4, enc.input_ids, enc.attention_mask, [8, 30], Decoding(max_new_tokens=10))
    ref = q4.model.generate(**enc, do_sample=False, max_new_tokens=10)
    for p in range(2):
        got = g.tokens[30][p]
        assert got == ref[p, enc.input_ids.shape[1]:].tolist()[: len(got)]


def test_4bit_results_differ_from_fp32_and_drift_is_measured(q4, default_bundle):
    from layerwise.data import default_prompts_path, format_prompt, load_examples
    from layerwise.decoding import Decoding
    from layerwise.drift import layer_drift
    from layerwise.runner import RunConfig, evaluate

    cfg = dict(SMALL, decoding=Decoding(max_new_tokens=12))
    r32 = evaluate(RunConfig(**cfg), bundle=default_bundle)
    r4 = evaluate(RunConfig(**cfg), bundle=q4)
    e32 = r32["lens"]["teacher_forced"]["entropy"]["mean"]
    e4 = r4["lens"]["teacher_forced"]["entropy"]["mean"]
    assert max(abs(a - b) for a, b in zip(e32, e4)) > 1e-3, "4-bit lens identical to float32: quantization did nothing"
    ex = load_examples(default_prompts_path(), 4)
    tok = default_bundle.tokenizer
    prompts = [tok.encode(format_prompt(e, "alpaca", tok)) for e in ex]
    refs = [tok.encode(e.reference, add_special_tokens=False)[:8] for e in ex]
    d = layer_drift(default_bundle, q4, prompts, refs)
    kl = d["kl_mean"]
    print("per-layer KL(fp32 ‖ nf4):", json.dumps([round(x, 3) for x in kl]))
    assert len(kl) == 31 and all(x >= -1e-4 for x in kl)
    assert kl[-1] > 1e-3, "the quantized model's output must drift from float32"
    # the same model against itself does not drift
    same = layer_drift(default_bundle, default_bundle, prompts, refs)
    assert max(abs(x) for x in same["kl_mean"]) <= 1e-5
    assert all(a == 1.0 for a in same["top1_agree"])


def test_layer_suite_runs_on_4bit(pytester, request):
    root = request.config.rootpath
    res = pytester.runpytest_subprocess(
        str(root / "layer_tests" / "test_lens.py"), str(root / "layer_tests" / "test_consistency.py"),
        "--load-in-4bit", "--limit", "6", "--max-new-tokens", "8", "--bertscore-model", "none",
        "--results-json", str(pytester.path / "r.json"), "--report", str(pytester.path / "r.html"), "-p", "no:cacheprovider",
    )
    res.assert_outcomes(passed=5)
    data = json.loads((pytester.path / "r.json").read_text())
    assert data["run"]["model"]["quantization"]["quant_type"] == "nf4"
