"""Benchmark: all exit layers in one pass vs plain generate, per-exit truncated generate, and the
original notebook's method; the teacher-forced lens against its floor. Prints every time and
ratio measured in this one run.

    python bench/sweep.py                       # default model, CPU, 20 rows, default exits, 64 tokens
    python bench/sweep.py --device cuda --reps 3
    python bench/sweep.py --rows 4 --tokens 16  # quick

Each time is the median of --reps repetitions (the naive method: one repetition on a subset,
scaled up to the full workload, and labelled as such). Peak RSS of the sweep is measured in a
fresh child process, so the other methods' allocations do not count. The last lines are the
four ratios of issue #18, one per line: ``ratio_ideal``, ``speedup_trunc``, ``lens_vs_floor``,
``full_vs_trunc``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def _prompts(bundle: Any, rows: int, fmt: str) -> tuple[list[list[int]], list[list[int]]]:
    from layerwise.data import default_prompts_path, format_prompt, load_examples

    ex = load_examples(default_prompts_path(), rows)
    tok = bundle.tokenizer
    prompt_ids = [tok.encode(format_prompt(e, fmt, tok)) for e in ex]
    ref_ids = [tok.encode(e.reference, add_special_tokens=False) for e in ex]
    return prompt_ids, ref_ids


def _batch(bundle: Any, prompt_ids: list[list[int]]) -> tuple[Any, Any]:
    from layerwise.lens import pack_rows

    packed = pack_rows(prompt_ids, None, bundle.tokenizer.pad_token_id or 0)
    dev = bundle.device
    return packed.ids.to(dev), packed.mask.to(dev)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], reps: int, device: str) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _truncated(model: Any, adapter: Any, k: int) -> Any:
    """A shallow copy of the model whose block list is cut to k (weights shared, not copied)."""
    import torch

    from layerwise.archs import _resolve

    parent_path, _, attr = adapter.spec.blocks.rpartition(".")
    ref = copy.copy(model)
    # copy every module on the path so the original keeps its blocks
    node_orig, node_copy = model, ref
    parts = parent_path.split(".")
    for part in parts:
        child = copy.copy(getattr(node_orig, part))
        child._modules = dict(child._modules)
        node_copy._modules = dict(node_copy._modules)
        node_copy._modules[part] = child
        node_orig, node_copy = getattr(node_orig, part), child
    node_copy._modules[attr] = torch.nn.ModuleList(list(_resolve(model, adapter.spec.blocks))[:k])
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:k]
    ref.config = cfg
    for part_obj in [ref] + [_resolve(ref, ".".join(parts[: i + 1])) for i in range(len(parts))]:
        if hasattr(part_obj, "config"):
            part_obj.config = cfg
    return ref



def teacher_forced_rows(bundle: Any, prompt_ids: list[list[int]], ref_ids: list[list[int]]) -> tuple[dict[int, Any], Any]:
    """The hidden states of every layer at the teacher-forced positions and their targets, as
    ``runner.run_sweep`` makes them for one batch (one forward over ``prompt | reference``)."""
    from layerwise.lens import pack_rows

    packed = pack_rows(prompt_ids, ref_ids, bundle.tokenizer.pad_token_id or 0)
    dev = bundle.device
    store = bundle.adapter.forward(packed.ids.to(dev), packed.mask.to(dev), select=packed.window)
    flat = {k: v[packed.valid.to(v.device)] for k, v in store.items()}
    return flat, packed.targets[packed.valid]


def head_floor(adapter: Any, hidden: dict[int, Any], rows_per_matmul: int | None = None) -> Callable[[], None]:
    """The lens's floor: the head's matmuls alone (``Adapter.logits``) on the same rows, in the same
    chunks and groups of layers as ``lens.layer_stats`` makes them, same dtype; the inputs are
    normed beforehand, outside the timing."""
    import torch

    L = adapter.num_layers
    n = hidden[L].shape[0]
    with torch.inference_mode():
        x = {k: adapter.prepare(hidden[k], norm=(k != L)) for k in range(L + 1)}
    from layerwise.lens import ROWS_PER_MATMUL, balanced_chunk

    rows_per_matmul = rows_per_matmul or ROWS_PER_MATMUL
    chunk = balanced_chunk(n, rows_per_matmul)
    per_group = max(1, rows_per_matmul // chunk)

    def run() -> None:
        with torch.inference_mode():
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                adapter.logits(x[L][s:e])
                for g in range(0, L, per_group):
                    adapter.logits(torch.cat([x[k][s:e] for k in range(g, min(L, g + per_group))]))

    return run


def _naive_generate(bundle: Any, prompt: list[int], k: int, tokens: int) -> list[int]:
    """The notebook's method: a full forward with hidden states over the whole sequence, no
    cache, for every new token; the next token from layer k's hidden state (with the final norm
    here, so the output is comparable — the cost is the same either way)."""
    import torch

    model, adapter = bundle.model, bundle.adapter
    L = adapter.num_layers
    dev = bundle.device
    ids = torch.tensor([prompt], device=dev)
    out = []
    with torch.inference_mode():
        for _ in range(tokens):
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            h = hs[k][:, -1]
            logits = adapter.unembed(h, norm=(k != L))
            nxt = int(logits.argmax(-1))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=dev)], dim=1)
    return out


def measure_sweep_rss(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: load, then run the sweep once; report peak RSS before and after."""
    import torch

    from layerwise.decoding import Decoding, default_exits
    from layerwise.models import load_model
    from layerwise.runner import RunConfig, run_sweep

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import gc

    # One short forward first, so that every weight page is resident before measuring (safetensors
    # weights are memory-mapped and would otherwise count as the sweep's memory).
    with torch.inference_mode():
        bundle.model(input_ids=torch.tensor([[1, 2, 3]], device=bundle.device))
    gc.collect()
    rss_before = _status_kib("VmRSS") * 1024
    # Reset the kernel's high-water mark so the sweep's own peak is measured, not the load's
    # (from_pretrained briefly holds the weights twice).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    prompt_ids, ref_ids = _prompts(bundle, args.rows, args.prompt_format)
    exits = args.exits or default_exits(bundle.num_layers)
    cfg = RunConfig(decoding=Decoding(max_new_tokens=args.tokens), teacher_forced_tokens=args.tf_tokens)
    run_sweep(bundle, prompt_ids, [r[: args.tf_tokens] for r in ref_ids], exits, cfg)
    peak = _status_kib("VmHWM") * 1024
    gpu_peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return {"load_peak": load_peak, "rss_before": rss_before, "rss_peak": peak,
            "weight_bytes": bundle.info["weight_bytes"], "gpu_peak": gpu_peak}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tf-tokens", type=int, default=32, help="teacher-forced reference tokens for the lens")
    ap.add_argument("--exits", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--prompt-format", default="alpaca")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive-rows", type=int, default=2, help="rows the naive method runs on (scaled up)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--_rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._rss_child:
        print(json.dumps(measure_sweep_rss(args)))
        return 0

    import torch

    from layerwise.decoding import Decoding, default_exits, generate_exits, prefill
    from layerwise.lens import layer_stats
    from layerwise.models import load_model
    from layerwise.runner import RunConfig, run_sweep

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    model, adapter = bundle.model, bundle.adapter
    L = adapter.num_layers
    exits = args.exits or default_exits(L)
    prompt_ids, ref_ids = _prompts(bundle, args.rows, args.prompt_format)
    ids, mask = _batch(bundle, prompt_ids)
    n = args.tokens
    print(f"model {bundle.info['name']} ({L} blocks, {bundle.info['dtype']}, {args.device}), {args.rows} rows, "
          f"exits {exits}, {n} new tokens, greedy, torch threads {torch.get_num_threads()}, reps {args.reps}")

    gen_kwargs = dict(do_sample=False, max_new_tokens=n, pad_token_id=bundle.tokenizer.pad_token_id)

    def plain() -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)

    truncs = {k: (_truncated(model, adapter, k) if k < L else model) for k in exits}

    def trunc() -> Any:
        with torch.inference_mode():
            return [truncs[k].generate(input_ids=ids, attention_mask=mask, **gen_kwargs) for k in exits]

    cfg = RunConfig(decoding=Decoding(max_new_tokens=n), teacher_forced_tokens=args.tf_tokens)
    refs = [r[: args.tf_tokens] for r in ref_ids]
    last: dict[str, Any] = {}

    def sweep() -> Any:
        """Generations for all exits + the lens statistics the same pass gives: every layer's
        distribution at the last prompt position (entropy, KL to final, top-10, raw lens) from
        the prefill, and each exit's entropy at every generated position."""
        pre = prefill(bundle, ids, mask, range(L + 1))
        first = layer_stats(adapter, pre.last_hidden, top_k=10, raw=True)
        g = generate_exits(bundle, ids, mask, exits, Decoding(max_new_tokens=n), prefilled=pre)
        last["sweep"] = g
        return first, g

    def full() -> Any:
        """The whole evaluation pass (runner.run_sweep): adds the teacher-forced lens — every
        layer's distribution at every reference position — and reuses its cache as the prefill."""
        sw = run_sweep(bundle, prompt_ids, refs, exits, cfg)
        last["full"] = sw
        return sw

    plain()  # warm-up
    # Rounds: each method once per round, so that a change of the machine's load between methods
    # shows as spread (printed) rather than as a bias of one method.
    runs: dict[str, list[float]] = {"plain": [], "trunc": [], "sweep": [], "full": []}
    fns = {"plain": plain, "trunc": trunc, "sweep": sweep, "full": full}
    for _ in range(args.reps):
        for name, fn in fns.items():
            runs[name].append(_median_time(fn, 1, args.device))
    t_plain, t_trunc, t_sweep, t_full = (statistics.median(runs[k]) for k in ("plain", "trunc", "sweep", "full"))

    def reps(name: str) -> str:
        return ", ".join(f"{t:.2f}" for t in runs[name])

    print(f"T_plain  {t_plain:8.2f} s   plain generate, all {L} blocks  [{reps('plain')}]")
    print(f"T_trunc  {t_trunc:8.2f} s   HF generate once per exit on a truncated model  [{reps('trunc')}]")
    print(f"T_sweep  {t_sweep:8.2f} s   ours: prefill once, first-token lens of all {L + 1} layers, all exits decoded "
          f"together with per-step entropy  [{reps('sweep')}]")
    fs = last["full"]
    print(f"T_full   {t_full:8.2f} s   the whole evaluation pass: + teacher-forced lens of all {L + 1} layers at "
          f"{int(fs.stats.entropy.shape[1])} reference positions ({fs.lens_s:.2f} s; its forward is the prefill), "
          f"generation {fs.gen_s:.2f} s  [{reps('full')}]")
    sw = last["full"]

    # The teacher-forced lens (the layer_stats call of run_sweep) against its floor, alternating.
    flat, tf_targets = teacher_forced_rows(bundle, prompt_ids, refs)
    floor_fn = head_floor(adapter, flat)
    t_lens_all, t_floor_all = [], []
    for _ in range(args.reps):
        for fn, acc in ((floor_fn, t_floor_all), (lambda: layer_stats(adapter, flat, tf_targets), t_lens_all)):
            _sync(args.device)
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            acc.append(time.perf_counter() - t0)
    t_floor, t_lens = statistics.median(t_floor_all), statistics.median(t_lens_all)
    spread = [round(a / b, 3) for a, b in zip(t_lens_all, t_floor_all)]
    print(f"T_lens   {t_lens:8.2f} s   teacher-forced lens statistics, {L + 1} layers × {tf_targets.shape[0]} positions "
          f"(lens.layer_stats; T_full's layer_stats_at adds the top-k lists and the raw lens at each row's first position)")
    print(f"T_floor  {t_floor:8.2f} s   its floor: the head's matmuls alone on the same rows, same chunks, same dtype "
          f"(per repetition, lens / floor: {spread})")

    # Equal tokens: our sweep vs the truncated reference (a correctness spot check).
    ref_out = trunc()
    agree = 0
    total = 0
    for j, k in enumerate(exits):
        for p in range(len(prompt_ids)):
            ours = sw.tokens[k][p]
            theirs = ref_out[j][p, ids.shape[1]:].tolist()[: len(ours)]
            total += 1
            agree += ours == theirs
    print(f"tokens equal to the truncated reference: {agree}/{total} (exit, row) pairs")

    t_naive = None
    if not args.skip_naive:
        rows = min(args.naive_rows, len(prompt_ids))
        t0 = time.perf_counter()
        for p in prompt_ids[:rows]:
            for k in exits:
                _naive_generate(bundle, p, k, n)
        _sync(args.device)
        t_naive = (time.perf_counter() - t0) * len(prompt_ids) / rows
        print(f"T_naive  {t_naive:8.2f} s   the notebook's method (no cache, full forward per token): "
              f"measured on {rows} rows, scaled ×{len(prompt_ids) / rows:g}")

    frac = sum(exits) / L
    ratio_ideal = t_sweep / (t_plain * frac)
    ratio_full = t_full / (t_plain * frac)
    print(f"Σk/L = {frac:.3f}; per round, T_sweep / (T_plain × Σk/L): "
          f"{[round(a / (b * frac), 3) for a, b in zip(runs['sweep'], runs['plain'])]}, T_full / T_trunc: "
          f"{[round(a / b, 3) for a, b in zip(runs['full'], runs['trunc'])]}")
    print(f"T_sweep / (T_plain × Σk/L) = {ratio_ideal:.3f} (target ≤ 0.6);  with the teacher-forced lens "
          f"T_full / (T_plain × Σk/L) = {ratio_full:.3f}")
    print(f"T_trunc / T_sweep = {t_trunc / t_sweep:.2f} (target ≥ 1.3)")
    print(f"T_lens / T_floor = {t_lens / t_floor:.3f} (target ≤ 1.5)")
    print(f"T_full / T_trunc = {t_full / t_trunc:.3f} (target ≤ 1): the whole evaluation pass against the simple peer's "
          f"generation alone")
    if t_naive is not None:
        print(f"speedup_naive = T_naive / T_sweep = {t_naive / t_sweep:.1f}   (target ≥ 20);  T_naive / T_full = {t_naive / t_full:.1f}")

    child = subprocess.run(
        [sys.executable, __file__, "--_rss-child", "--model", args.model, "--device", args.device, "--dtype", args.dtype,
         "--rows", str(args.rows), "--tokens", str(n), "--tf-tokens", str(args.tf_tokens),
         "--prompt-format", args.prompt_format] + (["--exits", ",".join(map(str, exits))] if args.exits else []),
        capture_output=True, text=True, env=dict(os.environ),
    )
    mem = None
    if child.returncode == 0:
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        gib = 1 << 30
        print(f"peak RSS during the full sweep {mem['rss_peak'] / gib:.2f} GiB (RSS before it {mem['rss_before'] / gib:.2f} GiB; "
              f"loading alone peaked at {mem['load_peak'] / gib:.2f} GiB); weights {mem['weight_bytes'] / gib:.2f} GiB; "
              f"sweep peak - weights = {(mem['rss_peak'] - mem['weight_bytes']) / gib:.2f} GiB (target ≤ 1 GiB; "
              f"the process without the sweep, libraries and weights resident: {mem['rss_before'] / gib:.2f} GiB)"
              + (f"; GPU peak {mem['gpu_peak'] / gib:.2f} GiB" if mem.get("gpu_peak") else ""))
    else:
        print("RSS child failed:\n" + child.stderr[-2000:])

    print(f"ratio_ideal = {ratio_ideal:.3f}")
    print(f"speedup_trunc = {t_trunc / t_sweep:.3f}")
    print(f"lens_vs_floor = {t_lens / t_floor:.3f}")
    print(f"full_vs_trunc = {t_full / t_trunc:.3f}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"T_plain": t_plain, "T_trunc": t_trunc, "T_sweep": t_sweep, "T_full": t_full, "T_naive": t_naive,
                       "T_lens": t_lens, "T_floor": t_floor, "lens_vs_floor": t_lens / t_floor, "full_vs_trunc": t_full / t_trunc,
                       "ratio_ideal": ratio_ideal, "ratio_full": ratio_full, "memory": mem,
                       "exits": exits, "rows": args.rows, "tokens": n, "device": args.device}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
