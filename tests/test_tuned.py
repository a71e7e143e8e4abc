"""The tuned lens: translators, training, files, model identity, the tuned-lens package's layout,
and ``layerwise train-lens``. Numbers are checked against independent computations (a plain
HF forward with ``output_hidden_states``, float64 softmax/KL by hand, tuned-lens's own formula
``h + Linear(h)`` applied through a ``torch.nn.ModuleList``)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from layerwise.cli import main
from layerwise.errors import ConfigError, TunedLensError
from layerwise.tuned import CONFIG_FILE, WEIGHTS_FILE, TunedLens, compare_lenses, model_identity
from layerwise.tuned_train import (
    fit_tuned_lens,
    hidden_states_at,
    kl_from_logits,
    lens_loss,
    teacher_forced_states,
    train_tuned_lens,
    training_sequences,
    unique_positions,
)
from tiny_models import random_lens, tiny_bundle

TRAIN_TEXTS = [f"item {i}: the {w} fox jumps over {i * 7} dogs" for i, w in
               enumerate(["quick", "slow", "red", "old", "young", "grey", "small", "big", "sly", "calm",
                          "wild", "lazy", "bold", "shy", "tall", "odd"])]
HELD_TEXTS = [f"case {i}: a {w} cat sleeps under {i * 3} chairs" for i, w in
              enumerate(["fat", "thin", "black", "white", "tiny", "huge"])]


def _seqs(bundle, texts, new_tokens=12):
    return training_sequences(bundle, texts, ["and then it rests."] * len(texts), max_new_tokens=new_tokens)


def _held_out(bundle):
    tok = bundle.tokenizer
    return teacher_forced_states(bundle, [tok.encode(t) for t in HELD_TEXTS],
                                 [tok.encode(" and so on, all day.", add_special_tokens=False)] * len(HELD_TEXTS))



@pytest.fixture(scope="module")
def llama():
    return tiny_bundle("llama")


@pytest.fixture(scope="module")
def trained(llama):
    """A lens trained briefly on the tiny Llama (shared by the file tests)."""
    return train_tuned_lens(llama, _seqs(llama, TRAIN_TEXTS), steps=40, seed=3, positions_per_step=16)


# --------------------------------------------------------------------------- applying it

def test_hidden_states_match_a_plain_forward(llama):
    """Right-padded batched capture = HF hidden_states of each sequence run alone."""
    tok = llama.tokenizer
    seqs = [tok.encode(t) for t in ("short", "a much longer sequence here", "mid length")]
    pos = [[0, 3], list(range(len(seqs[1]))), [2]]
    h = hidden_states_at(llama, seqs, pos, batch_size=3)
    L = llama.num_layers
    assert h.shape == (L + 1, sum(map(len, pos)), 32)
    at = 0
    for s, p in zip(seqs, pos):
        with torch.no_grad():
            out = llama.model(torch.tensor([s]), output_hidden_states=True)
        for k in range(L + 1):  # HF: hidden_states[k] = layer k for k < L; the last one is normed = layer L
            torch.testing.assert_close(h[k, at:at + len(p)], out.hidden_states[k][0, p], rtol=1e-5, atol=1e-5)
        at += len(p)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_untrained_lens_is_exactly_the_logit_lens(family):
    bundle = tiny_bundle(family)
    hidden, targets = _held_out(bundle)
    lens = TunedLens(bundle.num_layers, hidden[0].shape[-1])
    for k, h in hidden.items():
        assert torch.equal(lens.translate(h, k), h)
        assert torch.equal(lens.logits(bundle.adapter, h, k), bundle.adapter.unembed(h, norm=k < bundle.num_layers))
    both = compare_lenses(bundle.adapter, lens, hidden, targets)
    for name in ("entropy", "kl_to_final", "top1_agree", "final_top1_rank", "xent"):
        assert torch.equal(getattr(both["logit"], name), getattr(both["tuned"], name)), name


def test_layer_L_of_the_tuned_lens_is_the_models_output(llama):
    lens = random_lens(llama, scale=0.05, frozen=False)
    ids = torch.tensor([llama.tokenizer.encode("the final layer")])
    h = hidden_states_at(llama, ids.tolist(), [list(range(ids.shape[1]))])
    with torch.no_grad():
        ref = llama.model(ids).logits[0]
    torch.testing.assert_close(lens.logits(llama.adapter, h[llama.num_layers], llama.num_layers), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tuned_statistics_against_a_hand_computation(family):
    """KL to the final layer and cross-entropy of the tuned lens, from the definition in float64."""
    bundle = tiny_bundle(family)
    hidden, targets = _held_out(bundle)
    lens = random_lens(bundle, seed=1, scale=0.05, frozen=False)
    st = compare_lenses(bundle.adapter, lens, hidden, targets)["tuned"]
    model, L = bundle.model, bundle.num_layers
    norm, head = bundle.adapter.final_norm, model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logp(x):
        z = head(x).double()
        if cap:
            z = torch.tanh(z / cap) * cap
        return torch.log_softmax(z, -1)

    with torch.no_grad():
        ref_final = logp(hidden[L])
        for k in (0, 2, L - 1):
            t = hidden[k] + hidden[k] @ lens.weight[k].T + lens.bias[k]
            lp = logp(norm(t))
            kl = (ref_final.exp() * (ref_final - lp)).sum(-1)
            torch.testing.assert_close(st.kl_to_final[k], kl.float(), rtol=1e-4, atol=1e-4)
            xent = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(st.xent[k], xent.float(), rtol=1e-4, atol=1e-4)


def test_kl_from_logits_matches_autograd_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(torch.randn(4, 11, generator=g, dtype=torch.float64), -1)
    p = logp.exp()
    neg_ent = (p * logp).sum(-1)
    ours = kl_from_logits(z, p, neg_ent)
    ref = (p * (logp - torch.log_softmax(z, -1))).sum(-1)
    torch.testing.assert_close(ours, ref)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    (gz,) = torch.autograd.grad((ours * w).sum(), z)
    (gr,) = torch.autograd.grad((ref * w).sum(), z)
    torch.testing.assert_close(gz, gr)


def test_training_loss_is_the_lens_kl(llama):
    """The loss the translators are trained on equals the lens's kl_to_final at those positions."""
    hidden, _ = _held_out(llama)
    L = llama.num_layers
    stacked = torch.stack([hidden[k] for k in range(L + 1)])
    lens = random_lens(llama, seed=2, scale=0.05, frozen=False)
    loss = lens_loss(llama.adapter, lens, stacked, backward=False, rows_per_matmul=7)  # several groups
    st = compare_lenses(llama.adapter, lens, hidden)["tuned"]
    torch.testing.assert_close(loss, st.kl_to_final[:L].mean(1), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- training

def test_unique_positions_keeps_each_prefix_once():
    assert unique_positions([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [7]]) == [[0, 1, 2], [2], [3], [0]]


def test_training_sequences_are_prompt_reference_and_own_greedy_continuation(llama):
    tok = llama.tokenizer
    texts = TRAIN_TEXTS[:3]
    seqs = _seqs(llama, texts, new_tokens=5)
    prompts = [tok.encode(t) for t in texts]
    ref = tok.encode("and then it rests.", add_special_tokens=False)
    assert seqs[:3] == [p + ref for p in prompts]
    gens = seqs[3:]
    assert len(gens) == 3
    for p, s in zip(prompts, gens):  # the batched (left-padded) continuation = the row alone
        with torch.no_grad():
            alone = llama.model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        expect = alone[0].tolist()
        cut = next((i for i in range(len(p), len(expect)) if expect[i] == 2), len(expect))
        assert s == expect[:cut]


def test_training_lowers_held_out_kl_on_every_layer(llama, trained):
    hidden, targets = _held_out(llama)
    both = compare_lenses(llama.adapter, trained, hidden, targets)
    L = llama.num_layers
    logit, tuned = both["logit"].kl_to_final[:L].mean(1), both["tuned"].kl_to_final[:L].mean(1)
    assert (tuned < logit).all(), (logit, tuned)
    assert tuned.mean() < 0.75 * logit.mean(), (logit, tuned)
    info = trained.training_info
    assert info["steps"] == 40 and info["positions_per_step"] == 16 and info["seed"] == 3
    assert sum(info["kl_last_steps"]) < sum(info["kl_first_step"])


def test_same_seed_gives_byte_identical_weights(llama, trained, tmp_path):
    again = train_tuned_lens(llama, _seqs(llama, TRAIN_TEXTS), steps=40, seed=3, positions_per_step=16)
    other = train_tuned_lens(llama, _seqs(llama, TRAIN_TEXTS), steps=40, seed=4, positions_per_step=16)
    trained.save(tmp_path / "a")
    again.save(tmp_path / "b")
    other.save(tmp_path / "c")
    a, b, c = ((tmp_path / x / WEIGHTS_FILE).read_bytes() for x in "abc")
    assert a == b
    assert a != c


def test_training_rejects_bad_settings(llama):
    hidden = torch.zeros(llama.num_layers + 1, 4, 32)
    for kwargs in ({"steps": 0}, {"positions_per_step": 0}, {"lr": -1.0}, {"lr": float("nan")}, {"optimizer": "lbfgs"}):
        with pytest.raises(ConfigError):
            fit_tuned_lens(llama.adapter, hidden, **{"steps": 1, **kwargs})
    with pytest.raises(ConfigError, match="no token sequences"):
        train_tuned_lens(llama, [[]], steps=1)
    with pytest.raises(ConfigError, match="training diverged at step"):  # not a NaN lens written to disk
        train_tuned_lens(llama, [llama.tokenizer.encode("some text to train on")], steps=5, lr=1e38)


def test_adam_option_trains_too(llama):
    seqs = _seqs(llama, TRAIN_TEXTS[:6])
    lens = train_tuned_lens(llama, seqs, steps=10, seed=0, optimizer="adam", positions_per_step=16)
    assert lens.weight.abs().sum() > 0 and lens.training_info["optimizer"] == "adam"


# --------------------------------------------------------------------------- files and identity

def test_save_and_load_roundtrip(llama, trained, tmp_path):
    out = trained.save(tmp_path / "lens")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["format"] == "layerwise-tuned-lens" and cfg["num_layers"] == 4 and cfg["hidden_size"] == 32
    assert cfg["model"]["name"] == "tiny-llama" and cfg["model"]["vocab_size"] == 96
    assert cfg["model"]["head_sha256"] and cfg["training"]["steps"] == 40
    assert cfg["weights"]["sha256"] == hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    back = TunedLens.load(out, llama)
    assert torch.equal(back.weight, trained.weight) and torch.equal(back.bias, trained.bias)
    assert not back.weight.requires_grad  # for use: applying it builds no autograd graph
    assert back.model == trained.model
    h = torch.randn(5, 32)
    assert torch.equal(back.logits(llama.adapter, h, 1), trained.logits(llama.adapter, h, 1))


def test_lens_is_refused_for_another_model(trained, tmp_path):
    out = trained.save(tmp_path / "lens")
    for other in (tiny_bundle("llama", seed=1), tiny_bundle("gpt2"), tiny_bundle("mistral")):
        with pytest.raises(TunedLensError, match="was trained for") as err:
            TunedLens.load(out, other)
        assert "\n" not in str(err.value) and "train-lens --model" in str(err.value)


def test_identity_rules():
    from layerwise.tuned import identity_mismatch

    base = {"name": "m", "source": "gguf", "file_sha256": "a" * 64, "revision": None, "model_type": "llama",
            "num_layers": 4, "hidden_size": 32, "vocab_size": 96, "head_sha256": "h"}
    assert identity_mismatch(base, dict(base)) is None
    assert identity_mismatch(base, dict(base, name="other spelling")) is None  # same file under another name
    assert "SHA-256" in identity_mismatch(base, dict(base, file_sha256="b" * 64))
    assert "layers" in identity_mismatch(base, dict(base, num_layers=5))
    assert "vocabulary" in identity_mismatch(base, dict(base, vocab_size=97))
    hub = dict(base, source="hub", file_sha256=None, revision="r1")
    assert identity_mismatch(hub, dict(hub)) is None
    assert "revision" in identity_mismatch(hub, dict(hub, revision="r2"))
    assert "model 'm'" in identity_mismatch(hub, dict(hub, name="org/other"))
    assert "unembedding" in identity_mismatch(hub, dict(hub, head_sha256="x"))
    lora = {"name": "my-lora", "sha256": "c" * 64}
    assert "without an adapter" in identity_mismatch(base, dict(base, adapter=lora))  # base lens, adapted model
    assert "with adapter 'my-lora'" in identity_mismatch(dict(base, adapter=lora), base)
    assert identity_mismatch(dict(base, adapter=lora), dict(base, adapter=dict(lora))) is None


def test_damaged_or_mixed_files_are_refused(trained, tmp_path):
    out = trained.save(tmp_path / "lens")
    (out / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(TunedLensError, match="does not match"):
        TunedLens.load(out)
    with pytest.raises(TunedLensError, match="does not exist"):
        TunedLens.load(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CONFIG_FILE).write_text('{"model_type": "llama"}')
    with pytest.raises(TunedLensError, match="neither"):
        TunedLens.load(tmp_path / "junk")


def test_save_never_overwrites(llama, trained, tmp_path):
    out = trained.save(tmp_path / "lens")
    before = (out / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ConfigError, match="already holds a tuned lens"):
        trained.save(out)
    other = random_lens(llama, scale=0.05, frozen=False)
    other.save(out, replace=True)  # same model: replaced
    assert (out / WEIGHTS_FILE).read_bytes() != before
    foreign = random_lens(tiny_bundle("llama", seed=1), scale=0.05, frozen=False)
    with pytest.raises(ConfigError, match="another folder|trained for"):
        foreign.save(out, replace=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no layerwise tuned lens"):
        trained.save(tmp_path / "notes", replace=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert trained.save(tmp_path / "empty") == tmp_path / "empty"


# --------------------------------------------------------------------------- tuned-lens's layout

def _tuned_lens_hash(w: torch.Tensor) -> str:
    # tuned_lens.utils.tensor_hash(unembedding.weight.float().numpy())
    return hashlib.sha256(str.encode(np.array_str(w.detach().float().numpy(), precision=1))).hexdigest()


def _write_tuned_lens_checkpoint(folder, bundle, *, bias=True, layers=None, unembed_hash=True):
    """A folder as tuned-lens's TunedLens.save writes it: config.json (asdict of TunedLensConfig)
    and params.pt (the state dict of its layer_translators ModuleList of nn.Linear)."""
    L, d = layers or bundle.num_layers, bundle.info["hidden_size"]
    torch.manual_seed(7)
    translators = torch.nn.ModuleList([torch.nn.Linear(d, d, bias=bias) for _ in range(L)])
    with torch.no_grad():
        for t in translators:
            t.weight.mul_(0.1)
    folder.mkdir()
    torch.save(translators.state_dict(), folder / "params.pt")
    config = {"base_model_name_or_path": bundle.info["name"], "d_model": d, "num_hidden_layers": L, "bias": bias,
              "base_model_revision": None,
              "unembed_hash": _tuned_lens_hash(bundle.model.get_output_embeddings().weight) if unembed_hash else None,
              "lens_type": "linear_tuned_lens"}
    (folder / "config.json").write_text(json.dumps(config))
    return translators


@pytest.mark.parametrize("bias", [True, False])
def test_reads_a_tuned_lens_package_checkpoint(llama, tmp_path, bias):
    translators = _write_tuned_lens_checkpoint(tmp_path / "tl", llama, bias=bias)
    lens = TunedLens.load(tmp_path / "tl", llama)
    h = torch.randn(6, 32)
    for k in range(llama.num_layers):  # tuned-lens: transform_hidden(h, k) = h + layer_translators[k](h)
        with torch.no_grad():
            torch.testing.assert_close(lens.translate(h, k), h + translators[k](h))
    assert lens.model["format"] == "tuned-lens"


def test_tuned_lens_checkpoint_for_another_model_is_refused(llama, tmp_path):
    _write_tuned_lens_checkpoint(tmp_path / "tl", llama)
    with pytest.raises(TunedLensError, match="unembed_hash"):
        TunedLens.load(tmp_path / "tl", tiny_bundle("llama", seed=1))
    _write_tuned_lens_checkpoint(tmp_path / "short", llama, layers=3, unembed_hash=False)
    with pytest.raises(TunedLensError, match="3 layers"):
        TunedLens.load(tmp_path / "short", llama)
    (tmp_path / "short" / "params.pt").unlink()
    with pytest.raises(TunedLensError, match="no params.pt"):
        TunedLens.load(tmp_path / "short")


# --------------------------------------------------------------------------- the command

def _one_line_error(capsys, *needles):
    """One error line, last on stderr (progress lines may come before it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("layerwise: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps({"instruction": t, "output": "it rests."}) + "\n" for t in TRAIN_TEXTS[:6]))
    return p


@pytest.fixture
def tiny_loader(monkeypatch):
    """``load_model`` answers with tiny models: "tiny-a" and "tiny-b" (another seed)."""
    import layerwise.models

    calls = []

    def fake(spec, **_kw):
        calls.append(spec)
        return tiny_bundle("llama", seed=0 if spec == "tiny-a" else 1)

    monkeypatch.setattr(layerwise.models, "load_model", fake)
    return calls


def test_train_lens_command_end_to_end(tmp_path, prompts_file, tiny_loader, capsys):
    out = tmp_path / "lens"
    args = ["train-lens", "--model", "tiny-a", "-o", str(out), "--prompts", str(prompts_file), "--prompt-format", "raw",
            "--steps", "3", "--positions-per-step", "8", "--max-new-tokens", "4", "--seed", "1"]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    lens = TunedLens.load(out, tiny_bundle("llama"))
    info = lens.training_info
    assert info["steps"] == 3 and info["seed"] == 1 and info["data"]["first_row"] == 0 and info["data"]["rows"] == 6
    assert info["sequences"] == 12  # 6 × prompt | reference, 6 × prompt | continuation
    first = (out / WEIGHTS_FILE).read_bytes()

    assert main(args) == 2  # a lens is there: not without --force
    _one_line_error(capsys, "already holds a tuned lens", "--force")
    assert main(args + ["--force"]) == 0
    assert (out / WEIGHTS_FILE).read_bytes() == first  # same seed, same bytes
    capsys.readouterr()
    assert main(args[:2] + ["tiny-b"] + args[3:] + ["--force"]) == 2  # another model: never replaced
    _one_line_error(capsys, "trained for")
    assert (out / WEIGHTS_FILE).read_bytes() == first


def test_train_lens_command_refuses_bad_input_before_loading(tmp_path, prompts_file, tiny_loader, capsys):
    base = ["train-lens", "--model", "tiny-a", "--prompts", str(prompts_file)]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    cases = [
        (["-o", str(tmp_path / "full")], "holds no layerwise tuned lens"),
        (["-o", str(tmp_path / "full"), "--force"], "holds no layerwise tuned lens"),
        (["-o", str(tmp_path / "file")], "is a file"),
        (["-o", str(tmp_path / "x"), "--steps", "0"], "--steps"),
        (["-o", str(tmp_path / "x"), "--positions-per-step", "-1"], "--positions-per-step"),
        (["-o", str(tmp_path / "x"), "--lr", "0"], "--lr"),
        (["-o", str(tmp_path / "x"), "--skip", "6"], "leaves no rows"),
        (["-o", str(tmp_path / "x"), "--limit", "0"], "--limit"),
        (["-o", str(tmp_path / "x"), "--max-new-tokens", "-2"], "--max-new-tokens"),
        (["-o", str(tmp_path / "x"), "--prompts", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        _one_line_error(capsys, needle)
    assert tiny_loader == []  # no model was loaded for any of them
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_cli_help_lists_train_lens(capsys):
    assert main(["--help"]) == 0
    assert "train-lens" in capsys.readouterr().out


# --------------------------------------------------------------------------- the default model

def test_default_model_identity_and_untrained_lens(default_bundle, tmp_path):
    """On SmolLM2-135M: the identity records the GGUF file; an untrained lens gives exactly the
    logit lens; two steps on a few positions move the weights and save/load round-trips."""
    b = default_bundle
    ident = model_identity(b)
    assert ident["num_layers"] == 30 and ident["hidden_size"] == 576 and ident["vocab_size"] == 49152
    assert len(ident["file_sha256"]) == 64 and len(ident["head_sha256"]) == 64
    tok = b.tokenizer
    hidden, targets = teacher_forced_states(b, [tok.encode("The capital of France is")],
                                            [tok.encode(" Paris, a city.", add_special_tokens=False)])
    lens = TunedLens(30, 576, model=ident)
    both = compare_lenses(b.adapter, lens, hidden, targets)
    assert torch.equal(both["logit"].kl_to_final, both["tuned"].kl_to_final)
    stacked = torch.stack([hidden[k] for k in range(31)])
    fitted = fit_tuned_lens(b.adapter, stacked, 2, 0, positions_per_step=4, model=ident)
    assert fitted.weight.abs().sum() > 0
    back = TunedLens.load(fitted.save(tmp_path / "lens"), b)
    assert torch.equal(back.weight, fitted.weight)
