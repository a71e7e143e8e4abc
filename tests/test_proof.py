"""The load-time proof and discovery, on tiny models: a wrong part is refused in one line naming
it, the proof leaves the model as it found it, discovery finds what today's table rows say, its
record reaches the results and the report, and families whose early exit is not exact are
refused before any compute (or decoded one prompt at a time)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from tiny_families import build  # noqa: E402
from tiny_models import FAMILIES, TinyTokenizer, tiny_model  # noqa: E402

from layerwise.archs import ARCHITECTURES, Adapter  # noqa: E402
from layerwise.errors import ConfigError, LayerwiseError, UnsupportedArchitectureError  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: more threads only contend for the shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line(err: LayerwiseError, *words: str) -> str:
    msg = str(err)
    assert "\n" not in msg and err.problem and err.fix and msg == f"{err.problem} — {err.fix}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("family", FAMILIES)
def test_table_rows_are_proven_and_discovery_finds_the_same_parts(family):
    from layerwise.discover import discover
    from layerwise.proof import prove

    model = tiny_model(family)
    row = ARCHITECTURES[family]
    record = prove(Adapter(model, row), "table")
    assert record["max_abs_diff"] <= record["tolerance"] and record["parts"] == "table"
    found = discover(model)
    ad_row, ad_found = Adapter(model, row), Adapter(model, found)
    assert ad_found.blocks is ad_row.blocks
    assert ad_found.final_norm is ad_row.final_norm
    assert [id(m) for m in ad_found.between] == [id(m) for m in ad_row.between]
    assert ad_found.softcap == ad_row.softcap and ad_found.scale == ad_row.scale and ad_found.divide == ad_row.divide
    assert prove(ad_found, "discovered")["parts"] == "discovered"


def test_a_missing_final_norm_is_refused_naming_it():
    from layerwise.proof import prove

    model = tiny_model("llama")
    wrong = dataclasses.replace(ARCHITECTURES["llama"], final_norm=None)
    with pytest.raises(UnsupportedArchitectureError) as e:
        prove(Adapter(model, wrong), "table")
    one_line(e.value, "'llama'", "block 4's output through (no final norm) → lm_head differs", "tolerance")


def test_a_missing_soft_cap_is_refused_naming_the_post_processing():
    from layerwise.proof import prove

    model = tiny_model("gemma2")
    wrong = dataclasses.replace(ARCHITECTURES["gemma2"], logit_softcap=None)
    with pytest.raises(UnsupportedArchitectureError) as e:
        prove(Adapter(model, wrong), "table")
    one_line(e.value, "'gemma2'", "layer L (lm_head on the output of model, logit post-processing: none) differs")


def test_a_wrong_block_list_is_refused():
    """Blocks that are not the residual stream (here: every block's MLP) are refused, not read."""
    from layerwise.proof import prove

    model = tiny_model("llama")
    mlps = torch.nn.ModuleList([blk.mlp for blk in model.model.layers])
    model.model.add_module("mlps_for_test", mlps)
    try:
        wrong = dataclasses.replace(ARCHITECTURES["llama"], blocks="model.mlps_for_test")
        with pytest.raises(UnsupportedArchitectureError) as e:
            prove(Adapter(model, wrong), "table")
        one_line(e.value, "model.mlps_for_test", "does not take block 1's output")
    finally:
        del model.model.mlps_for_test


@pytest.mark.parametrize("family", ["llama", "opt", "falcon_h1", "bert"])
def test_the_proof_leaves_the_model_as_found(family):
    from layerwise.proof import proven_adapter

    model = tiny_model(family) if family in FAMILIES else build(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    # transformers installs its own output-capturing hooks, for good, the first time a model
    # (here perhaps a cached tiny model other tests ran) records hidden states: compare, not count
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    grad, training = torch.is_grad_enabled(), model.training
    proven_adapter(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "weights or buffers changed"
    for name, m in model.named_modules():
        assert (dict(m._forward_hooks), dict(m._forward_pre_hooks)) == hooks[name], \
            f"a hook was left on {name or 'the model'}"
        assert m.__dict__.get("forward") is forwards[name], f"{name}.forward was replaced"
    assert torch.equal(torch.get_rng_state(), rng), "the proof drew random numbers"
    assert torch.is_grad_enabled() == grad and model.training == training


def test_the_record_reaches_the_results_and_the_report(tmp_path):
    import json

    from layerwise.decoding import Decoding
    from layerwise.models import bundle_from_model
    from layerwise.report import run_info  # the header rows (one of them is the proof)
    from layerwise.runner import RunConfig, evaluate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"abc{i}", "reference": "de f"}) + "\n" for i in range(3)))
    bundle = bundle_from_model(build("bloom"), TinyTokenizer(), name="tiny-bloom")  # discovered
    ok = bundle_from_model(build("falcon"), TinyTokenizer(), name="tiny-falcon")
    res = evaluate(RunConfig(prompts=str(prompts), prompt_format="raw", bertscore_model=None, limit=3,
                             decoding=Decoding(max_new_tokens=3), teacher_forced_tokens=3), bundle=ok)
    proof = res["run"]["model"]["lens_proof"]
    assert proof == ok.info["lens_proof"] and proof["parts"] == "discovered"
    assert proof["blocks"] == "transformer.h (4)" and proof["final_norm"] == "transformer.ln_f"
    json.dumps(res, allow_nan=False)
    row = next(r for r in run_info(res) if r["label"] == "Lens proof")
    assert "parts discovered" in row["value"] and "transformer.h (4)" in row["value"] and "probe tokens" in row["value"]
    # Bloom's early exit is refused (its ALiBi bias spans the batch): evaluate says so right after
    # loading, before any forward.
    with pytest.raises(UnsupportedArchitectureError) as e:
        evaluate(RunConfig(prompts=str(prompts), prompt_format="raw", bertscore_model=None, limit=3), bundle=bundle)
    one_line(e.value, "early exit is not available for model_type 'bloom'", "ALiBi", "run the lens alone")


