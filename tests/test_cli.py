"""The ``layerwise`` command line: report / compare, error handling, lazy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise.cli import SUBCOMMANDS, build_parser, main

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "results_tiny.json")
TINY_B = str(DATA / "results_tiny_b.json")
SCRIPT = Path(sys.executable).with_name("layerwise")


def assert_one_line_error(capsys, *needles: str) -> str:
    _out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("layerwise: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- good paths

def test_report(tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert main(["report", TINY, "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 8
    assert f"wrote {out}" in capsys.readouterr().out


def test_report_with_baseline(tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", TINY, "-o", str(out), "--baseline", TINY_B]) == 0
    html = out.read_text(encoding="utf-8")
    assert 'class="delta worse">-2.50<' in html


def test_compare(tmp_path):
    out = tmp_path / "compare.html"
    assert main(["compare", TINY, TINY_B, "-o", str(out), "--labels", "main", "pr"]) == 0
    html = out.read_text(encoding="utf-8")
    assert "Deltas are pr − main" in html and html.count("<svg") == 3


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "report" in out and "compare" in out
    assert main(["report", "--help"]) == 0
    assert "--baseline" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("layerwise ")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: layerwise" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main(["report", TINY]) == 2  # -o missing
    assert "required" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_adding_a_subcommand_is_one_function(monkeypatch):
    def add_hello(sub):
        p = sub.add_parser("hello", help="say hello")
        p.set_defaults(func=lambda args: 7)

    monkeypatch.setattr(sys.modules["layerwise.cli"], "SUBCOMMANDS", [*SUBCOMMANDS, add_hello])
    assert main(["hello"]) == 7
    assert "hello" in build_parser().format_help()


# --------------------------------------------------------------------------- errors

def test_missing_results_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.json"), "-o", str(tmp_path / "r.html")]) == 2
    assert_one_line_error(capsys, "does not exist")
    assert not (tmp_path / "r.html").exists()


def test_corrupt_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "pytest-layerwise/results", ')
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    assert_one_line_error(capsys, "not valid JSON")


def test_not_utf8(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    assert_one_line_error(capsys, "UTF-8")


@pytest.mark.parametrize("change, needle", [
    ({"schema_version": 2}, "schema version 2"),
    ({"schema": "something/else"}, "not a layerwise results file"),
])
def test_wrong_schema(tmp_path, capsys, change, needle):
    data = json.loads(Path(TINY).read_text(encoding="utf-8"))
    data.update(change)
    f = tmp_path / "other.json"
    f.write_text(json.dumps(data))
    assert main(["report", str(f), "-o", str(tmp_path / "r.html")]) == 2
    assert_one_line_error(capsys, needle)
    assert main(["compare", TINY, str(f), "-o", str(tmp_path / "c.html")]) == 2
    assert_one_line_error(capsys, needle)


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), ("{", "not valid JSON"), ('{"exits": 3}', 'no "exits" list'),
])
def test_bad_baseline(tmp_path, capsys, content, needle):
    base = tmp_path / "base.json"
    if content is not None:
        base.write_text(content)
    assert main(["report", TINY, "-o", str(tmp_path / "r.html"), "--baseline", str(base)]) == 2
    assert_one_line_error(capsys, needle)


def test_output_is_a_folder(tmp_path, capsys):
    assert main(["report", TINY, "-o", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "is a folder")


def test_failed_run_keeps_the_old_report(tmp_path, capsys):
    out = tmp_path / "r.html"
    out.write_text("old")
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(out)]) == 2
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


# --------------------------------------------------------------------------- process level

def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["compare", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = ("import sys\nfrom layerwise.cli import main\n"
            f"rc = main({argv!r})\n"
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'jinja2', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy, rc)\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] 0" in proc.stdout


def test_console_script_exit_status(tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    ok = subprocess.run([str(SCRIPT), "report", TINY, "-o", str(tmp_path / "r.html")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([str(SCRIPT), "report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.html")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("layerwise: error: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr


def test_calibrate_records_the_spread_and_the_gate_uses_it(tmp_path, tiny_llama_dir, capsys):
    """``layerwise calibrate``: runs varied in batch size and row order; on CPU with greedy decoding
    the spread of every tracked number is (near) zero, and the baseline gates like any other."""
    from layerwise.baseline import load_baseline

    out = tmp_path / "calibrated.json"
    args = ["calibrate", "--runs", "3", f"--model={tiny_llama_dir}", "--bertscore-model", "none", "--limit", "4",
            "--max-new-tokens", "4", "--teacher-forced-tokens", "4", "--batch-size", "4", "-o", str(out)]
    assert main(args) == 0
    base = load_baseline(out)
    assert base["calibration"]["runs"] == 3 and "row order" in base["calibration"]["varied"]
    assert "batch size 4/2/1" in base["calibration"]["varied"][0]
    spread = base["spread"]
    assert set(spread) >= {"exits.bleu", "teacher_forced.entropy", "first_token.top1_agree"}
    widest = max(v for vals in spread.values() for v in vals if v is not None)
    print(f"widest spread over 3 calibration runs: {widest:.3g}")
    assert widest < 1e-4  # batch size and row order move only float rounding
    assert "wrote calibrated baseline" in capsys.readouterr().out
    assert main(["calibrate", "--runs", "1", f"--model={tiny_llama_dir}", "-o", str(tmp_path / "x.json")]) == 2
