"""The pytest plugin, driven the way users drive it: pytester runs of small test files.

Most runs use a tiny random Llama saved in a folder (the default model's tokenizer and vocabulary,
hidden size 32, 2 blocks) so a whole session takes seconds; they run in-process. Subprocess runs
are used where isolation is the point: entry-point loading, "no torch for --help", pytest-xdist.
The shipped suite (layer_tests/) runs twice on 135M-parameter models: on the default model with
its defaults (must pass) and on random weights of the same architecture (must fail).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
# In-process pytester runs put sys.modules back as it was after each run. A torch first imported
# inside one of them is dropped from sys.modules while its C extension stays loaded, and this
# process can then not import it again ("SystemError: ... bad call flags" when this file runs
# alone). Imported here, it is part of what every run puts back.
import torch  # noqa: F401

from layerwise.options import OPTIONS

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "fixtures" / "baselines" / "smollm2-135m.json"
USAGE = pytest.ExitCode.USAGE_ERROR
# --no-layer-suite: these runs are about users' own tests; the shipped suite joining a run is tested apart
TINY_ARGS = ("--bertscore-model", "none", "--limit", "3", "--max-new-tokens", "4", "--teacher-forced-tokens", "4",
             "--no-layer-suite")

# A conftest that records, when pytest ends, whether anything heavy was imported.
HEAVY_PROBE = """
import json, sys

def pytest_unconfigure(config):
    heavy = sorted(m for m in ("torch", "transformers", "matplotlib", "bert_score", "sacrebleu") if m in sys.modules)
    with open("heavy_modules.json", "w") as fh:
        json.dump(heavy, fh)
"""

USER_TESTS = """
import pytest

def test_mid(exit_metrics):
    assert exit_metrics[2]["rougeL"] >= 0.0

def test_generations(early_exit_generations, layer_lens, layerwise_model):
    assert sorted(early_exit_generations) == [1, 2]
    assert all(len(v) == 3 for v in early_exit_generations.values())
    assert len(layer_lens["teacher_forced"]["entropy"]["mean"]) == layerwise_model.num_layers + 1

def test_fails(exit_metrics):
    assert exit_metrics[1]["bleu"] > 1000, "exit 1 is not that good"

def test_skips(layerwise_results):
    pytest.skip("nothing to see")
"""


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_rootdir(request):
    """An ini file in every pytester dir: otherwise pytest takes the common ancestor of the
    pytester dir and a ``--model`` folder as rootdir, and node ids get a directory prefix."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester").makeini("[pytest]\n")


@pytest.fixture(scope="session")
def model_cache_root():
    """The GGUF conversion cache as seen *before* pytester points HOME at its temp dir."""
    from layerwise.models import cache_root

    return str(cache_root())


@pytest.fixture
def lw_env(monkeypatch, model_cache_root):
    """Keep the converted default model where it is (pytester changes HOME, and with it the
    platformdirs cache dir), and keep torch on one thread under contention."""
    monkeypatch.setenv("LAYERWISE_CACHE", model_cache_root)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="session")
def random_default_arch_dir(tmp_path_factory, default_bundle):
    """The default model's architecture (30 blocks, 135M parameters) with random weights, seed 0."""
    import copy

    import torch
    import transformers

    folder = tmp_path_factory.mktemp("random-smollm2")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(default_bundle.model.config))
    model.save_pretrained(folder)
    default_bundle.tokenizer.save_pretrained(folder)
    del model
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 540 MB


def tiny(folder: Path, *args: str) -> tuple[str, ...]:
    # "--model=PATH" as one argument: pytest does not take it for a test path when it picks the rootdir
    return (f"--model={folder}", *TINY_ARGS, *args)


def layerwise_lines(result: pytest.RunResult) -> list[str]:
    return [ln for ln in result.outlines + result.errlines if "layerwise:" in ln]


def assert_one_line_usage_error(result: pytest.RunResult, *needles: str) -> str:
    """Exit code 4, exactly one line that says what is wrong (and how to fix it), no traceback."""
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == USAGE, text
    assert "Traceback" not in text and "raise " not in text, text
    lines = layerwise_lines(result)
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- registration, --help, collection: no torch --------------------------------------------------


def test_plugin_is_registered_through_the_entry_point(pytester):
    config = pytester.parseconfig()
    plugin = config.pluginmanager.get_plugin("layerwise")
    assert plugin is not None and plugin.__name__ == "layerwise.plugin"
    dists = {(dist.project_name, getattr(p, "__name__", "")) for p, dist in config.pluginmanager.list_plugin_distinfo()}
    assert ("pytest-layerwise", "layerwise.plugin") in dists


