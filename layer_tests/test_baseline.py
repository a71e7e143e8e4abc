"""The regression gate: every tracked number within tolerance of the saved baseline."""

import pytest

from layerwise.baseline import compare, identity_mismatch


def test_matches_baseline(layerwise, layerwise_results):
    if layerwise.opts["update-baseline"]:
        pytest.skip(f"writing a new baseline to {layerwise.baseline_path}")
    base = layerwise.baseline()
    if base is None:
        pytest.skip(f"no baseline for {layerwise.opts['model']}: create one with --update-baseline --baseline PATH")
    why = identity_mismatch(base, layerwise_results)
    if why:
        if layerwise.baseline_implicit:
            pytest.skip(f"shipped baseline not comparable with this run's options: {why}")
        pytest.fail(f"baseline {layerwise.baseline_path} refused, not compared: {why}", pytrace=False)
    deviations = compare(base, layerwise_results, layerwise.tolerances)
    assert not deviations, f"{len(deviations)} numbers outside tolerance of baseline {layerwise.baseline_path}:\n" + "\n".join(map(str, deviations))
