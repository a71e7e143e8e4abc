"""Scale-out checks on the default model: torchrun (2 CPU processes) vs one process, and pytest -n 2
vs serial. Prints wall-time and total-CPU-time ratios measured in this one run.

    .venv/bin/python bench/distributed.py [--rows 20] [--batch-size 10] [--skip-xdist]

On a 2-core machine two processes cannot be faster than one that already uses both cores; what this
measures is overhead: the CPU time of the two processes together against the one process
(target ≤ 1.15), and that the results are byte for byte the same (minus timing and run id).
Both runs use one thread per process (torchrun's default), so float32 reductions round alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNT_LOADS = """
import os
import layerwise.models

_load = layerwise.models.load_model

def _counted(*args, **kwargs):
    with open(os.environ["LOADS_FILE"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    return _load(*args, **kwargs)

layerwise.models.load_model = _counted
"""


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds, CPU seconds of the whole process tree (user + system), and the result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode not in (0, 1):
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall, cpu, r


def strip(path: Path) -> dict:
    d = json.loads(path.read_text())
    d.pop("timing")
    d["run"].pop("id")
    d.pop("tests", None)
    d.pop("gate", None)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10, help="rows per batch: batches are what the ranks share")
    ap.add_argument("--skip-xdist", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="layerwise-bench-dist-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = ["run", "--model", "smollm2-135m", "--limit", str(args.rows), "--batch-size", str(args.batch_size)]

    w1, c1, _ = timed([py, "-m", "layerwise.cli", *run, "-o", "one.json", "--report", "one.html"], work, env)
    w2, c2, _ = timed([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "layerwise.cli",
                       *run, "-o", "two.json", "--report", "two.html"], work, env)
    equal = strip(work / "one.json") == strip(work / "two.json")
    print(f"torchrun, default model, {args.rows} rows in batches of {args.batch_size}, 1 thread per process:")
    print(f"  1 process : wall {w1:7.1f} s   cpu {c1:7.1f} s")
    print(f"  2 processes: wall {w2:7.1f} s   cpu {c2:7.1f} s")
    print(f"results_equal = {equal}")
    print(f"torchrun_wall_ratio = {w2 / w1:.3f}")
    print(f"torchrun_cpu_ratio = {c2 / c1:.3f}   (target <= 1.15)")

    if args.skip_xdist:
        return
    tests = work / "suite"
    tests.mkdir()
    (tests / "conftest.py").write_text(COUNT_LOADS)
    (tests / "pytest.ini").write_text("[pytest]\n")
    envx = dict(os.environ)
    base = [py, "-m", "pytest", "--model", "smollm2-135m", "-p", "no:cacheprovider", "-q"]
    envx["LOADS_FILE"] = str(work / "serial_loads.txt")
    ws, cs, _ = timed(base, tests, envx)
    envx["LOADS_FILE"] = str(work / "xdist_loads.txt")
    wx, cx, _ = timed([*base, "-n", "2"], tests, envx)
    ls = len((work / "serial_loads.txt").read_text().split())
    lx = len((work / "xdist_loads.txt").read_text().split())
    print("pytest --model smollm2-135m (the shipped suite), serial vs -n 2:")
    print(f"  serial: wall {ws:7.1f} s   cpu {cs:7.1f} s   model loads {ls}")
    print(f"  -n 2  : wall {wx:7.1f} s   cpu {cx:7.1f} s   model loads {lx}")
    print(f"xdist_model_loads = {lx}")
    print(f"xdist_cpu_ratio = {cx / cs:.3f}")
    print(f"(files in {work})")


if __name__ == "__main__":
    main()
