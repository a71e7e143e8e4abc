"""Decision depth and copy collapse (layerwise.milestones), and the speculative-acceptance
forecast (layerwise.speculative), against independent computations on tiny models.

The reference for "what layer k predicts" is a copy of the model cut to k blocks
(tests/tiny_models.truncated_copy) run on each row alone; decision depths, copy rates and
acceptance rates are worked out from its logits with plain Python loops. The forecast's
per-position acceptances are checked against transformers' own self-speculative decoding
(``generate(..., assistant_early_exit=k)``): every round it runs is counted, and equals the rounds
:func:`layerwise.speculative.simulate` derives from the forecast.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch

from layerwise.config import RunConfig
from layerwise.decoding import Decoding
from layerwise.milestones import decision_depth, depth_distribution
from layerwise.speculative import Rounds, acceptance, expected_tokens, simulate
from tiny_models import tiny_bundle, tiny_model, truncated_copy

TEXTS = ["the cat sat on", "a quick brown fox jumps", "layer by layer, block by block"]


# ----------------------------------------------------------------------------------------------
# decision depth: the arithmetic


def test_decision_depth_is_the_start_of_the_last_stable_run():
    stable = torch.tensor([
        [1, 0, 1, 0, 1],
        [1, 1, 0, 0, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)  # (L+1 = 4, N = 5)
    assert decision_depth(stable).tolist() == [0, 1, 2, 3, 3]
    # the last layer never holding: L + 1
    assert decision_depth(torch.tensor([[1], [0]], dtype=torch.bool)).tolist() == [2]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.rand(7, 9, generator=gen) > 0.3
        s[-1] = True
        want = [min(k for k in range(7) if bool(s[k:, j].all())) for j in range(9)]
        assert decision_depth(s).tolist() == want


def test_depth_distribution():
    d = depth_distribution(torch.tensor([0, 2, 2, 3]), 3)
    assert d == {"mean": 1.75, "median": 2.0, "counts": [1, 0, 2, 1], "decided": [0.25, 0.25, 0.75, 1.0]}
    # the gate reads the mean back from the curve: Σ_{k<L} (1 − decided[k])
    from layerwise.baseline import mean_depth

    assert mean_depth(d["decided"]) == pytest.approx(d["mean"])
    assert depth_distribution(torch.tensor([], dtype=torch.long), 2)["mean"] is None


# ----------------------------------------------------------------------------------------------
# the runner's milestones on a tiny model, against a cut copy


def cut_logits(family: str, ids: list[int]) -> torch.Tensor:
    """(L+1, T, V): layer k's logits at every position of ``ids``, from a copy cut to k blocks
    (layer 0: Hugging Face's embedding output through the adapter's norm and head)."""
    model, bundle = tiny_model(family), tiny_bundle(family)
    L = bundle.num_layers
    x = torch.tensor([ids])
    with torch.no_grad():
        rows = [bundle.adapter.unembed(model(input_ids=x, output_hidden_states=True).hidden_states[0], norm=True)[0]]
        rows += [truncated_copy(model, k)(input_ids=x).logits[0].float() for k in range(1, L)]
        rows.append(model(input_ids=x).logits[0].float())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import json

    from layerwise.runner import evaluate

    folder = tmp_path_factory.mktemp("prompts")
    data = folder / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "reference": t[::-1]}) + "\n" for t in TEXTS))
    cfg = RunConfig(prompts=str(data), prompt_format="raw", decoding=Decoding(max_new_tokens=10), bertscore_model=None,
                    teacher_forced_tokens=8, batch_size=2, exit_layers=[1, 2, 3, 4])
    return evaluate(cfg, bundle=tiny_bundle("llama"))


def test_decision_depth_and_copy_rate_match_a_cut_copy(tiny_run):
    tok = tiny_bundle("llama").tokenizer
    L = 4
    depth1, depth10, copies, n = [], [], [0] * (L + 1), 0
    for row in tiny_run["rows"]:
        prompt, ref = tok.encode(row["prompt"]), tok.encode(row["reference"], add_special_tokens=False)[:8]
        z = cut_logits("llama", prompt + ref)
        S = len(prompt)
        for t in range(S - 1, S - 1 + len(ref)):  # the positions that predict reference tokens
            final = int(z[L, t].argmax())
            top1 = [int(z[k, t].argmax()) == final for k in range(L + 1)]
            in10 = [int((z[k, t] > z[k, t, final]).sum()) < 10 for k in range(L + 1)]
            depth1.append(min(k for k in range(L + 1) if all(top1[k:])))
            depth10.append(min(k for k in range(L + 1) if all(in10[k:])))
            inp = (prompt + ref)[t]
            for k in range(L + 1):
                copies[k] += int(z[k, t].argmax()) == inp
            n += 1
    tf = tiny_run["lens"]["teacher_forced"]
    assert tf["positions"] == n
    assert tf["decision_depth"]["top1"]["counts"] == [depth1.count(k) for k in range(L + 1)]
    assert tf["decision_depth"]["top10"]["counts"] == [depth10.count(k) for k in range(L + 1)]
    assert tf["decision_depth"]["top1"]["mean"] == pytest.approx(sum(depth1) / n, abs=1e-4)
    assert tf["decided_top1"] == tf["decision_depth"]["top1"]["decided"]
    assert tf["copy_rate"] == pytest.approx([c / n for c in copies], abs=1e-6)
    # the discriminating power of the check: the depths are not all alike
    assert len(set(depth1)) > 1


def test_first_token_milestones_are_the_first_position_of_each_row(tiny_run):
    tok = tiny_bundle("llama").tokenizer
    L = 4
    depths, copies = [], [0] * (L + 1)
    for row in tiny_run["rows"]:
        prompt = tok.encode(row["prompt"])
        z = cut_logits("llama", prompt)[:, -1]
        final = int(z[L].argmax())
        top1 = [int(z[k].argmax()) == final for k in range(L + 1)]
        depths.append(min(k for k in range(L + 1) if all(top1[k:])))
        for k in range(L + 1):
            copies[k] += int(z[k].argmax()) == prompt[-1]
    ft = tiny_run["lens"]["first_token"]
    assert ft["decision_depth"]["top1"]["counts"] == [depths.count(k) for k in range(L + 1)]
    assert ft["copy_rate"] == pytest.approx([c / len(depths) for c in copies], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# the speculative-acceptance forecast


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 4) == pytest.approx(1.9375)
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        expected_tokens(1.2, 4)


def test_the_forecast_is_the_cut_copys_agreement_on_the_final_exits_text(tiny_run):
    """α_k: on each row's own greedy text (the final exit's generation), the fraction of
    positions where the k-block copy's argmax equals the full model's."""
    tok = tiny_bundle("llama").tokenizer
    L = 4
    hits = {k: 0 for k in range(1, L + 1)}
    n = 0
    for row in tiny_run["rows"]:
        prompt = tok.encode(row["prompt"])
        with torch.no_grad():
            g = tiny_model("llama").generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        assert row["tokens"][str(L)]["head"] == g[:16]  # the final exit's text is plain greedy
        z = cut_logits("llama", prompt + g)
        for t in range(len(prompt) - 1, len(prompt) - 1 + len(g)):
            for k in hits:
                hits[k] += int(z[k, t].argmax()) == int(z[L, t].argmax())
            n += 1
    spec = tiny_run["run"]["speculative"]
    assert spec == {"gamma": 4, "positions": n, "final_matches_text": 1.0}
    for e in tiny_run["exits"]:
        a = hits[e["layer"]] / n
        assert e["accept_rate"] == pytest.approx(a, abs=1e-6)
        assert e["accept_tokens"] == pytest.approx(expected_tokens(a, 4), abs=1e-4)
    assert len({e["accept_rate"] for e in tiny_run["exits"]}) > 2  # exits differ
    # per row, in the row scores (the gate's paired comparison)
    assert all(0.0 <= r["scores"]["1"]["accept_rate"] <= 1.0 for r in tiny_run["rows"])


def test_no_forecast_without_the_final_exit_or_when_sampling(tmp_path):
    import json

    from layerwise.runner import evaluate

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "abc", "reference": "cba"}) + "\n")
    base = dict(prompts=str(data), prompt_format="raw", bertscore_model=None, teacher_forced_tokens=4)
    res = evaluate(RunConfig(exit_layers=[1, 2], decoding=Decoding(max_new_tokens=3), **base), bundle=tiny_bundle("llama"))
    assert res["run"]["speculative"] == {"gamma": 4, "skipped": "the forecast reads the final exit's own generation: "
                                                                "add layer 4 to --exit-layers"}
    assert all("accept_rate" not in e for e in res["exits"])
    res = evaluate(RunConfig(decoding=Decoding(max_new_tokens=3, do_sample=True), draft_tokens=2, **base),
                   bundle=tiny_bundle("llama"))
    assert res["run"]["speculative"]["gamma"] == 2 and "samples" in res["run"]["speculative"]["skipped"]


def test_simulate_counts_rounds():
    # γ = 2, budget 10, text of 6 tokens: agree flags per position
    r = simulate([True, True, False, True, False, True], gamma=2, budget=10)
    # round 1 at 0: draft 2, both accepted, + 1 of its own → pos 3; round 2 at 3: 1 accepted, 1 rejected
    # → pos 5; round 3 at 5: accepts 1 but the text ends (cut) → pos 6
    assert (r.steps, r.checked, r.accepted, r.tokens) == (3, 2 + 2 + 1, 2 + 1 + 0, 6)
    assert simulate([False] * 5, gamma=4, budget=5).steps == 5
    assert simulate([True] * 9, gamma=4, budget=9).steps == 2  # 5 tokens, then 4 (3 drafted + 1)


@contextlib.contextmanager
def counted_rounds(log: list[tuple[int, int]]) -> Iterator[None]:
    """Record (candidate length, accepted) of every round of transformers' early-exit assisted decoding."""
    from transformers.generation import candidate_generator as cg

    cls = cg.EarlyExitCandidateGenerator
    get, update = cls.get_candidates, cls.update_candidate_strategy

    def get_candidates(self: Any, input_ids: Any, **kw: Any) -> Any:
        ids, logits = get(self, input_ids, **kw)
        self._n = ids.shape[1] - input_ids.shape[1]
        return ids, logits

    def update_candidate_strategy(self: Any, input_ids: Any, scores: Any, num_matches: int) -> Any:
        log.append((self._n, int(num_matches)))
        return update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    try:
        yield
    finally:
        cls.get_candidates, cls.update_candidate_strategy = get, update


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_transformers_self_speculative_decoding_accepts_exactly_what_the_forecast_says(family, gamma):
    """transformers' generate(assistant_early_exit=k) drafts with the first k blocks, the final norm
    and the head — layerwise's early exit at k: every round it runs (drafted, accepted) is the
    round the forecast's per-position acceptances give (``simulate``)."""
    bundle = tiny_bundle(family)
    model, tok = bundle.model, bundle.tokenizer
    L, budget = bundle.num_layers, 12
    prompts = [tok.encode(t) for t in TEXTS]
    greedy = []
    for p in prompts:
        with torch.no_grad():
            greedy.append(model.generate(torch.tensor([p]), max_new_tokens=budget, do_sample=False)[0, len(p):].tolist())
    fc = acceptance(bundle, prompts, greedy, [1, 2, 3], gamma=gamma, batch_size=2)
    gc = model.generation_config
    saved = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = gamma, "constant", 0.0
    try:
        total = {k: Rounds() for k in (1, 2, 3)}
        for k in (1, 2, 3):
            for i, p in enumerate(prompts):
                log: list[tuple[int, int]] = []
                with counted_rounds(log), torch.no_grad():
                    out = model.generate(torch.tensor([p]), assistant_early_exit=k, do_sample=False, max_new_tokens=budget)
                assert out[0, len(p):].tolist() == greedy[i], "assisted decoding is plain greedy"
                sim = simulate(fc.flags[k][i], gamma, budget)
                got = Rounds(steps=len(log), checked=sum(min(m + 1, n) for n, m in log), accepted=sum(m for _, m in log),
                             tokens=len(greedy[i]))
                assert got == sim, (family, k, i, log, fc.flags[k][i])
                total[k] += got
    finally:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = saved
    # the comparison discriminates: the exits accept different amounts
    assert len({t.accepted for t in total.values()}) > 1
    assert L == 4


