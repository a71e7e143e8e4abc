"""Layer drift against a reference model (``--drift-against``, e.g. the fp32 original of a quantized
model or the revision you upgrade from): gated by ``--max-drift-kl``; skipped without a reference."""

import pytest

from layerwise import checks


def test_drift_against_the_reference_within_limit(layerwise_check, layerwise_results, layerwise_settings):
    if "drift" not in layerwise_results["lens"]:
        pytest.skip("no reference model: pass --drift-against SPEC (and --max-drift-kl X to gate it)")
    layerwise_check(checks.drift_limit(layerwise_results, layerwise_settings["max-drift-kl"]))
