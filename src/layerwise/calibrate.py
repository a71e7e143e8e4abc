"""Calibration: how much the tracked numbers move when only what should not matter changes.

``layerwise calibrate`` runs the evaluation N times on one loaded model, varying the batch size
and the row order (and the seed, when sampling), and writes a baseline whose ``spread`` holds,
for every tracked number, the largest minus the smallest value seen. The gate then allows
max(tolerance, 3 × spread): on a GPU, where kernels and batch shapes move the last digits, this
is what keeps the gate from false alarms; on a CPU with greedy decoding the spread is ~0.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable

from .baseline import EXIT_METRICS, make_baseline, tracked_curves


def variations(runs: int, batch_size: int, rows: int, do_sample: bool, seed: int) -> list[dict[str, Any]]:
    """What run i changes: i = 0 is the plain run; then smaller batches and other row orders."""
    out = []
    for i in range(runs):
        bs = [batch_size, max(1, batch_size // 2), 1, max(1, batch_size // 3)][i % 4]
        order = list(range(rows))
        if i % 3 == 1:
            order.reverse()
        elif i % 3 == 2:
            random.Random(i).shuffle(order)
        out.append({"batch_size": bs, "order": order, "seed": seed + i if do_sample else seed})
    return out


def spread_of(runs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per tracked number: max − min over the runs (None where a run has no value)."""
    out: dict[str, list[float | None]] = {}
    for m in EXIT_METRICS:
        per_exit = []
        for i in range(len(runs[0]["exits"])):
            vals = [r["exits"][i].get(m) for r in runs]
            per_exit.append(None if any(v is None for v in vals) else round(max(vals) - min(vals), 9))
        out[f"exits.{m}"] = per_exit
    curves = [tracked_curves(r) for r in runs]
    for name in curves[0]:
        per_layer = []
        for k in range(len(curves[0][name])):
            vals = [c[name][k] for c in curves]
            per_layer.append(None if any(v is None for v in vals) else round(max(vals) - min(vals), 9))
        out[name] = per_layer
    return out


def calibrate(config: Any, runs: int, bundle: Any = None, examples: Any = None,
              log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the evaluation ``runs`` times (see :func:`variations`) and return a calibrated baseline."""
    from .data import default_prompts_path, load_examples
    from .models import load_model
    from .runner import evaluate

    if bundle is None:
        bundle = load_model(config.model, **config.load_config().kwargs())
    if examples is None:
        examples = load_examples(config.prompts or default_prompts_path(), config.limit)
    plans = variations(runs, config.batch_size, len(examples), config.decoding.do_sample, config.decoding.seed)
    results = []
    for i, plan in enumerate(plans):
        log(f"calibration run {i + 1}/{runs}: batch size {plan['batch_size']}, "
            f"{'rows in file order' if plan['order'] == sorted(plan['order']) else 'rows reordered'}"
            + (f", seed {plan['seed']}" if config.decoding.do_sample else ""))
        cfg = dataclasses.replace(config, batch_size=plan["batch_size"],
                                  decoding=dataclasses.replace(config.decoding, seed=plan["seed"]))
        ordered = type(examples)([examples[j] for j in plan["order"]], sha256=getattr(examples, "sha256", ""),
                                 size=getattr(examples, "size", 0)) if hasattr(examples, "sha256") else \
            [examples[j] for j in plan["order"]]
        res = evaluate(cfg, bundle=bundle, examples=ordered)
        res["rows"] = sorted(res["rows"], key=lambda r: r["index"])
        results.append(res)
    spread = spread_of(results)
    varied = ["batch size " + "/".join(str(p["batch_size"]) for p in plans), "row order"]
    if config.decoding.do_sample:
        varied.append("sampling seed")
    return make_baseline(results[0], spread=spread, calibration={"runs": runs, "varied": varied, "k": 3.0})
