"""The tuned lens in a run: ``--lens logit,tuned:PATH`` and ``--tuned-exits``, from the option to
the results, the report, the fixtures, the shipped suite's trend tests and the gate.

Numbers are checked against independent computations: the sweep's tuned statistics against a
plain Hugging Face forward of each row alone (``output_hidden_states``) through a hand-written
translator (``h + Linear(h)``), the final norm and the head, KL and cross-entropy from
``log_softmax`` in float64; the sweep's tuned exits against ``generate`` of a copy of the model
cut to k blocks with translator k before its final norm (tests/test_tuned_exits.py).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from layerwise.config import from_options, lens_option, parse_lens
from layerwise.errors import ConfigError, TunedLensError
from layerwise.options import OPTIONS
from tiny_models import random_lens, tiny_bundle, tiny_model

pytest_plugins = ["pytester"]

DEFAULTS = {o.name: o.default for o in OPTIONS}
TINY_ARGS = ("--bertscore-model", "none", "--limit", "3", "--max-new-tokens", "5", "--teacher-forced-tokens", "5",
             "--exit-layers", "1,2,3")


# --------------------------------------------------------------------------- the option

@pytest.mark.parametrize("spec, want", [
    ("logit", None),
    ("logit,tuned:lenses/a", "/base/lenses/a"),
    ("tuned:lenses/a,logit", "/base/lenses/a"),
    (" logit , tuned:/abs/lens ", "/abs/lens"),
    ("tuned:lenses/a", "/base/lenses/a"),
])
def test_lens_option_is_read(spec, want):
    assert parse_lens(spec, Path("/base")) == want
    assert parse_lens(lens_option(want)) == want


@pytest.mark.parametrize("spec, needle", [
    ("", "--lens is empty"),
    ("logit,tuned", "needs its folder"),
    ("logit,tuned:", "needs its folder"),
    ("logit,logit", "twice"),
    ("tuned:a,tuned:b", "twice"),
    ("logit:x", "takes no path"),
    ("logit,patchscope", "unknown lens 'patchscope'"),
])
def test_bad_lens_option_is_one_line(spec, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        parse_lens(spec)
    assert "\n" not in str(info.value) and "--lens logit,tuned:PATH" in str(info.value)


def test_tuned_exits_and_trend_lens_need_a_tuned_lens(tmp_path):
    with pytest.raises(ConfigError, match="--tuned-exits needs a tuned lens"):
        from_options({**DEFAULTS, "tuned-exits": True}, tmp_path)
    with pytest.raises(ConfigError, match="--trend-lens tuned needs a tuned lens"):
        from_options({**DEFAULTS, "trend-lens": "tuned"}, tmp_path)
    s = from_options({**DEFAULTS, "lens": "logit,tuned:lens", "tuned-exits": True, "trend-lens": "tuned"}, tmp_path)
    assert s.run.tuned_lens == str(tmp_path / "lens") and s.run.tuned_exits


# --------------------------------------------------------------------------- the sweep, against a reference


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_sweep_tuned_statistics_and_exits_against_a_reference(family):
    from layerwise.config import Decoding, RunConfig
    from layerwise.runner import run_sweep
    from test_tuned_exits import tuned_truncated_copy

    torch.manual_seed(7)
    bundle = tiny_bundle(family)
    lens = random_lens(bundle, seed=3)
    prompt_ids = [torch.randint(3, 96, (n,)).tolist() for n in (5, 9, 7)]
    ref_ids = [torch.randint(3, 96, (n,)).tolist() for n in (4, 6, 2)]
    cfg = RunConfig(decoding=Decoding(max_new_tokens=8), teacher_forced_tokens=6, tuned_lens="x", tuned_exits=True)
    sw = run_sweep(bundle, prompt_ids, ref_ids, [1, 2, 4], cfg, tuned=lens)
    L = bundle.num_layers
    model = tiny_model(family)
    norm_path = {"gpt2": "transformer.ln_f"}.get(family, "model.norm")
    norm, head = model.get_submodule(norm_path), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    worst, at = 0.0, 0
    with torch.no_grad():
        for prompt, ref in zip(prompt_ids, ref_ids):
            seq = torch.tensor([prompt + ref])
            out = model(seq, output_hidden_states=True)
            pos = list(range(len(prompt) - 1, len(prompt) - 1 + len(ref)))
            final = torch.log_softmax(out.logits[0, pos].double(), -1)
            tgt = torch.tensor(ref)
            for k in range(L + 1):
                h = out.hidden_states[k][0, pos]
                if k < L:
                    lin = torch.nn.Linear(h.shape[-1], h.shape[-1])
                    lin.weight.copy_(lens.weight[k])
                    lin.bias.copy_(lens.bias[k])
                    z = head(norm(h + lin(h)))
                    if cap:
                        z = torch.tanh(z / cap) * cap
                    lp = torch.log_softmax(z.double(), -1)
                else:
                    lp = final
                kl = (final.exp() * (final - lp)).sum(-1)
                xent = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                ent = -(lp.exp() * lp).sum(-1)
                for name, want in (("kl_to_final", kl), ("xent", xent), ("entropy", ent)):
                    got = getattr(sw.tuned_stats, name)[k, at:at + len(ref)].double()
                    worst = max(worst, float((got - want).abs().max()))
            at += len(ref)
    assert worst <= 5e-5, f"{family}: tuned statistics differ from the reference by {worst:.3g}"
    assert not torch.allclose(sw.tuned_stats.kl_to_final[:L], sw.stats.kl_to_final[:L])  # the lens did something
    assert sorted(sw.tuned_tokens) == [1, 2]  # exits below L; at L the tuned exit is the plain one
    for k in (1, 2):
        ref_model = tuned_truncated_copy(model, k, lens)
        for p, prompt in enumerate(prompt_ids):
            ids = torch.tensor([prompt])
            want = ref_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=8, pad_token_id=0, eos_token_id=2)[0, len(prompt):].tolist()
            got = sw.tuned_tokens[k][p]
            assert got == want[: len(got)] and (len(got) == 8 or got[-1] == 2), f"{family} tuned exit {k} row {p}"


# --------------------------------------------------------------------------- a whole run (tiny Llama folder)

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_bundle):
    """A random 3-block Llama with the default model's tokenizer, saved as a folder, and a tuned
    lens trained for it (a few steps), and one for another model (seed 1)."""
    import transformers

    from layerwise.models import load_model
    from layerwise.tuned_train import train_tuned_lens, training_sequences

    root = tmp_path_factory.mktemp("tuned-run")
    cfg = transformers.LlamaConfig(
        vocab_size=default_bundle.info["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, tie_word_embeddings=True, initializer_range=0.3)
    for seed, name in ((0, "model"), (1, "other")):
        torch.manual_seed(seed)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        default_bundle.tokenizer.save_pretrained(root / name)
        bundle = load_model(str(root / name))
        texts = [f"Item {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(6)]
        seqs = training_sequences(bundle, texts, ["It rests."] * 6, max_new_tokens=4)
        train_tuned_lens(bundle, seqs, steps=6, seed=0, positions_per_step=8).save(root / f"lens-{name}")
    return root


def _run(pytester, root, *args):
    return pytester.runpytest(f"--model={root / 'model'}", *TINY_ARGS, *args)


USER_TESTS = '''
import pytest

def test_tuned(tuned_layer_lens, layer_lens, tuned_exit_metrics, tuned_exit_generations, exit_metrics, tuned_lens,
               layerwise_model):
    L = layerwise_model.num_layers
    assert tuned_layer_lens is layer_lens["tuned"]
    assert len(tuned_layer_lens["teacher_forced"]["kl_to_final"]["mean"]) == L + 1
    assert tuned_layer_lens["teacher_forced"]["kl_to_final"]["mean"][L] == 0
    assert sorted(tuned_exit_metrics) == [1, 2] and sorted(tuned_exit_generations) == [1, 2]
    assert all(len(v) == 3 for v in tuned_exit_generations.values())
    assert tuned_lens.num_layers == L
'''

NO_TUNED = '''
def test_skips(tuned_layer_lens):
    pass

def test_skips_too(tuned_exit_metrics):
    pass
'''


def test_a_run_with_both_lenses(pytester, tiny_dir):
    from layerwise import checks
    from layerwise.results import Results, load_results
    from layerwise.schema import undeclared

    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_user=USER_TESTS)
    result = _run(pytester, tiny_dir, f"--lens=logit,tuned:{tiny_dir / 'lens-model'}", "--tuned-exits",
                  "--trend-lens", "tuned", "--junitxml", "junit.xml", "-k", "test_user or test_lens.py")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 4, result.stdout.str()
    res = load_results(pytester.path / "reports" / "results.json")
    ran = {t["nodeid"].rsplit("::", 1)[-1]: t["outcome"] for t in res["tests"]}
    assert ran["test_tuned"] == "passed", res["tests"]
    assert {"test_entropy_falls_with_depth", "test_kl_to_final_falls_with_depth_and_is_zero_at_L",
            "test_top1_agreement_with_final_rises_with_depth"} <= set(ran)
    assert undeclared(res, Results) == []
    tuned = res["run"]["lens"]["tuned"]
    assert tuned["sha256"] == json.loads((tiny_dir / "lens-model" / "config.json").read_text())["weights"]["sha256"]
    assert tuned["training"]["steps"] == 6
    assert [e["layer"] for e in res["tuned_exits"]] == [1, 2]
    assert set(res["rows"][0]["tuned"]["generations"]) == {"1", "2"}
    # the shipped trend tests read the tuned lens: their JUnit numbers are the tuned curves'
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "junit.xml").iter("property")}
    assert float(props["kl_trend_rho"]) == pytest.approx(checks.kl_trend(res, -0.8, "tuned").values["kl_trend_rho"])
    assert float(props["final_entropy"]) == pytest.approx(
        res["lens"]["tuned"]["teacher_forced"]["entropy"]["mean"][-1])
    html = (pytester.path / "reports" / "report.html").read_text(encoding="utf-8")
    for needle in ("Exits through the tuned lens", "tuned lens", 'id="example-tuned-0"', "Exit layer 1, tuned lens",
                   "KL to final, teacher-forced, tuned lens", tuned["sha256"][:16]):
        assert needle in html, needle
    assert "1 tuned" in result.stdout.str()  # the terminal's exit table


def test_fixtures_skip_without_a_tuned_lens(pytester, tiny_dir):
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_user=NO_TUNED)
    result = _run(pytester, tiny_dir, "--no-layer-suite")
    result.assert_outcomes(skipped=2)
    res = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert "tuned" not in res["lens"] and "tuned_exits" not in res and "tuned" not in res["run"]["lens"]


def _one_line_usage_error(result, *needles):
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    assert "Traceback" not in text, text
    lines = [ln for ln in result.outlines + result.errlines
             if "layerwise:" in ln and not ln.startswith("layerwise: load")]  # the model's load line
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_a_missing_or_damaged_lens_is_refused_before_the_model_loads(pytester, tiny_dir, tmp_path):
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_user=USER_TESTS)
    _one_line_usage_error(_run(pytester, tiny_dir, f"--lens=logit,tuned:{tmp_path / 'nope'}"), "does not exist")
    bad = tmp_path / "damaged"
    bad.mkdir()
    for f in (tiny_dir / "lens-model").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = bad / "params.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    _one_line_usage_error(_run(pytester, tiny_dir, f"--lens=logit,tuned:{bad}"), "does not match", "train the lens again")
    assert not (pytester.path / "reports").exists()


def test_preflight_checks_the_lens_without_torch(tiny_dir, tmp_path):
    """The preflight's check of a lens folder (tuned_files) is torch-free, and catches a swapped shape."""
    import subprocess
    import sys

    code = ("import sys, json; from layerwise.tuned_files import check_lens_folder; "
            f"info = check_lens_folder({str(tiny_dir / 'lens-model')!r}); "
            "assert 'torch' not in sys.modules; print(json.dumps([info['num_layers'], info['hidden_size']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [3, 32]
    from layerwise.tuned_files import check_lens_folder

    bad = tmp_path / "shape"
    bad.mkdir()
    cfg = json.loads((tiny_dir / "lens-model" / "config.json").read_text())
    cfg["hidden_size"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "params.safetensors").write_bytes((tiny_dir / "lens-model" / "params.safetensors").read_bytes())
    with pytest.raises(TunedLensError, match=r"does not hold weight \(3, 16, 16\)"):
        check_lens_folder(bad)


def test_a_lens_for_another_model_is_refused_before_any_compute(pytester, tiny_dir, monkeypatch):
    import layerwise.runner as runner

    def boom(*_a, **_k):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(runner, "run_sweep", boom)
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_user=USER_TESTS)
    line = _one_line_usage_error(_run(pytester, tiny_dir, f"--lens=logit,tuned:{tiny_dir / 'lens-other'}"),
                                 "was trained for", "layerwise train-lens --model")
    assert "the sweep ran" not in line
    assert not (pytester.path / "reports").exists()