# ----------------------------------------------------------------------------------------------
# the gate: α per exit and the decision-depth curves are tracked; the verdict reports the mean's change


def test_the_gate_tracks_acceptance_and_decision_depth(tiny_run, tmp_path):
    import copy
    import json

    from layerwise.baseline import compare, judge, make_baseline
    from layerwise.models import bundle_from_model
    from layerwise.runner import evaluate
    from tiny_models import TinyTokenizer

    baseline = json.loads(json.dumps(make_baseline(tiny_run)))
    assert [e["accept_rate"] for e in baseline["exits"]] == [e["accept_rate"] for e in tiny_run["exits"]]
    assert baseline["rows"]["exits"]["2"]["accept_rate"] == [r["scores"]["2"]["accept_rate"] for r in tiny_run["rows"]]
    for name in ("teacher_forced.decided_top1", "first_token.decided_top1", "teacher_forced.decided_top10"):
        sec, stat = name.split(".")
        assert baseline["lens"][name] == tiny_run["lens"][sec][stat]
    same = judge(baseline, tiny_run, name="b.json")
    assert same.status == "passed"
    line = next(s for s in same.summary_lines() if s.startswith("decision depth"))
    mean = tiny_run["lens"]["teacher_forced"]["decision_depth"]["top1"]["mean"]
    assert line.startswith(f"decision depth, mean layer: top1 teacher-forced {mean:.2f} → {mean:.2f} (+0.00)")

    # block 3 with noise: the drafts and the decision depth move, and the verdict says by how much
    model = copy.deepcopy(tiny_model("llama"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers[2].parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * float(p.std()) * 0.5)
    cfg = RunConfig(prompts=tiny_run["run"]["data"]["path"], prompt_format="raw", decoding=Decoding(max_new_tokens=10),
                    bertscore_model=None, teacher_forced_tokens=8, batch_size=2, exit_layers=[1, 2, 3, 4])
    changed = evaluate(cfg, bundle=bundle_from_model(model, TinyTokenizer(), name="tiny-noisy"))
    devs = compare(baseline, changed)
    assert {d.metric for d in devs} & {"accept_rate", "teacher_forced.decided_top1", "teacher_forced.decided_top10"}, devs
    v = judge(baseline, changed, name="b.json")
    line = next(s for s in v.summary_lines() if s.startswith("decision depth"))
    new = changed["lens"]["teacher_forced"]["decision_depth"]["top1"]["mean"]
    assert f"top1 teacher-forced {mean:.2f} → {new:.2f} ({new - mean:+.2f})" in line and new != mean
