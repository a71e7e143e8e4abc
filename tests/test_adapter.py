"""``--adapter``: a PEFT (LoRA) adapter on top of the model — what an upgrade often really is.

A LoRA is made here on the default model (B initialised non-zero, so it changes the model), saved,
and loaded back through ``load_model(..., adapter=...)``: the lens at L must be the adapted
model's own logits, the numbers must move, the run's identity must name the adapter and its
hash, and a baseline of the base model must gate the adapted one.
"""

from __future__ import annotations

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from layerwise.baseline import judge, make_baseline  # noqa: E402
from layerwise.config import Decoding, RunConfig  # noqa: E402
from layerwise.errors import ModelLoadError  # noqa: E402
from layerwise.models import load_model  # noqa: E402
from layerwise.runner import evaluate  # noqa: E402

CFG = dict(limit=4, decoding=Decoding(max_new_tokens=8), teacher_forced_tokens=8, bertscore_model=None)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    base = load_model("smollm2-135m").model
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)  # a real but modest change
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapted(lora_dir):
    return load_model("smollm2-135m", adapter=str(lora_dir))


def test_adapted_lens_at_L_is_the_adapted_models_logits(adapted, default_bundle):
    ids = adapted.tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.inference_mode():
        out = adapted.model(input_ids=ids).logits[0]
        base_out = default_bundle.model(input_ids=ids).logits[0]
        h = adapted.adapter.decoder(input_ids=ids).last_hidden_state
        lens_L = adapted.adapter.unembed(h, norm=False)[0]
    assert (out - lens_L).abs().max().item() < 1e-4
    assert (out - base_out).abs().max().item() > 1e-2  # the adapter is in the forward
    assert any("lora" in n for n, _ in adapted.model.named_modules())


def test_identity_records_the_adapter_and_its_hash(adapted, lora_dir):
    a = adapted.info["adapter"]
    assert a["name"] == lora_dir.name and a["peft_type"] == "LORA" and a["r"] == 4
    assert a["target_modules"] == ["q_proj", "v_proj"] and len(a["sha256"]) == 64
    again = load_model("smollm2-135m", adapter=str(lora_dir)).info["adapter"]["sha256"]
    assert again == a["sha256"]


def test_a_base_model_baseline_gates_the_adapted_model(adapted, default_bundle):
    base_res = evaluate(RunConfig(**CFG), bundle=default_bundle)
    res = evaluate(RunConfig(**CFG), bundle=adapted)
    assert res["run"]["model"]["adapter"]["sha256"] == adapted.info["adapter"]["sha256"]
    assert res["lens"]["teacher_forced"]["entropy"]["mean"] != base_res["lens"]["teacher_forced"]["entropy"]["mean"]
    baseline = make_baseline(base_res)
    v = judge(baseline, res, name="base.json")
    print("adapter run:", res["run"]["model"]["adapter"], "→", v.line(), *v.warnings, sep="\n  ")
    assert v.status == "failed" and v.deviations  # compared, not refused: the model is not part of the identity
    assert any("adapter differs from the baseline's" in w for w in v.warnings)
    assert judge(baseline, base_res, name="base.json").status == "passed"


def test_adapter_errors_are_one_line(tmp_path, default_bundle):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no adapter_config.json"):
        load_model("smollm2-135m", adapter=str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="adapter path ./no-such-lora does not exist"):
        load_model("smollm2-135m", adapter="./no-such-lora")
    # a LoRA for another architecture (module names that this model lacks)
    other = tmp_path / "other"
    import transformers

    tiny = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    peft.get_peft_model(tiny, peft.LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(other)
    with pytest.raises(ModelLoadError) as e:
        load_model("smollm2-135m", adapter=str(other))
    assert "cannot apply adapter" in str(e.value) and "\n" not in str(e.value)
