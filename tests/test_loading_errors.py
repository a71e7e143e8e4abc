"""Every way a model spec or an option can be wrong ends in one LayerwiseError subclass with a
one-line message: what is wrong, then (after " — ") how to fix it. No network is touched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerwise.decoding import Decoding, validate_exits
from layerwise.errors import ConfigError, LayerwiseError, ModelLoadError, UnsupportedArchitectureError
from layerwise.models import load_model, resolve_spec


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; the GGUF cache is a fresh temporary folder."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "lw-cache"))
    yield
    assert not attempts, f"a network connection was attempted: {attempts}"


def check(exc_info, cls, *words: str, not_words: tuple[str, ...] = ()) -> str:
    err = exc_info.value
    assert isinstance(err, cls) and isinstance(err, LayerwiseError)
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, f"message spans lines: {msg!r}"
    assert err.problem and err.fix, "the message names both the problem and the fix"
    assert msg == f"{err.problem} — {err.fix}"
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    for w in not_words:
        assert w.lower() not in msg.lower(), f"{w!r} in {msg!r}"
    return msg


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)


def real_gguf() -> Path:
    src = resolve_spec("smollm2-135m")
    return Path(src.location) / str(src.gguf_file)


def assert_cache_clean(tmp_path: Path) -> None:
    root = tmp_path / "lw-cache"
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert left == [], f"a failed conversion left {left} in the cache"


# ----------------------------------------------------------------------------------------------
# The spec itself


@pytest.mark.parametrize("spec", ["/nonexistent/model-dir", "./no-such-model", "~/no-such-model-xyz", "missing.gguf"])
def test_missing_path(spec):
    with pytest.raises(ModelLoadError) as e:
        resolve_spec(spec)
    check(e, ModelLoadError, spec, "does not exist", "check the path")
    with pytest.raises(ModelLoadError):
        load_model(spec)


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec(spec):
    with pytest.raises(ConfigError) as e:
        load_model(spec)
    check(e, ConfigError, "empty model spec", "--model")


def test_hub_ids_resolve_without_touching_anything():
    for spec in ("HuggingFaceTB/SmolLM2-135M", "gpt2"):
        src = resolve_spec(spec)
        assert (src.kind, src.location, src.name) == ("hub", spec, spec)


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket
    attempts = []
    def refuse(*a, **k):
        attempts.append(repr(a)[:200])
        raise OSError("network access in a test")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    from layerwise.errors import LayerwiseError
    from layerwise.models import load_model
    try:
        load_model("layerwise-test-org/no-such-model")
        out = {"error": None}
    except LayerwiseError as e:
        out = {"error": type(e).__name__, "msg": str(e)}
    except Exception as e:
        out = {"error": "RAW " + type(e).__name__, "msg": str(e)}
    out["attempts"] = attempts
    print("RESULT " + json.dumps(out))
    """
)


def test_hub_id_while_offline(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, so this runs in a fresh process
    with the environment a user would have; sockets refuse to connect there too."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), LAYERWISE_CACHE=str(tmp_path / "lw"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert out["attempts"] == [], "a network connection was attempted while HF_HUB_OFFLINE=1"
    assert out["error"] == "ModelLoadError", out
    msg = out["msg"]
    assert "\n" not in msg
    for w in ("layerwise-test-org/no-such-model", "not in the local Hugging Face cache", "HF_HUB_OFFLINE", " — "):
        assert w in msg, msg


# ----------------------------------------------------------------------------------------------
# Folders and files that are not models


def test_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "empty"))
    check(e, ModelLoadError, str(tmp_path / "empty"), "holds no model", "no config.json", "save_pretrained")