def test_layerwise_run_takes_the_lens_options(tiny_dir, tmp_path, monkeypatch, capsys):
    from layerwise.cli import main
    from layerwise.results import load_results

    monkeypatch.chdir(tmp_path)
    rc = main(["run", f"--model={tiny_dir / 'model'}", *TINY_ARGS, "--lens", f"logit,tuned:{tiny_dir / 'lens-model'}",
               "--tuned-exits", "-o", "out.json", "--report", "out.html"])
    assert rc == 0, capsys.readouterr().err
    res = load_results(tmp_path / "out.json")
    assert [e["layer"] for e in res["tuned_exits"]] == [1, 2] and "tuned" in res["lens"]
    assert res["timing"]["tuned_lens_s"] >= 0
    assert main(["run", f"--model={tiny_dir / 'model'}", "--tuned-exits"]) == 2
    assert "--tuned-exits needs a tuned lens" in capsys.readouterr().err


def test_the_gate_records_the_lens_and_is_not_refused_by_it(tiny_dir):
    from layerwise.baseline import identity, judge, make_baseline
    from layerwise.config import Decoding, RunConfig
    from layerwise.models import load_model
    from layerwise.runner import evaluate

    bundle = load_model(str(tiny_dir / "model"))
    kw = dict(model=str(tiny_dir / "model"), bertscore_model=None, limit=3, decoding=Decoding(max_new_tokens=5),
              teacher_forced_tokens=5, exit_layers=[1, 2, 3])
    plain = evaluate(RunConfig(**kw), bundle=bundle)
    both = evaluate(RunConfig(**kw, tuned_lens=str(tiny_dir / "lens-model"), tuned_exits=True), bundle=bundle)
    assert identity(plain) == identity(both)
    base = make_baseline(plain)
    assert "tuned_lens" not in base["made_with"]
    assert make_baseline(both)["made_with"]["tuned_lens"] == both["run"]["lens"]["tuned"]["sha256"]
    # the logit lens and the plain exits are the same numbers with or without the tuned lens (the
    # decode's batch grows by the tuned rows: its float32 sums may round differently, ~1e-6)
    assert plain["lens"]["teacher_forced"] == both["lens"]["teacher_forced"]
    assert [r["tokens"] for r in plain["rows"]] == [r["tokens"] for r in both["rows"]]
    for a, b in zip(plain["exits"], both["exits"]):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] if not isinstance(a[k], float) else abs(a[k] - b[k]) <= 1e-5 for k in a), (a, b)
    v = judge(base, both, name="b.json")
    assert v.status == "passed" and not v.warnings, v.line()


