"""Per-layer (logit lens) properties of the model under test.

Layer k is the output of block k (0 = embeddings); the final norm is applied to every layer
before the unembedding, and layer L is the model's own output. Thresholds are options
(`pytest --help`, section layerwise); their defaults and how they were chosen: README.md here.
The trends read the logit lens unless `--trend-lens tuned` (with `--lens logit,tuned:PATH`).
"""

from layerwise import checks


def test_entropy_falls_with_depth(layerwise_check, layerwise_results, layerwise_settings):
    layerwise_check(checks.entropy_trend(layerwise_results, layerwise_settings["entropy-trend-max"],
                                         layerwise_settings["final-entropy-max"], layerwise_settings["trend-lens"]))


def test_kl_to_final_falls_with_depth_and_is_zero_at_L(layerwise_check, layerwise_results, layerwise_settings):
    layerwise_check(checks.kl_trend(layerwise_results, layerwise_settings["kl-trend-max"], layerwise_settings["trend-lens"]))


def test_top1_agreement_with_final_rises_with_depth(layerwise_check, layerwise_results, layerwise_settings):
    layerwise_check(checks.agreement_trend(layerwise_results, layerwise_settings["agreement-trend-min"],
                                           layerwise_settings["trend-lens"]))