def test_folder_with_several_gguf_files(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.gguf").write_bytes(b"x")
    (d / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as e:
        resolve_spec(str(d))
    check(e, ModelLoadError, "several .gguf files", "one .gguf file")


def test_a_text_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a model")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(f))
    check(e, ModelLoadError, str(f), "not a .gguf file", "config.json")


def test_a_gguf_of_garbage_bytes(tmp_path):
    f = tmp_path / "garbage.gguf"
    f.write_bytes(os.urandom(8192))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(f))
    check(e, ModelLoadError, str(f), "cannot read gguf file", "download it again")
    assert_cache_clean(tmp_path)


def test_a_truncated_gguf(tmp_path):
    f = tmp_path / "truncated.gguf"
    with open(real_gguf(), "rb") as fh:
        f.write_bytes(fh.read(1 << 20))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(f))
    check(e, ModelLoadError, str(f), "cannot read gguf file", "truncated")
    assert_cache_clean(tmp_path)


@pytest.mark.parametrize("kind", ["t5", "vit"])
def test_a_model_that_is_not_a_causal_lm(tmp_path, kind):
    import transformers as tf

    cfg = {"t5": tf.T5Config, "vit": tf.ViTConfig}[kind]()
    cfg.save_pretrained(tmp_path / kind)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / kind))
    check(e, ModelLoadError, "not a causal language model", repr(kind), "decoder-only")


def tiny_tokenizer_into(folder: Path) -> None:
    """A word-level tokenizer of 32 ids, written offline next to a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, 32)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)


def test_bert_config(tmp_path):
    """transformers registers BERT as a causal LM (BertLMHeadModel); as an encoder (is_decoder
    False) its attention sees later tokens, and the load proof refuses it in one line naming
    'bert' and why."""
    import torch
    from transformers import BertConfig, BertLMHeadModel

    d = tmp_path / "bert"
    torch.manual_seed(0)
    BertLMHeadModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(d)
    tiny_tokenizer_into(d)
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(str(d))
    check(e, UnsupportedArchitectureError, "'bert'", "not causal", "is_decoder=True")


@pytest.mark.parametrize("kind", ["xlnet", "roberta"])
def test_a_family_known_to_be_unprovable_is_refused_before_its_weights(tmp_path, kind):
    import transformers as tf
    from layerwise.families import LENS_REFUSED

    cfg = {"xlnet": lambda: tf.XLNetConfig(vocab_size=32, d_model=8, n_layer=1, n_head=2, d_inner=16),
           "roberta": lambda: tf.RobertaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=16, is_decoder=True)}[kind]()
    cfg.save_pretrained(tmp_path / kind)  # no weights: refused before any are read
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(str(tmp_path / kind))
    check(e, UnsupportedArchitectureError, repr(kind), "not supported", LENS_REFUSED[kind], "docs/architectures.md")


@pytest.mark.parametrize("kind", ["bloom", "falcon"])
def test_a_family_without_a_table_row_loads_by_discovery(tmp_path, kind):
    """Bloom and Falcon have no row in layerwise.archs: their parts are discovered from the model
    and proven at load, and the proof's record says so."""
    import torch
    import transformers as tf
    from layerwise.archs import ARCHITECTURES

    assert kind not in ARCHITECTURES
    cfg = {"bloom": lambda: tf.BloomConfig(vocab_size=32, n_layer=2, hidden_size=8, n_head=2),
           "falcon": lambda: tf.FalconConfig(vocab_size=32, num_hidden_layers=2, hidden_size=8, num_attention_heads=2)}[kind]()
    d = tmp_path / kind
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tiny_tokenizer_into(d)
    b = load_model(str(d))
    proof = b.info["lens_proof"]
    assert proof["parts"] == "discovered" and proof["blocks"] == "transformer.h (2)"
    assert proof["final_norm"] == "transformer.ln_f" and proof["head"] == "lm_head"
    assert proof["max_abs_diff"] <= proof["tolerance"]


def test_a_causal_config_with_corrupt_weights(tmp_path):
    d = tmp_path / "corrupt"
    tiny_llama_config().save_pretrained(d)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d))
    check(e, ModelLoadError, str(d), "cannot load the model", "corrupt")


def test_a_causal_config_without_weights(tmp_path):
    d = tmp_path / "noweights"
    tiny_llama_config().save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d))
    check(e, ModelLoadError, str(d), "model.safetensors", "missing")


