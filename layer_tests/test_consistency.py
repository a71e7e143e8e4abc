"""The lens and early exit agree with the model itself at layer L (no double norm, no off-by-one)."""

import pytest

PROMPTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName three primary colors.\n\n### Response:\n",
    "The capital of France is",
]


@pytest.fixture(scope="module")
def encoded(layerwise_model):
    tok = layerwise_model.tokenizer
    return tok(PROMPTS, return_tensors="pt", padding=True)


def test_lens_at_final_layer_equals_model_logits(layerwise_model, encoded):
    import torch

    from layerwise.compat import position_ids_from_mask

    model, adapter = layerwise_model.model, layerwise_model.adapter
    dev = layerwise_model.device
    ids, mask = encoded.input_ids.to(dev), encoded.attention_mask.to(dev)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        base = adapter.decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        lens_logits = adapter.unembed(base.last_hidden_state, norm=False)
    want = out.logits.float()[mask.bool()]
    got = lens_logits[mask.bool()]
    diff = (want - got).abs().max().item()
    # float32: rounding only; half precision / quantized: the head runs in lower precision
    tol = 1e-4 if layerwise_model.info.get("dtype") == "float32" and not layerwise_model.info.get("quantization") else 1e-2 * want.abs().max().item()
    assert diff <= tol, f"layer-L lens differs from the model's logits by {diff:.3g} (allowed {tol:.3g})"


def test_early_exit_at_final_layer_equals_generate(layerwise_model, encoded):
    from layerwise.decoding import Decoding, generate_exits

    model = layerwise_model.model
    L = layerwise_model.num_layers
    dev = layerwise_model.device
    ids, mask = encoded.input_ids.to(dev), encoded.attention_mask.to(dev)
    n = 16
    ours = generate_exits(layerwise_model, ids, mask, [L], Decoding(max_new_tokens=n))
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n)
    for p in range(len(PROMPTS)):
        got = ours.tokens[L][p]
        want = ref[p, ids.shape[1]:].tolist()[: len(got)]
        assert got == want, f"prompt {p}: early exit at layer {L} gave {got}, generate gave {want}"
