"""Benchmark: what the load-time proof of the lens costs, against one plain forward of the same
model on the same probe, measured in one run (medians of --reps).

    python bench/proof.py                   # the default model and a tiny random Llama, CPU
    python bench/proof.py --reps 9 --threads 2

The proof runs three forwards of the probe (the model; its decoder the way the lens calls it; its
decoder on the probe left-padded) plus a few head calls, so about 3 forwards is what it should
cost; discovery, for a family without a table row, adds one more traced forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def _median(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, model: Any, reps: int) -> None:
    import torch

    from layerwise.discover import discover, probe_ids
    from layerwise.proof import PROBE_LENGTH, proven_adapter

    adapter, record = proven_adapter(model)
    vocab = int(getattr(adapter.head, "out_features", None) or adapter.head.weight.shape[0])
    ids = torch.tensor([probe_ids(vocab, PROBE_LENGTH)])

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    forward()
    t_fwd = _median(forward, reps)
    t_proof = _median(lambda: proven_adapter(model), reps)
    t_disc = _median(lambda: discover(model), reps)
    print(f"{name}: parts {record['parts']}; one forward of {PROBE_LENGTH} tokens {t_fwd * 1e3:.1f} ms; "
          f"proof {t_proof * 1e3:.1f} ms = {t_proof / t_fwd:.1f} forwards; "
          f"discovery alone {t_disc * 1e3:.1f} ms = {t_disc / t_fwd:.1f} forwards")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_families import build

    from layerwise.models import load_model

    print(f"torch threads: {torch.get_num_threads()}, medians of {args.reps}")
    measure("tiny llama (4 blocks, width 32)", build("llama"), args.reps)
    measure("tiny jamba (discovered)", build("jamba"), args.reps)
    measure("smollm2-135m (30 blocks)", load_model("smollm2-135m").model, args.reps)


if __name__ == "__main__":
    main()
