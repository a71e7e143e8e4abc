"""How the whole evaluation's cost grows with rows and new tokens, on the default model.

Part 1, the run as users run it (``runner.run_sweep``, the default batch of 20 rows): for rows
20 / 80 / 320 (the shipped 62-row sample, repeated in order past its end) and new tokens 64 / 256,
the time of each phase (the teacher-forced + first-token lens; generation of every exit) and the
process's peak resident memory over the weights (``VmRSS`` sampled every 20 ms, in a fresh process per
row count). Greedy decoding is deterministic, so the 64-token run is the first 64 tokens of the
256-token run: one process decodes 256 tokens per batch and its generation time and memory peak
are also read at each batch's 64th token (the same work as a run with 64 new tokens).

Part 2, decode time per step against batch rows: one batch of B prompts (B = 20, 80, 320; every
exit decodes each, so 4·B decode rows), a fixed number of steps, the median time of a step.

Run (after ``scripts/setup.sh``; ~45 min on 2 CPU cores)::

    .venv/bin/python bench/scaling.py
    .venv/bin/python bench/scaling.py --rows 20,80 --tokens 64 --step-rows 20,80   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30


def rss_bytes() -> int:
    """Resident memory: anonymous + file-backed (the weights may be mapped from safetensors)."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


class Peak(threading.Thread):
    """The peak of this process's resident memory, overall and while ``within_64`` is set."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = self.peak_64 = 0
        self.within_64 = True
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            a = rss_bytes()
            self.peak = max(self.peak, a)
            if self.within_64:
                self.peak_64 = max(self.peak_64, a)
            time.sleep(0.02)


class StepClock:
    """A progress for ``run_sweep``: notes the time of every decode step, and whether the
    current batch is past its 64th token (for the memory peak of the 64-token run)."""

    def __init__(self, peak: Peak, first: int) -> None:
        self.peak, self.first = peak, first
        self.gen_first = 0.0  # generation time up to each batch's `first`-th token
        self._batch_start = 0.0
        self._n = 0

    def say(self, _line: str) -> None:
        pass

    def phase(self, name: str, total: Any = None, unit: str = "it") -> Any:
        clock = self

        class _Phase:
            seconds = None

            def update(self, n: int = 1) -> None:
                if name != "generate":
                    return
                clock._n += n  # after s steps a row holds s + 1 tokens (the first came from the prefill)
                if clock._n == clock.first - 1 and n == 1:
                    clock.gen_first += time.perf_counter() - clock._batch_start
                    clock.peak.within_64 = False

            def note(self, _text: str) -> None:
                pass

            def __enter__(self) -> "_Phase":
                return self

            def __exit__(self, *exc: Any) -> None:
                pass

        return _Phase()


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from layerwise.config import Decoding
    from layerwise.data import default_prompts_path, load_examples
    from layerwise.decoding import default_exits
    from layerwise.models import load_model
    from layerwise.runner import RunConfig, encode, sweep_parts

    peak = Peak()
    peak.start()
    bundle = load_model(args.model, device="cpu")
    weights = bundle.info["weight_bytes"]
    tok = bundle.tokenizer
    ex = load_examples(default_prompts_path(), None)
    rows = [ex[i % len(ex)] for i in range(args.child_rows)]
    cfg = RunConfig(decoding=Decoding(max_new_tokens=max(args.tokens_list)))  # layerwise run's defaults otherwise
    enc = encode(cfg, rows, tok, bundle.model, default_prompts_path())  # as the runner encodes them
    prompt_ids, ref_ids = enc.prompt_ids, enc.ref_ids
    exits = default_exits(bundle.adapter.num_layers)
    first = min(args.tokens_list)
    clock = StepClock(peak, first)

    # Per batch: the lens, then the decode (run_sweep imports generate_exits at call time, so the
    # batch's start is noted here); StepClock sees each decode step.
    from layerwise import decoding

    real = decoding.generate_exits

    def timed_generate(*a: Any, **kw: Any) -> Any:
        clock._batch_start = time.perf_counter()
        clock._n = 0
        peak.within_64 = True
        out = real(*a, **kw)
        if clock._n < first - 1:  # every row stopped before the 64th token: all of it counts
            clock.gen_first += time.perf_counter() - clock._batch_start
        return out

    decoding.generate_exits = timed_generate
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            parts = sweep_parts(bundle, prompt_ids, ref_ids, exits, cfg, progress=clock)  # type: ignore[arg-type]
            total = time.perf_counter() - t0
    finally:
        decoding.generate_exits = real
    peak.stop.set()
    peak.join()
    new_tokens = sum(len(t) for p in parts.parts for per_exit in p.tokens.values() for t in per_exit)
    return {"rows": args.child_rows, "weights": weights, "lens_s": parts.lens_s, "gen_s": parts.gen_s,
            "gen_first_s": clock.gen_first, "total_s": total, "peak": peak.peak, "peak_first": peak.peak_64,
            "positions": sum(sum(p.counts) for p in parts.parts), "new_tokens": new_tokens}


def step_child(args: argparse.Namespace) -> dict[str, Any]:
    """Median decode step time for one batch of ``child_rows`` prompts, every exit."""
    import torch

    from layerwise.config import Decoding
    from layerwise.data import default_prompts_path, format_prompt, load_examples
    from layerwise.decoding import default_exits, generate_exits
    from layerwise.lens import pack_rows
    from layerwise.models import load_model

    bundle = load_model(args.model, device="cpu")
    tok = bundle.tokenizer
    ex = load_examples(default_prompts_path(), None)
    rows = [ex[i % len(ex)] for i in range(args.child_rows)]
    packed = pack_rows([tok.encode(format_prompt(e, "alpaca", tok)) for e in rows], None, tok.pad_token_id or 0)
    exits = default_exits(bundle.adapter.num_layers)
    stamps: list[float] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        g = generate_exits(bundle, packed.ids, packed.mask, exits, Decoding(max_new_tokens=args.steps + 1),
                           on_step=lambda: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([t0] + stamps, stamps)][1:]  # the first interval holds the prefill
    return {"rows": args.child_rows, "decode_rows": args.child_rows * len(exits), "step_s": statistics.median(steps),
            "steps": g.steps, "prompt_len": int(packed.ids.shape[1])}


def spawn(kind: str, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, f"--_child={kind}", "--_rows", str(rows), "--model", args.model,
           "--tokens", ",".join(map(str, args.tokens_list)), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} child ({rows} rows) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="20,80,320")
    ap.add_argument("--tokens", default="64,256")
    ap.add_argument("--step-rows", default="20,80,320", help="batch sizes (prompts) for the decode step time")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_rows", dest="child_rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tokens_list = sorted(int(t) for t in args.tokens.split(","))
    if len(args.tokens_list) > 2:
        raise SystemExit("--tokens takes one or two counts (the smaller is read inside the larger run)")
    if args._child:
        import torch

        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(child(args) if args._child == "sweep" else step_child(args)))
        return
    lo, hi = args.tokens_list[0], args.tokens_list[-1]
    print(f"model {args.model}, CPU threads {__import__('os').cpu_count()}, batch 20 rows, exits 8/15/23/30, greedy")
    runs = []
    for r in (int(x) for x in args.rows.split(",")) if args.rows else ():
        t = time.perf_counter()
        runs.append(spawn("sweep", r, args))
        print(f"  rows {r}: {time.perf_counter() - t:.0f} s {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    steps = []
    for r in (int(x) for x in args.step_rows.split(",")) if args.step_rows else ():
        steps.append(spawn("step", r, args))
        print(f"  step rows {r}: {json.dumps(steps[-1])}", file=sys.stderr, flush=True)

    print()
    print("| rows | new tokens | lens | generation | lens + generation | per row | peak memory − weights |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base: dict[int, float] = {}
    for run in runs:
        for n, gen, peak in ((lo, run["gen_first_s"], run["peak_first"]), (hi, run["gen_s"], run["peak"])) if lo != hi else ((hi, run["gen_s"], run["peak"]),):
            tot = run["lens_s"] + gen
            base.setdefault(n, tot / run["rows"])
            print(f"| {run['rows']} | {n} | {run['lens_s']:.1f} s | {gen:.1f} s | {tot:.1f} s | {tot / run['rows']:.2f} s "
                  f"(×{tot / run['rows'] / base[n]:.2f}) | {(peak - run['weights']) / GiB:.2f} GiB |")
    if not runs:
        print("(no sweep runs)")
    else:
        print(f"\nweights {runs[0]['weights'] / GiB:.2f} GiB (float32). Lens: {runs[0]['positions']} teacher-forced positions per "
              f"{runs[0]['rows']} rows; the {lo}-token rows are each batch's first {lo} tokens of the {hi}-token run.")
    if steps:
        print("\n| batch prompts | decode rows | prompt length | time per decode step | per decode row |")
        print("| --- | --- | --- | --- | --- |")
        for s in steps:
            print(f"| {s['rows']} | {s['decode_rows']} | {s['prompt_len']} | {s['step_s'] * 1000:.0f} ms | {s['step_s'] / s['decode_rows'] * 1000:.2f} ms |")
    if len(runs) > 1:
        growth = [(r["lens_s"] + r["gen_s"]) / r["rows"] for r in runs]
        print(f"\nper_row_cost_ratio = {max(growth) / min(growth):.2f}  (largest / smallest time per row at {hi} tokens; 1 = linear in rows)")
        peaks = [r["peak"] - r["weights"] for r in runs]
        print(f"peak_over_weights_spread = {(max(peaks) - min(peaks)) / GiB:.2f} GiB  (flat in rows: everything is streamed)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
