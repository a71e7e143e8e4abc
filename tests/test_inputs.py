"""Inputs that are handled rather than refused, and the one that is refused rather than cut."""

import json

import pytest

from layerwise.errors import ConfigError

torch = pytest.importorskip("torch")

from tiny_models import TinyTokenizer, tiny_bundle, tiny_model  # noqa: E402


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_prompt_longer_than_the_context_is_refused_naming_the_row(tmp_path):
    from layerwise.decoding import Decoding
    from layerwise.runner import RunConfig, evaluate

    bundle = tiny_bundle("llama")  # 256 positions; the tiny tokenizer gives one token per character
    f = _rows(tmp_path / "p.jsonl", [{"prompt": "short", "reference": "ok"},
                                     {"prompt": "x" * 300, "reference": "too long"}])
    cfg = RunConfig(prompts=str(f), prompt_format="raw", bertscore_model=None, decoding=Decoding(max_new_tokens=4))
    with pytest.raises(ConfigError) as e:
        evaluate(cfg, bundle=bundle)
    msg = str(e.value)
    assert "row 1 of" in msg and "exceeds the model's context of 256 tokens" in msg and "refuses" in msg
    assert "\n" not in msg


def test_a_tokenizer_without_a_pad_token_is_handled():
    from layerwise.decoding import Decoding, generate_exits
    from layerwise.models import bundle_from_model

    tok = TinyTokenizer()
    tok.pad_token_id = None
    tok.pad_token = None
    model = tiny_model("llama")
    saved = model.generation_config.pad_token_id
    model.generation_config.pad_token_id = None
    try:
        bundle = bundle_from_model(model, tok)
        assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
        ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
        ids[0, :2] = tok.pad_token_id if tok.pad_token_id is not None else 2
        mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        g = generate_exits(bundle, ids, mask, [2, 4], Decoding(max_new_tokens=3))
        assert all(len(t) >= 1 for t in g.tokens[4])
    finally:
        model.generation_config.pad_token_id = saved
