"""Example: your own layer-level tests with pytest-layerwise's fixtures.

    pytest examples/test_my_model.py --model smollm2-135m
    pytest examples/test_my_model.py --model meta-llama/Llama-2-7b-hf --load-in-4bit --exit-layers 8,16,24,32

The model loads once per session; every fixture reads the same results.
"""


def test_the_last_quarter_of_blocks_adds_rouge(exit_metrics):
    final = max(exit_metrics)
    three_quarters = sorted(exit_metrics)[-2]
    assert exit_metrics[final]["rougeL"] > exit_metrics[three_quarters]["rougeL"], (
        f"exit {three_quarters}: {exit_metrics[three_quarters]['rougeL']:.3f}, exit {final}: {exit_metrics[final]['rougeL']:.3f}")


def test_final_layer_is_confident_on_the_references(layer_lens, layerwise_model):
    import math

    xent = layer_lens["teacher_forced"]["xent"]["mean"]
    L = layerwise_model.num_layers
    assert xent[L] < 0.5 * math.log(layerwise_model.info["vocab_size"]), f"cross-entropy at layer {L}: {xent[L]:.2f} nats"


def test_no_exit_layer_emits_only_empty_text(early_exit_generations):
    for layer, texts in early_exit_generations.items():
        assert any(t.strip() for t in texts), f"exit layer {layer} generated nothing for every row"


def test_last_block_changes_the_prediction_less_than_the_first(layer_lens):
    kl = layer_lens["teacher_forced"]["kl_to_final"]["mean"]
    assert kl[-2] < kl[1], f"KL to final after the second-last block {kl[-2]:.2f} vs after block 1 {kl[1]:.2f}"