def test_a_model_folder_without_a_tokenizer(tmp_path):
    """The weights are fine; the tokenizer is what is missing, and the message must say so
    rather than blame the weights."""
    from transformers import LlamaForCausalLM

    d = tmp_path / "notok"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d))
    check(e, ModelLoadError, str(d), "tokenizer")
    assert "weights" not in e.value.fix, f"the fix blames the weights: {e.value.fix!r}"


@pytest.mark.parametrize("kw, words", [
    ({"dtype": "float8"}, ("unknown dtype 'float8'", "float32")),
    ({"device": "tpu"}, ("unknown device 'tpu'", "cpu")),
])
def test_bad_dtype_or_device(tmp_path, kw, words):
    tiny_llama_config().save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError) as e:
        load_model(str(tmp_path / "m"), **kw)
    check(e, ConfigError, *words)


def test_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    tiny_llama_config().save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError) as e:
        load_model(str(tmp_path / "m"), device="cuda")
    check(e, ConfigError, "'cuda'", "no CUDA GPU", "--device cpu")


# ----------------------------------------------------------------------------------------------
# Exit layers and the token budget


@pytest.mark.parametrize("exits, words", [
    ([0], ("exit layer 0", "outside 1..30", "between 1 and 30")),
    ([-3], ("exit layer -3", "outside 1..30")),
    ([31], ("exit layer 31", "outside 1..30", "30 blocks")),
    ([8, 31], ("exit layer 31", "outside 1..30")),
    ([8, 8], ("exit layer 8", "twice", "once")),
    (["8", " 8 "], ("exit layer 8", "twice")),
    (["a"], ("exit layer 'a'", "not a whole number", "between 1 and 30")),
    ([2.5], ("exit layer 2.5", "not a whole number", "between 1 and 30")),
    ([True], ("exit layer True", "not a whole number")),
    ([None], ("exit layer None", "not a whole number")),
    ([], ("no exit layers", "between 1 and 30")),
])
def test_validate_exits_errors(exits, words):
    with pytest.raises(ConfigError) as e:
        validate_exits(exits, 30)
    check(e, ConfigError, *words)


def test_validate_exits_accepts_and_sorts():
    assert validate_exits([30, "8", 15, " 23 "], 30) == [8, 15, 23, 30]
    assert validate_exits([1], 1) == [1]


@pytest.mark.parametrize("kw, words", [
    ({"max_new_tokens": 0}, ("--max-new-tokens", "0")),
    ({"max_new_tokens": -1}, ("--max-new-tokens", "-1")),
    ({"max_new_tokens": 2.5}, ("--max-new-tokens", "2.5")),
    ({"do_sample": True, "temperature": 0.0}, ("--temperature", "> 0")),
    ({"top_p": 0.0}, ("--top-p", "(0, 1]")),
    ({"top_p": 1.5}, ("--top-p", "1.5")),
    ({"top_k": 0}, ("--top-k", "at least 1")),
    ({"seed": 2**64}, ("--seed", "0..2**64-1")),
])
def test_decoding_validate_errors(kw, words):
    with pytest.raises(ConfigError) as e:
        Decoding(**kw).validate()
    check(e, ConfigError, *words)


def test_decoding_defaults_are_valid():
    Decoding().validate()
    Decoding(max_new_tokens=1, do_sample=True, temperature=0.7, top_k=5, top_p=0.9).validate()


def test_generate_exits_refuses_bad_options_before_running():
    import torch

    import tiny_models
    from layerwise.decoding import generate_exits

    b = tiny_models.tiny_bundle("llama")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ConfigError) as e:
        generate_exits(b, ids, torch.ones_like(ids), [5], Decoding(max_new_tokens=4))
    check(e, ConfigError, "exit layer 5", "outside 1..4")
    with pytest.raises(ConfigError) as e:
        generate_exits(b, ids, torch.ones_like(ids), [2], Decoding(max_new_tokens=0))
    check(e, ConfigError, "--max-new-tokens")
