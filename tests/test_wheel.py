"""The gate a team installs: the wheel, installed into a fresh virtualenv, used from an empty folder.

The wheel is built from this checkout (``pip wheel --no-build-isolation``: no network) and
installed without dependencies into a new venv whose other packages come from this project's
venv through a ``.pth`` line (torch and the rest are reused, not downloaded). The editable install
of this checkout stays invisible there: only ``.pth`` files of site directories run, so the new
venv imports ``layerwise`` from the wheel — checked below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(ROOT)], text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("pytest_layerwise-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "reuse_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                       text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def _env() -> dict[str, str]:
    from layerwise.models import cache_root

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["LAYERWISE_CACHE"] = str(cache_root())  # the converted default model, as this session has it
    env.pop("GITHUB_STEP_SUMMARY", None)
    return env


def test_the_wheel_carries_the_suite_its_data_and_declares_what_it_needs(wheel, fresh_venv):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("layerwise/plugin.py", "layerwise/layer_tests/__init__.py", "layerwise/layer_tests/test_lens.py",
              "layerwise/layer_tests/test_baseline.py", "layerwise/layer_tests/README.md",
              "layerwise/fixtures/baselines/smollm2-135m.json", "layerwise/fixtures/alpaca_cleaned_sample.jsonl",
              "layerwise/templates/report.html.j2"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "bench/", "layer_tests/")) for n in names)
    # Every dependency the wheel declares is satisfied by what the fresh venv sees.
    code = (
        "import importlib.metadata as m, json\n"
        "from packaging.requirements import Requirement\n"
        "d = m.distribution('pytest-layerwise')\n"
        "bad = []\n"
        "for r in map(Requirement, d.requires or []):\n"
        "    if r.marker and not r.marker.evaluate({'extra': ''}): continue\n"
        "    v = m.version(r.name)\n"
        "    if not r.specifier.contains(v, prereleases=True): bad.append(f'{r} (have {v})')\n"
        "import layerwise\n"
        "print(json.dumps({'bad': bad, 'file': layerwise.__file__}))\n"
    )
    r = _run([str(fresh_venv / "bin" / "python"), "-c", code], fresh_venv, _env())
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["bad"] == []
    assert got["file"].startswith(str(fresh_venv)), got["file"]  # the wheel's copy, not this checkout


def test_pyargs_finds_the_installed_suite(fresh_venv, tmp_path):
    r = _run([str(fresh_venv / "bin" / "python"), "-m", "pytest", "--pyargs", "layerwise.layer_tests", "--collect-only",
              "-q", "-p", "no:cacheprovider"], tmp_path, _env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_matches_baseline" in r.stdout and "test_entropy_falls_with_depth" in r.stdout


@pytest.mark.slow
def test_empty_folder_runs_the_shipped_suite_and_the_gate_passes(fresh_venv, tmp_path, default_bundle):
    """``pytest --model smollm2-135m`` in an empty folder: the shipped suite on the default model,
    gated against the baseline shipped in the wheel; report and results written."""
    cmd = [str(fresh_venv / "bin" / "python"), "-m", "pytest", "--model", "smollm2-135m", "-p", "no:cacheprovider",
           "--require-baseline", "-rs"]
    r = _run(cmd, tmp_path, _env())
    out = r.stdout + r.stderr
    print("$ " + " ".join(["pytest", *cmd[3:]]) + f"\nexit code {r.returncode}\n" + r.stdout[-4000:])
    assert r.returncode == 0, out
    assert "failed" not in r.stdout.splitlines()[-1] and " passed" in r.stdout.splitlines()[-1], out
    assert "layerwise: gate PASSED against the shipped baseline for smollm2-135m" in r.stdout, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["report.html", "results.json"]
    res = json.loads((tmp_path / "reports" / "results.json").read_text())
    assert res["gate"]["status"] == "passed" and res["run"]["model"]["name"] == "SmolLM2-135M-Instruct"
    ids = {t["nodeid"]: t["outcome"] for t in res["tests"]}
    assert ids["layerwise/layer_tests/test_baseline.py::test_matches_baseline"] == "passed"
    # every shipped test ran and passed, except the drift check, which is opt-in (--drift-against)
    drift = "layerwise/layer_tests/test_drift.py::test_drift_against_the_reference_within_limit"
    assert ids.pop(drift) == "skipped", ids
    assert len(ids) >= 9 and set(ids.values()) == {"passed"}, ids
    assert "no reference model: pass --drift-against SPEC" in r.stdout, out