def test_a_refused_family_fails_before_any_compute(monkeypatch):
    from layerwise import decoding
    from layerwise.decoding import Decoding, generate_exits
    from layerwise.lens import run_lens
    from layerwise.models import bundle_from_model

    bundle = bundle_from_model(build("bloom"), TinyTokenizer(), name="tiny-bloom")
    ids = torch.tensor([[5, 6, 7, 8]])

    def no_compute(*_a, **_k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(decoding, "prefill", no_compute)
    with pytest.raises(UnsupportedArchitectureError) as e:
        generate_exits(bundle, ids, torch.ones_like(ids), [1, 4], Decoding(max_new_tokens=2))
    one_line(e.value, "'bloom'")
    monkeypatch.undo()
    assert len(run_lens(bundle, ids, top_k=1)[0].stats["entropy"]) == 5  # the lens works regardless


def test_a_padding_sensitive_family_runs_one_prompt_at_a_time(monkeypatch):
    """BART's decoder counts positions from the first pad: a left-padded batch is refused by
    generate_exits, and the runner feeds it one prompt at a time — exactly its generate."""
    from layerwise import decoding
    from layerwise.decoding import Decoding, generate_exits
    from layerwise.families import EARLY_EXIT_UNPADDED
    from layerwise.models import bundle_from_model
    from layerwise.runner import RunConfig, run_sweep

    assert "bart" in EARLY_EXIT_UNPADDED
    bundle = bundle_from_model(build("bart"), TinyTokenizer(), name="tiny-bart")
    assert bundle.info["lens_proof"]["left_padding_exact"] is False  # the proof sees it too
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ConfigError) as e:
        generate_exits(bundle, ids, (ids > 0).long(), [1, 4], Decoding(max_new_tokens=2))
    one_line(e.value, "'bart'", "one prompt at a time", "pass one prompt per call")

    widths = []
    real = decoding.generate_exits

    def spy(b, input_ids, *a, **k):
        widths.append(int(input_ids.shape[0]))
        return real(b, input_ids, *a, **k)

    monkeypatch.setattr(decoding, "generate_exits", spy)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    sw = run_sweep(bundle, prompts, [[3, 4], [5], [6, 7, 8]], [1, 4], RunConfig(decoding=Decoding(max_new_tokens=3)))
    assert widths == [1, 1, 1]
    assert all(len(t) == 3 for t in sw.tokens[4])


def test_an_unknown_family_gets_the_lens_but_no_early_exit():
    from layerwise.families import check_early_exit, early_exit_refusal

    assert early_exit_refusal("llama") is None
    why = early_exit_refusal("my_remote_code_model")
    assert why and "has not been shown to be exact" in why
    with pytest.raises(UnsupportedArchitectureError) as e:
        check_early_exit("my_remote_code_model")
    one_line(e.value, "'my_remote_code_model'")
