"""``layerwise run`` under torchrun: rows shared between processes, results written once by rank 0,
byte for byte those of one process with the same threads per process (minus timing and the run
id). CPU processes, gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(cmd: list[str], cwd, env) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=600)


def _strip(path) -> dict:
    d = json.loads(path.read_text())
    d.pop("timing")
    d["run"].pop("id")
    return d


@pytest.mark.parametrize("batch_size", [1, 2])
def test_torchrun_two_processes_equal_one_process(tiny_llama_dir, tmp_path, batch_size):
    pytest.importorskip("torch.distributed")
    args = ["run", f"--model={tiny_llama_dir}", "--bertscore-model", "none", "--limit", "5", "--max-new-tokens", "6",
            "--teacher-forced-tokens", "6", "--batch-size", str(batch_size)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    # torchrun gives each process one thread; so does the single process here: float32 reductions
    # split over another number of threads round differently in the last bit
    env["OMP_NUM_THREADS"] = "1"
    one = _run([sys.executable, "-m", "layerwise.cli", *args, "-o", "one.json", "--report", "one.html"], tmp_path, env)
    assert one.returncode == 0, one.stderr
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "layerwise.cli", *args, "-o", "two.json", "--report", "two.html"], tmp_path, env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("layerwise: wrote") == 2  # results and report, once (rank 0)
    assert _strip(tmp_path / "one.json") == _strip(tmp_path / "two.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.html", "one.json", "two.html", "two.json"]
