"""One evaluation run: model → per-layer records → the results JSON (a plain dict).

``evaluate(RunConfig(...))`` is the whole pipeline without pytest: load the data (first, so a bad
file fails before a model loads), load the model, run one forward over each batch of
``prompt | reference`` sequences that yields the teacher-forced lens, the first-token lens and the
prefill cache for decoding, then decode every exit layer together, score the generations, and
assemble the dict described in docs/results-schema.md.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .errors import ConfigError
from .models import ModelBundle
from .results import SCHEMA, SCHEMA_VERSION

Log = Callable[[str], None]


def _environment(bundle: ModelBundle) -> dict[str, Any]:
    """Where the numbers were made (the baseline records it; a difference is a warning)."""
    import torch

    dev = bundle.device
    gpu = torch.cuda.get_device_name(dev) if getattr(dev, "type", None) == "cuda" else None
    return {"device": str(dev), "gpu": gpu, "platform": platform.machine()}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist, key in (("pytest-layerwise", "layerwise"), ("torch", "torch"), ("transformers", "transformers"),
                      ("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"), ("bert-score", "bert_score"),
                      ("bitsandbytes", "bitsandbytes"), ("accelerate", "accelerate"), ("peft", "peft")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    import torch

    out["torch"] = torch.__version__
    return out


def _token_text(tokenizer: Any, tid: int) -> str:
    try:
        return tokenizer.decode([tid])
    except Exception:  # noqa: BLE001 - a display string only
        return str(tokenizer.convert_ids_to_tokens(tid))


@dataclass
class Sweep:
    """What one pass over the prompts gives: lens statistics and early-exit generations."""

    stats: Any  # LayerStats over every teacher-forced position
    first_stats: Any  # LayerStats at each row's first response position (top-k, raw lens)
    grid_stats: Any
    grid_inputs: list[int] | None
    tokens: dict[int, list[list[int]]]
    entropies: dict[int, list[list[float]]]
    lens_s: float
    gen_s: float


def run_sweep(bundle: ModelBundle, prompt_ids: list[list[int]], ref_ids: list[list[int]], exits: list[int],
              config: RunConfig, say: Log = lambda _m: None) -> Sweep:
    """For each batch of rows: one forward over ``prompt | reference`` (teacher-forced lens,
    first-token lens, and the prompts' KV cache), then all exits decoded together from that cache."""
    import torch

    from .compat import crop_cache, new_cache
    from .decoding import Prefill, generate_exits
    from .lens import concat_stats, layer_stats, pack_rows

    model, tok, adapter = bundle.model, bundle.tokenizer, bundle.adapter
    L = adapter.num_layers
    dec = config.decoding
    dev = bundle.device
    n_rows = len(prompt_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_tokens: dict[int, list[list[int]]] = {e: [] for e in exits}
    gen_entropy: dict[int, list[list[float]]] = {e: [] for e in exits}
    all_stats: list[Any] = []
    first_stats: list[Any] = []
    grid_stats = grid_inputs = None
    lens_s = gen_s = 0.0
    from .families import batch_prompts

    step = config.batch_size if batch_prompts(str(adapter.model_type), bundle.info.get("lens_proof")) else 1
    for b0 in range(0, n_rows, step):
        rows = range(b0, min(n_rows, b0 + step))
        say(f"lens forward: rows {rows.start + 1}–{rows.stop} of {n_rows} ({L + 1} layers) …")
        t1 = time.perf_counter()
        packed = pack_rows([prompt_ids[i] for i in rows], [ref_ids[i] for i in rows], pad)
        S, valid, targets = packed.prompt_len, packed.valid, packed.targets
        R = targets.shape[1]
        seq, mask = packed.ids.to(dev), packed.mask.to(dev)
        cache = new_cache(model.config)
        store = adapter.forward(seq, mask, cache=cache, select=packed.window)
        flat = {k: v[valid.to(v.device)] for k, v in store.items()}
        # Teacher-forced statistics at every reference position; the costlier extras (top-k
        # lists, the raw no-norm lens) only at each row's first response position.
        st = layer_stats(adapter, flat, targets[valid])
        counts = valid.sum(1).tolist()
        starts = torch.tensor([sum(counts[:j]) for j in range(len(counts))])
        first_hidden = {k: v[starts.to(v.device)] for k, v in flat.items()}
        st_first = layer_stats(adapter, first_hidden, targets[valid][starts], top_k=config.lens_top_k, raw=config.raw_lens)
        all_stats.append(st)
        first_stats.append(st_first)
        if b0 == 0 and config.lens_top_k:
            n_grid = min(16, counts[0])
            grid_hidden = {k: v[:n_grid] for k, v in flat.items()}
            grid_stats = layer_stats(adapter, grid_hidden, None, top_k=1)
            grid_inputs = [prompt_ids[0][-1]] + ref_ids[0][: n_grid - 1]
        lens_s += time.perf_counter() - t1

        say(f"early-exit decoding: {len(exits)} exits × {len(rows)} rows, up to {dec.max_new_tokens} tokens …")
        t2 = time.perf_counter()
        crop_cache(cache, R)  # keep the prompts' part: the prefill for decoding
        pre = Prefill(cache=cache, mask=mask[:, :S], last_hidden={k: store[k][:, 0] for k in exits})
        del store, flat
        g = generate_exits(bundle, seq[:, :S], mask[:, :S], exits, dec, prefilled=pre)
        for e in exits:
            gen_tokens[e].extend(g.tokens[e])
            gen_entropy[e].extend(g.entropies[e])
        gen_s += time.perf_counter() - t2

    return Sweep(stats=concat_stats(all_stats), first_stats=concat_stats(first_stats), grid_stats=grid_stats,
                 grid_inputs=grid_inputs, tokens=gen_tokens, entropies=gen_entropy, lens_s=lens_s, gen_s=gen_s)


def evaluate(config: RunConfig, bundle: ModelBundle | None = None, log: Log | None = None,
             examples: list[Any] | None = None) -> dict[str, Any]:
    """Run the whole evaluation and return the results dict (not yet written anywhere).

    ``examples``: the prompt rows if the caller already read them (preflight), else read here.
    """

    from .data import default_prompts_path, format_prompt, load_examples
    from .decoding import default_exits, validate_exits
    from .lens import lens_section, rounded
    from .metrics import Scorer

    say = log or (lambda _msg: None)
    config.validate()
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    t_start = time.perf_counter()
    timing: dict[str, Any] = {"started": started}

    data_path = Path(config.prompts) if config.prompts else default_prompts_path()
    if examples is None:
        examples = load_examples(data_path, config.limit)
    # a bad BERTScore model fails now, not after the run
    scorer = Scorer(bertscore_model=config.bertscore_model, bertscore_num_layers=config.bertscore_num_layers).load()

    t0 = time.perf_counter()
    if bundle is None:
        from .models import load_model

        say(f"loading model {config.model} …")
        bundle = load_model(config.model, **config.load_config().kwargs())
    timing["load_s"] = round(time.perf_counter() - t0, 3)
    model, tok, adapter = bundle.model, bundle.tokenizer, bundle.adapter
    from .families import check_early_exit

    check_early_exit(str(adapter.model_type))  # a family whose early exit is not exact: before any compute
    L = adapter.num_layers
    exits = validate_exits(config.exit_layers, L) if config.exit_layers is not None else default_exits(L)
    dec = config.decoding
    N = config.teacher_forced_tokens

    prompts = [format_prompt(ex, config.prompt_format, tok) for ex in examples]
    special = config.prompt_format != "chat"
    prompt_ids = [tok.encode(p, add_special_tokens=special) for p in prompts]
    ref_ids = [tok.encode(ex.reference, add_special_tokens=False)[:N] for ex in examples]
    ctx = _context_length(model)
    for ex, ids in zip(examples, prompt_ids):
        if ctx is not None and len(ids) + max(dec.max_new_tokens, N) > ctx:
            raise ConfigError(
                f"row {ex.index} of {data_path}: its prompt is {len(ids)} tokens; with {max(dec.max_new_tokens, N)} "
                f"more it exceeds the model's context of {ctx} tokens (layerwise refuses rather than cut the prompt)",
                "shorten or drop that row, or lower --max-new-tokens",
            )

    sw = run_sweep(bundle, prompt_ids, ref_ids, exits, config, say)
    gen_tokens, grid_stats, grid_inputs = sw.tokens, sw.grid_stats, sw.grid_inputs
    timing["lens_s"] = round(sw.lens_s, 3)
    timing["generate_s"] = round(sw.gen_s, 3)

    # Merge the batches' statistics.
    st_all, st_first = sw.stats, sw.first_stats
    first = lens_section(st_first, slice(None))
    first["rows"] = len(examples)
    teacher = lens_section(st_all, slice(None))
    teacher["positions"] = int(st_all.entropy.shape[1])

    lens: dict[str, Any] = {"first_token": first, "teacher_forced": teacher}
    if st_first.topk_ids is not None:
        lens["examples"] = [
            {"row": examples[i].index, "top": {
                str(k): [{"token": _token_text(tok, int(tid)), "id": int(tid), "prob": rounded(p)}
                         for tid, p in zip(st_first.topk_ids[k, i].tolist(), st_first.topk_probs[k, i].tolist())]
                for k in exits}}
            for i in range(min(config.examples, len(examples)))
        ]
    if grid_stats is not None:
        n_grid = len(grid_inputs)
        lens["grid"] = {
            "row": examples[0].index,
            "positions": [_token_text(tok, t) for t in grid_inputs],
            "layers": list(range(L + 1)),
            "top_token": [[_token_text(tok, int(grid_stats.topk_ids[k, p, 0])) for p in range(n_grid)] for k in range(L + 1)],
            "top_prob": [[rounded(grid_stats.topk_probs[k, p, 0], 4) for p in range(n_grid)] for k in range(L + 1)],
        }

    if config.drift_against:
        from .drift import layer_drift
        from .models import load_model

        say(f"layer drift against {config.drift_against} …")
        t4 = time.perf_counter()
        ref_bundle = load_model(config.drift_against, dtype=config.dtype, device=config.device,
                                trust_remote_code=config.trust_remote_code, token=config.token, cache_dir=config.cache_dir)
        drift = layer_drift(ref_bundle, bundle, prompt_ids, ref_ids, batch_size=config.batch_size)
        drift["against"] = config.drift_against
        drift["label"] = f"KL({config.drift_against} ‖ this model) per layer"
        lens["drift"] = drift
        del ref_bundle
        timing["drift_s"] = round(time.perf_counter() - t4, 3)

    # Score the generations of each exit layer.
    t3 = time.perf_counter()
    say(f"scoring {len(exits)} exits × {len(examples)} rows (BLEU, ROUGE-L{', BERTScore' if scorer.bertscore_enabled else ''}) …")
    eos = _eos(bundle)
    texts = {e: [tok.decode([t for t in ids if t not in eos], skip_special_tokens=True).strip() for ids in gen_tokens[e]] for e in exits}
    refs = [ex.reference for ex in examples]
    exit_rows = []
    scores = {}
    for e in exits:
        s = scorer.score(texts[e], refs)
        scores[e] = s
        lens_n = [len([t for t in ids if t not in eos]) for ids in gen_tokens[e]]
        exit_rows.append({
            "layer": e,
            "bleu": rounded(s["bleu"], 4),
            "rougeL": rounded(s["rougeL"]),
            "rougeLsum": rounded(s["rougeLsum"]),
            "bertscore_p": _opt(s.get("bertscore_p")),
            "bertscore_r": _opt(s.get("bertscore_r")),
            "bertscore_f1": _opt(s.get("bertscore_f1")),
            "mean_len": rounded(sum(lens_n) / len(lens_n), 4),
            "empty": int(s["empty"]),
            "first_entropy": first["entropy"]["mean"][e],
            "gen_entropy": rounded(_mean_nested(sw.entropies[e])),
        })
    timing["metrics_s"] = round(time.perf_counter() - t3, 3)

    row_objs = []
    for i, ex in enumerate(examples):
        row_objs.append({
            "index": ex.index, "instruction": ex.instruction, "input": ex.input, "reference": ex.reference,
            "prompt": prompts[i],
            "generations": {str(e): texts[e][i] for e in exits},
            "n_tokens": {str(e): len([t for t in gen_tokens[e][i] if t not in eos]) for e in exits},
            "scores": {str(e): {"bleu": rounded(scores[e]["rows"][i]["bleu"], 4), "rougeL": rounded(scores[e]["rows"][i]["rougeL"]),
                                "bertscore_f1": _opt(scores[e]["rows"][i].get("bertscore_f1"))} for e in exits},
        })

    info = {k: v for k, v in bundle.info.items() if k != "load_s"}
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": {
            "model": info,
            "data": {"path": _display_path(data_path), "sha256": examples.sha256, "rows": len(examples),
                     "limit": config.limit, "prompt_format": config.prompt_format},
            "decoding": dec.describe(),
            "exit_layers": exits,
            "lens": {"final_norm": True, "teacher_forced_tokens": N, "top_k": config.lens_top_k},
            "metrics": scorer.describe(),
            "versions": _versions(),
            "environment": _environment(bundle),
        },
        "layers": list(range(L + 1)),
        "lens": lens,
        "exits": exit_rows,
        "rows": row_objs,
        "tests": [],
        "timing": timing,
    }


def _mean_nested(rows: list[list[float]]) -> float:
    vals = [v for r in rows for v in r]
    return sum(vals) / len(vals) if vals else float("nan")


def _opt(x: Any) -> float | None:
    from .lens import rounded

    return None if x is None else rounded(x)


def _eos(bundle: ModelBundle) -> set[int]:
    from .decoding import eos_ids

    return eos_ids(bundle)


def _display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        from .data import default_prompts_path

        if p.resolve() == Path(default_prompts_path()).resolve():
            return "layerwise.fixtures/alpaca_cleaned_sample.jsonl"
        return str(p)


def _context_length(model: Any) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None

