"""Property tests: the lens gives valid distributions at every layer on random prompts."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_lens_distributions_are_valid(layerwise_model, data):
    import torch

    from layerwise.lens import run_lens

    V = layerwise_model.info["vocab_size"]
    length = data.draw(st.integers(min_value=2, max_value=12), label="length")
    ids = data.draw(st.lists(st.integers(min_value=0, max_value=V - 1), min_size=length, max_size=length), label="ids")
    rec = run_lens(layerwise_model, torch.tensor([ids]), top_k=5)[0]
    L = layerwise_model.num_layers
    for k in range(L + 1):
        for t in range(length):
            h = rec.stats["entropy"][k][t]
            kl = rec.stats["kl_to_final"][k][t]
            assert -1e-4 <= h <= math.log(V) + 1e-3, f"layer {k} position {t}: entropy {h} outside [0, ln V]"
            assert kl >= -1e-3, f"layer {k} position {t}: KL {kl} < 0"
            probs = [p for _, p in rec.topk[k][t]]
            assert all(a >= b - 1e-7 for a, b in zip(probs, probs[1:])), f"layer {k}: top-k not descending"
            assert sum(probs) <= 1 + 1e-4, f"layer {k} position {t}: top-5 probabilities sum to {sum(probs)}"
    assert all(v == 0.0 for v in rec.stats["kl_to_final"][L]), "KL at layer L must be exactly 0"