def test_plugin_is_active_in_a_fresh_interpreter(pytester):
    pytester.makepyfile(test_fx="def test_fixture_exists(request):\n    request.getfixturevalue('layerwise_settings')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["plugins:*layerwise-*"])
    result.assert_outcomes(passed=1)


def test_help_lists_the_options_and_imports_no_torch(pytester):
    pytester.makeconftest(HEAVY_PROBE)
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    out = result.stdout.str()
    assert "layerwise: per-layer (logit lens) and early-exit tests of causal LMs" in out
    for o in OPTIONS:
        assert f"--{o.name}" in out, o.name
        assert o.ini in out, o.ini  # the ini section lists every key
    assert json.loads((pytester.path / "heavy_modules.json").read_text()) == []


def test_help_works_even_with_a_bad_option_value(pytester):
    pytester.makeini("[pytest]\nlayerwise_max_new_tokens = many\n")
    result = pytester.runpytest("--help")
    assert result.ret == 0
    assert "--max-new-tokens" in result.stdout.str()


def test_collect_only_does_not_load_the_model(pytester):
    pytester.makeconftest(HEAVY_PROBE)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*test_mid*", "*4 tests collected*"])
    assert "loading" not in result.stdout.str()
    assert json.loads((pytester.path / "heavy_modules.json").read_text()) == []
    assert not (pytester.path / "reports").exists()


# -- options: ini keys, CLI over ini ---------------------------------------------------------------

SETTINGS_TEST = """
import json

def test_settings(layerwise_settings):
    with open("settings.json", "w") as fh:
        json.dump(layerwise_settings, fh)
"""

MINIMAL_BASELINE = {"schema": "pytest-layerwise/baseline", "schema_version": 1,
                    "identity": {"data_sha256": "0" * 64, "rows": 1, "prompt_format": "raw", "exit_layers": [2],
                                 "num_layers": 2, "decoding": {}, "teacher_forced_tokens": 4, "bertscore_model": None},
                    "exits": [], "lens": {}}


def _ini_values(tmp: Path) -> tuple[dict[str, str], dict[str, object]]:
    """A valid, non-default value for every option (as ini text) and what it converts to."""
    (tmp / "p.jsonl").write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n')
    (tmp / "b.json").write_text(json.dumps(MINIMAL_BASELINE))
    shutil.copy(ROOT / "tests" / "data" / "results_tiny.json", tmp / "r_in.json")
    from layerwise.tuned import TunedLens

    TunedLens(2, 4).save(tmp / "lens")  # a whole lens folder
    table = {
        "model": ("some-org/some-model", "some-org/some-model"),
        "dtype": ("bfloat16", "bfloat16"),
        "device": ("cpu", "cpu"),
        "revision": ("abc123", "abc123"),
        "trust-remote-code": ("true", True),
        "device-map": ("auto", "auto"),
        "load-in-4bit": ("yes", True),
        "load-in-8bit": ("off", False),
        "bnb-4bit-quant-type": ("fp4", "fp4"),
        "bnb-4bit-compute-dtype": ("bfloat16", "bfloat16"),
        "bnb-4bit-double-quant": ("false", False),
        "exit-layers": ("2, 4,6", [2, 4, 6]),
        "prompts": ("p.jsonl", str(tmp / "p.jsonl")),
        "limit": ("2", 2),
        "prompt-format": ("raw", "raw"),
        "max-new-tokens": ("7", 7),
        "do-sample": ("1", True),
        "temperature": ("0.7", 0.7),
        "top-k": ("5", 5),
        "top-p": ("0.9", 0.9),
        "seed": ("3", 3),
        "teacher-forced-tokens": ("9", 9),
        "bertscore-model": ("none", "none"),
        "report": ("out/r.html", str(tmp / "out/r.html")),
        "results-json": ("out/r.json", str(tmp / "out/r.json")),
        "summary-md": ("out/digest.md", str(tmp / "out/digest.md")),
        "baseline": ("b.json", str(tmp / "b.json")),
        "require-baseline": ("true", True),
        "layer-suite": ("false", False),  # the model named here does not exist: keep the suite out
        "adapter": ("some-org/some-lora", "some-org/some-lora"),
        "token": ("hf_not_a_real_token", "hf_not_a_real_token"),
        "cache-dir": ("hf-cache", str(tmp / "hf-cache")),
        "attn-implementation": ("sdpa", "sdpa"),
        "batch-size": ("4", 4),
        "bertscore-num-layers": ("3", 3),
        "update-baseline": ("false", False),
        "tolerance": ("bleu=1:0", "bleu=1:0"),
        "entropy-trend-max": ("-0.4", -0.4),
        "final-entropy-max": ("0.6", 0.6),
        "kl-trend-max": ("-0.7", -0.7),
        "agreement-trend-min": ("0.7", 0.7),
        "min-rouge-gain": ("0.02", 0.02),
        "min-bleu-gain": ("0.5", 0.5),
        "check-bertscore": ("on", True),
        "drift-against": ("some-org/reference-model", "some-org/reference-model"),
        "drift-revision": ("v1.0", "v1.0"),
        "drift-dtype": ("float32", "float32"),
        "drift-load-in-4bit": ("true", True),
        "drift-load-in-8bit": ("false", False),
        "max-drift-kl": ("0.5", 0.5),
        "cache-results": ("true", True),
        "results": ("r_in.json", str(tmp / "r_in.json")),
        "draft-tokens": ("6", 6),
        "lens": ("logit, tuned:lens", f"logit,tuned:{tmp / 'lens'}"),  # a relative path: from the ini's folder
        "tuned-exits": ("on", True),
        "trend-lens": ("logit", "logit"),  # the default: "tuned" needs a results file (r_in.json) with a tuned lens
    }
    names = {o.name for o in OPTIONS}
    # options added after this test was written are left at their defaults here
    want = {o.name: o.default for o in OPTIONS}
    want.update({k: v[1] for k, v in table.items() if k in names})
    return {k: v[0] for k, v in table.items() if k in names}, want


def test_every_option_is_an_ini_key(pytester):
    ini, want = _ini_values(pytester.path)
    pytester.makeini("[pytest]\n" + "".join(f"layerwise_{k.replace('-', '_')} = {v}\n" for k, v in ini.items()))
    pytester.makepyfile(test_settings=SETTINGS_TEST)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    got = json.loads((pytester.path / "settings.json").read_text())
    assert got == {k: (str(v) if isinstance(v, Path) else v) for k, v in want.items()}
    assert len(ini) == len(OPTIONS)
    config = pytester.parseconfig()
    for o in OPTIONS:  # every option, including ones added later, is registered as an ini key
        config.getini(o.ini)


def test_cli_wins_over_ini(pytester):
    pytester.makeini("[pytest]\nlayerwise_max_new_tokens = 7\nlayerwise_exit_layers = 2,4\nlayerwise_dtype = float16\n")
    pytester.makepyfile(test_settings=SETTINGS_TEST)
    pytester.runpytest().assert_outcomes(passed=1)
    got = json.loads((pytester.path / "settings.json").read_text())
    assert (got["max-new-tokens"], got["exit-layers"], got["dtype"], got["limit"]) == (7, [2, 4], "float16", 20)

    pytester.runpytest("--max-new-tokens", "5", "--exit-layers", "3").assert_outcomes(passed=1)
    got = json.loads((pytester.path / "settings.json").read_text())
    assert (got["max-new-tokens"], got["exit-layers"], got["dtype"]) == (5, [3], "float16")


def test_bad_ini_value_is_a_usage_error(pytester):
    pytester.makeini("[pytest]\nlayerwise_max_new_tokens = many\n")
    pytester.makepyfile(test_settings=SETTINGS_TEST)
    assert_one_line_usage_error(pytester.runpytest(), "layerwise_max_new_tokens: 'many' is not a whole number")


# -- bad options: exit code 4 and one line -------------------------------------------------------


BAD_OPTIONS = [
        (["--exit-layers", "8,x"], ["--exit-layers / layerwise_exit_layers: 'x' is not a whole number"]),
        (["--exit-layers", "0"], ["exit layer 0 is not a block output", "1..L"]),
        (["--exit-layers", "3,3"], ["exit layer 3 is given twice"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1, got 0"]),
        (["--max-new-tokens", "lots"], ["'lots' is not a whole number"]),
        (["--limit", "0"], ["--limit must be at least 1"]),
        (["--dtype", "float64"], ["not one of auto, float32, bfloat16, float16"]),
        (["--load-in-4bit", "--load-in-8bit"], ["both given"]),
        (["--tolerance", "bleu"], ["--tolerance: cannot read 'bleu'"]),
        (["--prompts", "missing.jsonl"], ["missing.jsonl does not exist"]),
        (["--prompts", "bad.jsonl"], ["bad.jsonl, line 2: not valid JSON"]),
        (["--report", "afile/report.html"], ["--report", "afile", "cannot be written"]),
        (["--results-json", "afile/r.json"], ["--results-json", "cannot be written"]),
        (["--report", "adir"], ["--report", "is a folder"]),
        (["--baseline", "missing.json"], ["baseline", "missing.json does not exist", "--update-baseline"]),
        (["--baseline", "corrupt.json"], ["corrupt.json is not valid JSON"]),
        (["--baseline", "other.json"], ["other.json is not a layerwise baseline"]),
        (["--update-baseline", "--baseline", "afile/b.json"], ["--baseline", "cannot be written"]),
        # the second bad-input round (issue #12): outputs that destroy inputs, gates switched off
        (["--update-baseline", "--baseline", str(SHIPPED)], ["is inside the installed layerwise package"]),
        (["--report", "same.out", "--results-json", "same.out"], ["--report", "--results-json", "are the same file"]),
        (["--report", "dir/../same.out", "--results-json", "same.out"], ["--report", "--results-json", "are the same file"]),
        (["--report", "link.json", "--results-json", "good.json"], ["--report", "--results-json", "are the same file"]),
        (["--update-baseline", "--baseline", "r.json", "--results-json", "r.json"], ["are the same file"]),
        (["--prompts", "good.jsonl", "--results-json", "good.jsonl"],
         ["--results-json", "is the same file as --prompts", "would destroy --prompts"]),
        (["--prompts", "good.jsonl", "--report", "./hard.jsonl"], ["--report", "is the same file as --prompts"]),
        (["--tolerance", "bleu=nan"], ["--tolerance bleu: 'nan' must be finite and ≥ 0"]),
        (["--tolerance", "bleu=-1"], ["must be finite and ≥ 0"]),
        (["--tolerance", "blue=0.5"], ["unknown metric 'blue'", "bleu, rougeL"]),
        (["--seed", str(2**64)], ["--seed must be a whole number in 0..2**64-1"]),
        (["--seed", "-1"], ["--seed must be a whole number in 0..2**64-1"]),
        (["--do-sample", "--temperature", "nan"], ["--temperature must be a finite number > 0"]),
        (["--temperature", "0"], ["--temperature must be a finite number > 0"]),
        (["--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
        (["--device-map", "[1,2]"], ["--device-map [1,2] is a JSON list, not an object"]),
        (["--device-map", "{\"model\": \"gpu7\"}"], ["--device-map: 'model' is mapped to 'gpu7', which is not a device"]),
        (["--device-map", "everywhere"], ["--device-map 'everywhere' is not a device map"]),
        (["--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["--teacher-forced-tokens", "0"], ["--teacher-forced-tokens must be at least 1"]),
]


@pytest.mark.parametrize("args, needles", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_a_usage_error_in_one_line(pytester, args, needles):
    (pytester.path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    (pytester.path / "afile").write_text("a file, not a folder\n")
    (pytester.path / "adir").mkdir()
    (pytester.path / "corrupt.json").write_text('{"schema": "pytest-layerwise/baseline", ')
    (pytester.path / "other.json").write_text('{"schema": "something-else"}')
    (pytester.path / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (pytester.path / "good.json").write_text("{}")
    (pytester.path / "link.json").symlink_to(pytester.path / "good.json")
    os.link(pytester.path / "good.jsonl", pytester.path / "hard.jsonl")
    (pytester.path / "dir").mkdir()
    before = {p.name: p.read_bytes() for p in pytester.path.iterdir() if p.is_file()}
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest(*args)
    line = assert_one_line_usage_error(result, *needles)
    assert " — " in line  # and how to fix it
    assert not (pytester.path / "reports").exists()
    after = {p.name: p.read_bytes() for p in pytester.path.iterdir() if p.is_file() and p.name in before}
    assert after == before  # nothing was written over


def test_exit_layer_beyond_the_model_stops_the_run_after_loading(pytester, tiny_llama_dir):
    pytester.makepyfile(test_user=USER_TESTS)
    (pytester.path / "reports").mkdir()
    old = b"<html>the report of an earlier run</html>"
    (pytester.path / "reports" / "report.html").write_bytes(old)
    result = pytester.runpytest(*tiny(tiny_llama_dir, "--exit-layers", "1,99"))
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == USAGE, text
    assert "Traceback" not in text
    (line,) = [ln for ln in result.outlines if "exit layer 99" in ln]
    assert "outside 1..2" in line and "this model has 2 blocks" in line
    assert (pytester.path / "reports" / "report.html").read_bytes() == old
    assert sorted(p.name for p in (pytester.path / "reports").iterdir()) == ["report.html"]


# -- fixtures for users, files written, terminal summary -----------------------------------------


def test_user_tests_with_the_fixtures(pytester, tiny_llama_dir):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest(*tiny(tiny_llama_dir, "--results-json", "out/res.json", "--report", "out/rep/report.html"))
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # the exit-layer table and what was written
    result.stdout.fnmatch_lines([
        "*= layerwise =*",
        "model tiny-llama* (2 blocks, float32, cpu*); 3 rows; layer k = output of block k",
        "exit layer*BLEU*ROUGE-L*BERTScore F1*mean len*empty*first-token H",
        "         1 *",
        "         2 *",
        "phases: load *",
        "wrote results out/res.json",
        "wrote report out/rep/report.html",
        "layerwise: NOT GATED: no baseline for model '*tiny-llama*' (looked for *baselines/tiny-llama*.json; "
        "create it with --update-baseline, or pass --baseline)",
    ])
    section = result.outlines[[i for i, ln in enumerate(result.outlines) if "= layerwise =" in ln][0]:]
    end = [i for i, ln in enumerate(section) if ln.startswith("====")][1]
    assert section[end - 1].startswith("layerwise: NOT GATED")  # one verdict line ends the summary
    assert sum("GATE" in ln or "GATED" in ln for ln in section[:end]) == 1
    assert result.stdout.str().count("wrote results") == 1
    res = json.loads((pytester.path / "out" / "res.json").read_text())
    assert res["schema"] == "pytest-layerwise/results" and res["run"]["model"]["num_layers"] == 2
    assert [e["layer"] for e in res["exits"]] == [1, 2] and res["exits"][0]["bertscore_f1"] is None
    assert res["run"]["data"]["rows"] == 3 and res["run"]["decoding"]["max_new_tokens"] == 4
    tests = {t["nodeid"]: t for t in res["tests"]}
    assert {k: v["outcome"] for k, v in tests.items()} == {
        "test_user.py::test_mid": "passed", "test_user.py::test_generations": "passed",
        "test_user.py::test_fails": "failed", "test_user.py::test_skips": "skipped",
    }
    assert "exit 1 is not that good" in tests["test_user.py::test_fails"]["message"]
    assert "nothing to see" in tests["test_user.py::test_skips"]["message"]
    html = (pytester.path / "out" / "rep" / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "tiny-llama" in html
    assert not (pytester.path / "reports").exists()  # nothing at the default paths


def test_run_without_layerwise_fixtures_writes_nothing(pytester, tiny_llama_dir):
    pytester.makepyfile(test_plain="def test_ok():\n    assert True\n")
    result = pytester.runpytest(*tiny(tiny_llama_dir))
    result.assert_outcomes(passed=1)
    assert "= layerwise =" not in result.stdout.str() and "loading" not in result.stdout.str()
    assert not (pytester.path / "reports").exists()


def _old_outputs(folder: Path) -> dict[str, bytes]:
    (folder / "reports").mkdir(exist_ok=True)
    old = {"report.html": b"<html>old report</html>", "results.json": b'{"old": true}\n'}
    for name, data in old.items():
        (folder / "reports" / name).write_bytes(data)
    return old


def _assert_untouched(folder: Path, old: dict[str, bytes]) -> None:
    assert sorted(p.name for p in (folder / "reports").iterdir()) == sorted(old)  # no temp files left
    for name, data in old.items():
        assert (folder / "reports" / name).read_bytes() == data


def test_model_that_fails_to_load_writes_nothing(pytester, tiny_llama_dir):
    broken = pytester.path / "broken-model"
    shutil.copytree(tiny_llama_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: 1000])  # truncated weights
    old = _old_outputs(pytester.path)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest(*tiny(broken))
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == USAGE, text
    assert "Traceback" not in text
    (line,) = [ln for ln in result.outlines if "layerwise: cannot load the model" in ln]
    assert "broken-model" in line
    _assert_untouched(pytester.path, old)


def test_missing_model_folder_writes_nothing(pytester):
    old = _old_outputs(pytester.path)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("--model", "./no-such-model", *TINY_ARGS)
    assert result.ret == USAGE
    # found before the session starts (preflight), not after a fixture asked for the model
    assert_one_line_usage_error(result, "model path ./no-such-model does not exist")
    _assert_untouched(pytester.path, old)


def test_interrupted_run_writes_nothing(pytester, tiny_llama_dir):
    old = _old_outputs(pytester.path)
    pytester.makepyfile(test_user="""
        def test_a(layerwise_results):
            assert layerwise_results["exits"]

        def test_b(layerwise_results):
            raise KeyboardInterrupt
    """)
    result = pytester.runpytest(*tiny(tiny_llama_dir), no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    _assert_untouched(pytester.path, old)


# -- the baseline gate through the plugin --------------------------------------------------------


def test_baseline_update_compare_refuse(pytester, tiny_llama_dir, tiny_llama_other_dir):
    shutil.copy(ROOT / "layer_tests" / "test_baseline.py", pytester.path / "test_baseline.py")
    b = pytester.path / "b.json"

    # 1. write it
    r = pytester.runpytest(*tiny(tiny_llama_dir, "--update-baseline", "--baseline", "b.json", "-rs"))
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["wrote baseline b.json", "layerwise: NOT GATED: the baseline b.json is being written from this run",
                            "SKIPPED [[]1[]] test_baseline.py:*: NOT GATED: the baseline b.json is being written from this run"])
    written = b.read_bytes()
    base = json.loads(written)
    assert base["schema"] == "pytest-layerwise/baseline" and base["identity"]["rows"] == 3
    assert base["identity"]["exit_layers"] == [1, 2] and base["identity"]["bertscore_model"] is None

    # 2. the same model against it: passes, and the baseline is left alone
    r = pytester.runpytest(*tiny(tiny_llama_dir, "--baseline", "b.json"))
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["layerwise: gate PASSED against b.json (* numbers within tolerance)"])
    assert b.read_bytes() == written

    # 3. other settings: refused, not compared
    r = pytester.runpytest(f"--model={tiny_llama_dir}", "--bertscore-model", "none", "--limit", "2",
                           "--max-new-tokens", "4", "--teacher-forced-tokens", "4", "--baseline", "b.json",
                           "--no-layer-suite")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*NOT GATED: baseline b.json refused, not compared*rows: baseline 3 vs run 2*"])
    assert b.read_bytes() == written

    # 4. another model, same settings: compared, and the numbers that moved are listed
    r = pytester.runpytest(*tiny(tiny_llama_other_dir, "--baseline", "b.json"))
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*gate FAILED against b.json: departs from the baseline at layer 0*; * of * numbers outside tolerance*",
                            "*teacher_forced.* at layer *vs baseline*allowed*",
                            "wrote obtained reports/b.obtained.json (accept the change: copy it over b.json)",
                            "layerwise: gate FAILED against b.json: departs from the baseline at layer 0 (the final norm or the embeddings); * of * numbers outside tolerance"])
    res = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert res["tests"][0]["outcome"] == "failed" and "outside tolerance" in res["tests"][0]["message"]
    assert res["gate"]["status"] == "failed" and res["gate"]["outside"] == len(res["gate"]["deviations"]) > 0
    assert b.read_bytes() == written
    obtained = json.loads((pytester.path / "reports" / "b.obtained.json").read_text())
    assert obtained["schema"] == "pytest-layerwise/baseline" and obtained["lens"] != base["lens"]

    # 4b. accepting the change is one file copy
    shutil.copy(pytester.path / "reports" / "b.obtained.json", b)
    pytester.runpytest(*tiny(tiny_llama_other_dir, "--baseline", "b.json")).assert_outcomes(passed=1)
    b.write_bytes(written)

    # 5. --update-baseline is the only way to replace it
    pytester.runpytest(*tiny(tiny_llama_other_dir, "--update-baseline", "--baseline", "b.json")).assert_outcomes(skipped=1)
    assert b.read_bytes() != written
    pytester.runpytest(*tiny(tiny_llama_other_dir, "--baseline", "b.json")).assert_outcomes(passed=1)


def test_tolerance_option_reaches_the_gate(pytester, tiny_llama_dir, tiny_llama_other_dir):
    shutil.copy(ROOT / "layer_tests" / "test_baseline.py", pytester.path / "test_baseline.py")
    pytester.runpytest(*tiny(tiny_llama_dir, "--update-baseline", "--baseline", "b.json")).assert_outcomes(skipped=1)
    from layerwise.config import DEFAULT_TOLERANCES

    loose = ",".join(f"{m}=1000:0" for m in DEFAULT_TOLERANCES)
    pytester.runpytest(*tiny(tiny_llama_other_dir, "--baseline", "b.json", "--tolerance", loose)).assert_outcomes(passed=1)


# -- pytest-xdist ----------------------------------------------------------------------------------


def test_xdist_results_are_merged_written_once_and_match_a_serial_run(pytester, tiny_llama_dir, lw_env):
    """The tests that use the model share one worker (loadgroup), so the model loads once; the
    controller takes that worker's results (pytest_testnodedown), records every test's outcome and
    writes the files once."""
    pytest.importorskip("xdist")
    pytester.makeconftest(COUNT_LOADS)
    pytester.makepyfile(test_user=USER_TESTS)
    pytester.makepyfile(test_more="""
        def test_rows(layerwise_results):
            assert layerwise_results["run"]["data"]["rows"] == 3

        def test_plain():
            pass
    """)
    result = pytester.runpytest_subprocess(*tiny(tiny_llama_dir, "-n", "2", "-p", "no:cacheprovider"))
    result.assert_outcomes(passed=4, failed=1, skipped=1)
    out = result.stdout.str()
    assert len((pytester.path / "model_loads.txt").read_text().split()) == 1  # once, not once per worker
    assert out.count("wrote results") == 1 and out.count("wrote report") == 1 and out.count("= layerwise =") == 1
    result.stdout.fnmatch_lines(["exit layer*BLEU*", "         1 *", "         2 *"])
    par = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert len(par["tests"]) == 6
    assert sorted(t["outcome"] for t in par["tests"]) == ["failed", "passed", "passed", "passed", "passed", "skipped"]
    assert [e["layer"] for e in par["exits"]] == [1, 2] and len(par["rows"]) == 3
    assert (pytester.path / "reports" / "report.html").stat().st_size > 0
    assert sorted(p.name for p in (pytester.path / "reports").iterdir()) == ["report.html", "results.json"]

    (pytester.path / "conftest.py").unlink()
    pytester.runpytest(*tiny(tiny_llama_dir, "--results-json", "ser.json")).assert_outcomes(passed=4, failed=1, skipped=1)
    ser = json.loads((pytester.path / "ser.json").read_text())
    for d in (par, ser):
        d.pop("timing")
        d["run"].pop("versions")
        d["run"].pop("id")  # each write's own run id
    # Another process may round the last printed digit differently (float32 kernels can differ
    # across processes); everything else must be identical.
    assert _approx_equal(par, ser)


def _approx_equal(a, b, path="$"):
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ"
        return all(_approx_equal(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: lengths differ"
        return all(_approx_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 2e-6, f"{path}: {a} != {b}"
        return True
    assert a == b, f"{path}: {a!r} != {b!r}"
    return True


# -- nested in-process sessions (pytester users) ---------------------------------------------------


def test_outcomes_survive_a_nested_in_process_run(pytester, tiny_llama_dir):
    pytester.makepyfile(test_outer="""
        pytest_plugins = ["pytester"]

        def test_nested(pytester):
            pytester.makepyfile(test_inner="def test_x():\\n    pass\\n")
            pytester.runpytest().assert_outcomes(passed=1)

        def test_after(layerwise_results):
            assert layerwise_results["exits"]
    """)
    pytester.runpytest(*tiny(tiny_llama_dir)).assert_outcomes(passed=2)
    res = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert sorted(t["nodeid"] for t in res["tests"]) == ["test_outer.py::test_after", "test_outer.py::test_nested"]


# -- the shipped suite: passes on the default model, fails on random weights -----------------------


@pytest.mark.slow
def test_shipped_suite_fails_on_random_weights(pytester, lw_env, random_default_arch_dir):
    # The suite joins the run by itself (the model is named); it passing on the default model is
    # shown from an installed wheel in tests/test_wheel.py.
    result = pytester.runpytest(f"--model={random_default_arch_dir}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    res = json.loads((pytester.path / "reports" / "results.json").read_text())
    by_id = {t["nodeid"].split("::")[-1]: t for t in res["tests"]}
    ent = by_id["test_entropy_falls_with_depth"]
    assert ent["outcome"] == "failed"
    assert "layer 30 (the model's output) has mean entropy" in ent["message"] or "layers 1..23" in ent["message"]
    q = by_id["test_final_exit_beats_every_earlier_exit"]
    assert q["outcome"] == "failed"
    assert "final exit layer 30 scores" in q["message"] and "exit layer " in q["message"]
    # the full messages in the terminal name layers and numbers
    result.stdout.fnmatch_lines(["*layer 30 (the model's output) has mean entropy * nats, above 0.5 × ln V = 5.40*"])
    result.stdout.fnmatch_lines(["*final exit layer 30 scores *, not ≥ exit layer * + *"])
    # the model-independent checks still hold: lens and early exit agree with the model at L
    assert by_id["test_lens_at_final_layer_equals_model_logits"]["outcome"] == "passed"
    assert by_id["test_early_exit_at_final_layer_equals_generate"]["outcome"] == "passed"
    print({k: (v["outcome"], v["message"][:300]) for k, v in by_id.items()})


def test_ctrl_c_during_the_sweep_leaves_previous_files_intact(pytester, tiny_llama_dir):
    """Interrupt inside the early-exit decoding itself (not between tests)."""
    old = _old_outputs(pytester.path)
    # In a subprocess: the conftest replaces a module attribute, which must not leak into this one.
    pytester.makeconftest("""
        import layerwise.decoding

        def _interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        layerwise.decoding.generate_exits = _interrupted
    """)
    pytester.makepyfile(test_user="""
        def test_a(layerwise_results):
            assert layerwise_results["exits"]
    """)
    result = pytester.runpytest_subprocess(*tiny(tiny_llama_dir))
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    _assert_untouched(pytester.path, old)


# -- the shipped suite joins a run when the model is named (issue #11) -----------------------------

SUITE_IDS = ["layerwise/layer_tests/test_baseline.py::test_matches_baseline",
             "layerwise/layer_tests/test_lens.py::test_entropy_falls_with_depth"]


def _collected(result: pytest.RunResult) -> list[str]:
    return [ln.strip() for ln in result.outlines if "::" in ln and not ln.startswith(("ERROR", "FAILED"))]


def test_naming_the_model_adds_the_shipped_suite_with_readable_node_ids(pytester, tiny_llama_dir):
    pytester.makeconftest(HEAVY_PROBE)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(f"--model={tiny_llama_dir}", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    ids = _collected(result)
    assert [i for i in ids if i.startswith("test_user.py")] == [f"test_user.py::{t}" for t in
                                                               ("test_mid", "test_generations", "test_fails", "test_skips")]
    suite = [i for i in ids if i.startswith("layerwise/layer_tests/")]
    assert len(suite) >= 9 and all(x in suite for x in SUITE_IDS), ids
    assert len(set(ids)) == len(ids)  # nothing twice
    assert json.loads((pytester.path / "heavy_modules.json").read_text()) == []  # collecting loads no model


@pytest.mark.parametrize("how", ["ini", "cli"])
def test_the_suite_joins_from_the_ini_and_stays_out_when_asked(pytester, tiny_llama_dir, how):
    if how == "ini":
        pytester.makeini(f"[pytest]\nlayerwise_model = {tiny_llama_dir}\n")
        joined = pytester.runpytest("--collect-only", "-q")
        left_out = pytester.runpytest("--collect-only", "-q", "--no-layer-suite")
        pytester.makeini(f"[pytest]\nlayerwise_model = {tiny_llama_dir}\nlayerwise_layer_suite = false\n")
        left_out_ini = pytester.runpytest("--collect-only", "-q")
    else:
        joined = pytester.runpytest(f"--model={tiny_llama_dir}", "--collect-only", "-q")
        left_out = left_out_ini = pytester.runpytest(f"--model={tiny_llama_dir}", "--collect-only", "-q", "--no-layer-suite")
    assert any(i.startswith("layerwise/layer_tests/") for i in _collected(joined))
    for r in (left_out, left_out_ini):
        assert not any("layer_tests" in i for i in _collected(r)), r.stdout.str()


def test_a_project_that_does_not_use_layerwise_is_unchanged(pytester):
    pytester.makeconftest(HEAVY_PROBE)
    pytester.makepyfile(test_plain="def test_ok():\n    assert True\n")
    before = set(pytester.path.iterdir())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "layer_tests" not in out and "= layerwise =" not in out and "GATED" not in out
    new = {p.name for p in set(pytester.path.iterdir()) - before}
    assert not new & {"reports", "baselines"}, new  # nothing written
    assert json.loads((pytester.path / "heavy_modules.json").read_text()) == []


def test_pyargs_runs_the_suite_once(pytester, tiny_llama_dir):
    result = pytester.runpytest("--pyargs", "layerwise.layer_tests", f"--model={tiny_llama_dir}", "--collect-only", "-q")
    ids = _collected(result)
    assert any("test_matches_baseline" in i for i in ids) and len(set(ids)) == len(ids), ids
    assert sum("test_matches_baseline" in i for i in ids) == 1


def test_require_baseline_turns_not_gated_into_a_failure(pytester, tiny_llama_dir):
    """A local non-default model, no baseline anywhere: NOT GATED, and with --require-baseline exit 1."""
    args = [f"--model={tiny_llama_dir}", "--bertscore-model", "none", "--limit", "3", "--max-new-tokens", "4",
            "--teacher-forced-tokens", "4", "-k", "matches_baseline"]
    plain = pytester.runpytest(*args)
    plain.assert_outcomes(skipped=1)
    assert plain.ret == pytest.ExitCode.OK
    required = pytester.runpytest(*args, "--require-baseline")
    required.assert_outcomes(failed=1)
    assert required.ret == pytest.ExitCode.TESTS_FAILED
    required.stdout.fnmatch_lines([
        "*NOT GATED: no baseline for model '*tiny-llama*' (looked for *baselines*tiny-llama*.json*(--require-baseline)",
        "layerwise: NOT GATED: no baseline for model*"])
    # the same through the ini key
    pytester.makeini("[pytest]\nlayerwise_require_baseline = true\n")
    pytester.runpytest(*args).assert_outcomes(failed=1)


def test_update_without_a_path_writes_the_project_baseline_then_gates_with_it(pytester, tiny_llama_dir):
    args = [f"--model={tiny_llama_dir}", *TINY_ARGS[:-1], "-k", "matches_baseline"]
    pytester.runpytest(*args, "--update-baseline").assert_outcomes(skipped=1)
    written = pytester.path / "baselines" / f"{tiny_llama_dir.name}.json"
    assert json.loads(written.read_text())["schema"] == "pytest-layerwise/baseline"
    r = pytester.runpytest(*args, "--require-baseline")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines([f"layerwise: gate PASSED against baselines/{written.name} (* numbers within tolerance)"])


def test_the_baseline_records_where_it_was_made_and_a_difference_is_a_warning(pytester, tiny_llama_dir):
    args = [f"--model={tiny_llama_dir}", *TINY_ARGS[:-1], "-k", "matches_baseline", "--baseline", "b.json"]
    pytester.runpytest(*args, "--update-baseline").assert_outcomes(skipped=1)
    base = json.loads((pytester.path / "b.json").read_text())
    made = base["made_with"]
    assert made["device"] == "cpu" and made["dtype"] == "float32" and made["quantization"] is None
    assert made["gpu"] is None and made["adapter"] is None and "torch" in made["versions"]
    assert base["created"] and base["model"]["name"] == tiny_llama_dir.name
    base["made_with"]["dtype"] = "bfloat16"
    base["made_with"]["versions"]["transformers"] = "0.0.1"
    (pytester.path / "b.json").write_text(json.dumps(base))
    r = pytester.runpytest(*args, "--summary-md", "digest.md")
    r.assert_outcomes(passed=1)  # a warning, not a refusal
    r.stdout.fnmatch_lines(["warning: dtype differs from the baseline's: 'bfloat16' there, 'float32' here",
                            "warning: library versions differ from the baseline's: transformers 0.0.1 → *",
                            "layerwise: gate PASSED against b.json*"])
    html = (pytester.path / "reports" / "report.html").read_text(encoding="utf-8")
    assert "dtype differs from the baseline" in html
    assert f"b.json ({tiny_llama_dir.name}, {base['created']})" in html  # the report names the baseline
    md = (pytester.path / "digest.md").read_text(encoding="utf-8")
    assert md.startswith("## layerwise") and "✅ **gate PASSED against b.json" in md and "report.html" in md


def test_summary_md_defaults_to_github_step_summary_and_appends(pytester, tiny_llama_dir, monkeypatch):
    step = pytester.path / "step_summary.md"
    step.write_text("earlier step's summary\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    args = [f"--model={tiny_llama_dir}", *TINY_ARGS[:-1], "-k", "matches_baseline", "--baseline", "b.json"]
    pytester.runpytest(*args, "--update-baseline")
    text = step.read_text()
    assert text.startswith("earlier step's summary\n## layerwise") and "NOT GATED: the baseline b.json is being written" in text


def test_junit_carries_the_key_numbers(pytester, tiny_llama_dir):
    import xml.etree.ElementTree as ET

    args = [f"--model={tiny_llama_dir}", *TINY_ARGS[:-1], "--junitxml", "junit.xml", "-k", "lens.py or quality.py"]
    pytester.runpytest(*args)
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "junit.xml").iter("property")}
    for key in ("entropy_trend_rho", "final_entropy", "kl_trend_rho", "agreement_trend_rho", "exit2_rougeL", "exit1_bleu"):
        assert key in props, props
    float(props["entropy_trend_rho"])


# -- gating a results file: no model anywhere (issue #15) -------------------------------------------


def test_gate_from_a_results_file_in_a_folder_with_no_model(pytester, tiny_llama_dir, tmp_path):
    """CI computes on the GPU machines (``layerwise run``, torchrun), then gates anywhere:
    ``pytest --results FILE`` runs the shipped suite and the gate on the file, loading no model."""
    from layerwise.cli import main

    computed = tmp_path / "computed"
    args = [f"--model={tiny_llama_dir}", "--bertscore-model", "none", "--limit", "3", "--max-new-tokens", "4",
            "--teacher-forced-tokens", "4"]
    assert main(["run", *args, "-o", str(computed / "results.json"), "--report", str(computed / "report.html")]) == 0
    base = tmp_path / "base.json"
    from layerwise.baseline import write_baseline
    from layerwise.results import load_results

    write_baseline(load_results(computed / "results.json"), base)
    pytester.makeconftest(HEAVY_PROBE)
    result = pytester.runpytest_subprocess(f"--results={computed / 'results.json'}", f"--baseline={base}",
                                           "--require-baseline", "-rs", "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert "layerwise: gate PASSED against" in out, out
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped") == 4  # the three tests that need the model itself, and drift (no reference)
    assert "needs the model; this run gates the results file" in out
    heavy = json.loads((pytester.path / "heavy_modules.json").read_text())
    assert "torch" not in heavy and "transformers" not in heavy, heavy  # no model, no torch
    assert (pytester.path / "reports" / "report.html").is_file()
    assert not (pytester.path / "reports" / "results.json").exists()  # the input is not copied unless asked
    assert not (pytester.path / "baselines").exists()


COUNT_LOADS = """
import os
import layerwise.models

_load = layerwise.models.load_model

def _counted(*args, **kwargs):
    with open("model_loads.txt", "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    return _load(*args, **kwargs)

layerwise.models.load_model = _counted
"""


def test_cache_results_skips_the_model_when_nothing_that_matters_changed(pytester, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    pytester.makeconftest(COUNT_LOADS)
    pytester.makepyfile(test_user="def test_mid(exit_metrics):\n    assert exit_metrics[2]['rougeL'] >= 0\n")
    args = [*tiny(tiny_llama_dir), "--cache-results", "--results-json", "r1.json"]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert len((pytester.path / "model_loads.txt").read_text().split()) == 1
    # the user edits their own test: the evaluation comes from the cache, the model does not load
    pytester.makepyfile(test_user="def test_mid(exit_metrics):\n    assert exit_metrics[1]['rougeL'] >= 0\n")
    r = pytester.runpytest_subprocess(*tiny(tiny_llama_dir), "--cache-results", "--results-json", "r2.json")
    r.assert_outcomes(passed=1)
    assert "results from the cache" in r.stdout.str()
    assert len((pytester.path / "model_loads.txt").read_text().split()) == 1
    one, two = (json.loads((pytester.path / f).read_text()) for f in ("r1.json", "r2.json"))
    for d in (one, two):
        for k in ("timing", "tests", "gate"):
            d.pop(k)
        d["run"].pop("id")
    assert one == two
    # a setting that changes numbers misses the cache
    r = pytester.runpytest_subprocess(*tiny(tiny_llama_dir), "--cache-results", "--max-new-tokens", "3")
    r.assert_outcomes(passed=1)
    assert len((pytester.path / "model_loads.txt").read_text().split()) == 2
