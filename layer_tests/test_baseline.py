"""The regression gate: every tracked number within tolerance of the saved baseline.

Not gated (no baseline for this model, a refused one, or one being written) is a skip with the
reason — or a failure under --require-baseline. The verdict also ends the terminal summary.
"""


def test_matches_baseline(layerwise, layerwise_results):
    layerwise.check_gate()
