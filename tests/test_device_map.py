"""accelerate device maps without a GPU: some blocks offloaded to disk must not change the lens
or the early-exit tokens (the adapter finds norm and head wherever accelerate put them, and the
gated blocks keep accelerate's hooks)."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def offloaded():
    from layerwise.models import load_model

    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for i in range(30):
        dm[f"model.layers.{i}"] = "disk" if i in (3, 17, 29) else "cpu"
    return load_model("smollm2-135m", device_map=dm)


def test_offloaded_model_reports_its_map(offloaded):
    assert offloaded.info["device"].startswith("device_map")
    assert "disk" in set(offloaded.model.hf_device_map.values())
    assert offloaded.device.type == "cpu"


def test_lens_and_early_exit_equal_the_unmapped_model(offloaded, default_bundle):
    from layerwise.decoding import Decoding, generate_exits
    from layerwise.lens import run_lens

    enc = default_bundle.tokenizer(["The capital of France is", "Name three primary colors."], return_tensors="pt", padding=True)
    ra = run_lens(default_bundle, enc.input_ids[:1], top_k=2)[0]
    rb = run_lens(offloaded, enc.input_ids[:1], top_k=2)[0]
    for name in ("entropy", "kl_to_final", "xent"):
        diff = max(abs(x - y) for la, lb in zip(ra.stats[name], rb.stats[name]) for x, y in zip(la, lb)
                   if x == x and y == y)
        assert diff <= 1e-5, f"{name} differs by {diff} with blocks 3, 17, 29 offloaded to disk"
    exits = [4, 17, 30]  # an exit right at an offloaded block, and the last (offloaded) block
    ga = generate_exits(default_bundle, enc.input_ids, enc.attention_mask, exits, Decoding(max_new_tokens=8))
    gb = generate_exits(offloaded, enc.input_ids, enc.attention_mask, exits, Decoding(max_new_tokens=8))
    assert ga.tokens == gb.tokens