def test_trend_checks_read_the_chosen_lens():
    from layerwise import checks

    L = 4
    def section(kl):
        return {"teacher_forced": {"kl_to_final": {"mean": kl}, "entropy": {"mean": [3, 2.5, 2, 1.5, 1]},
                                   "top1_agree": [0, 0.2, 0.5, 0.7, 1.0]}}
    res = {"run": {"model": {"vocab_size": 100}}, "lens": {**section([5, 4, 3, 2, 0])}}
    assert checks.kl_trend(res, -0.8).ok
    with pytest.raises(ConfigError, match="these results have no tuned lens"):
        checks.kl_trend(res, -0.8, "tuned")
    res["lens"]["tuned"] = section([1, 2, 3, 4, 0][:L + 1])
    bad = checks.kl_trend(res, -0.8, "tuned")
    assert not bad.ok and bad.message.startswith("tuned-lens KL to the final layer does not fall")
    assert checks.kl_trend(res, -0.8, "logit").ok


def test_gating_a_results_file_with_the_tuned_trend_needs_a_tuned_lens(tmp_path):
    from layerwise.preflight import preflight

    data = Path(__file__).parent / "data" / "results_tiny.json"
    s = from_options({**DEFAULTS, "results": str(data), "trend-lens": "tuned"}, tmp_path)
    with pytest.raises(ConfigError, match="--trend-lens tuned: .* has no tuned lens"):
        preflight(s)
