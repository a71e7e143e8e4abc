"""One evaluation run: model → per-layer records → the results JSON (a plain dict).

``evaluate(RunConfig(...))`` is the whole pipeline without pytest, as orchestration only: read
the data (first, so a bad file fails before a model loads), load the model, encode, then the
sweep — one forward over each batch of ``prompt | reference`` sequences gives the teacher-forced
lens, the first-token lens and the prefill cache, and every exit layer is decoded together from
that cache — then drift, scoring, and the results (built by :mod:`layerwise.results`, the lens
sections by :mod:`layerwise.lens`). Progress goes to a :class:`layerwise.progress.Progress`.
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
from .progress import SILENT, Progress

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
    counts: list[int]  # teacher-forced positions of each row, in row order


def run_sweep(bundle: ModelBundle, prompt_ids: list[list[int]], ref_ids: list[list[int]], exits: list[int],
              config: RunConfig, say: Log = lambda _m: None, progress: Progress = SILENT) -> Sweep:
    """For each batch of rows: one forward over ``prompt | reference`` (teacher-forced lens,
    first-token lens, and the prompts' KV cache), then all exits decoded together from that cache."""
    import torch

    from .compat import crop_cache, new_cache
    from .decoding import Prefill, generate_exits
    from .families import batch_prompts
    from .lens import concat_stats, layer_stats, pack_rows

    model, tok, adapter = bundle.model, bundle.tokenizer, bundle.adapter
    dec = config.decoding
    dev = bundle.device
    n_rows = len(prompt_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_tokens: dict[int, list[list[int]]] = {e: [] for e in exits}
    gen_entropy: dict[int, list[list[float]]] = {e: [] for e in exits}
    all_stats: list[Any] = []
    first_stats: list[Any] = []
    counts_all: list[int] = []
    grid_stats = grid_inputs = None
    lens_s = gen_s = 0.0
    step = config.batch_size if batch_prompts(str(adapter.model_type), bundle.info.get("lens_proof")) else 1
    batches = [range(b0, min(n_rows, b0 + step)) for b0 in range(0, n_rows, step)]
    with progress.phase("generate", total=len(batches) * (dec.max_new_tokens - 1) or None, unit="step") as gen_bar, \
            progress.phase("lens", total=n_rows, unit="row") as lens_bar:  # lens ends (and prints) first
        for rows in batches:
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
            counts_all += counts
            if rows.start == 0 and config.lens_top_k:
                n_grid = min(16, counts[0])
                grid_hidden = {k: v[:n_grid] for k, v in flat.items()}
                grid_stats = layer_stats(adapter, grid_hidden, None, top_k=1)
                grid_inputs = [prompt_ids[0][-1]] + ref_ids[0][: n_grid - 1]
            lens_s += time.perf_counter() - t1
            lens_bar.update(len(rows))

            t2 = time.perf_counter()
            crop_cache(cache, R)  # keep the prompts' part: the prefill for decoding
            pre = Prefill(cache=cache, mask=mask[:, :S], last_hidden={k: store[k][:, 0] for k in exits})
            del store, flat
            g = generate_exits(bundle, seq[:, :S], mask[:, :S], exits, dec, prefilled=pre, on_step=gen_bar.update)
            gen_bar.update(dec.max_new_tokens - 1 - g.steps)  # a batch that stops early finishes its share
            for e in exits:
                gen_tokens[e].extend(g.tokens[e])
                gen_entropy[e].extend(g.entropies[e])
            gen_s += time.perf_counter() - t2
        lens_bar.note(f"{len(batches)} batch{'es' if len(batches) > 1 else ''}, {sum(counts_all)} positions")
        gen_bar.note(f"{len(exits)} exits × {n_rows} rows")
        lens_bar.seconds, gen_bar.seconds = lens_s, gen_s  # the two phases interleave batch by batch

    return Sweep(stats=concat_stats(all_stats), first_stats=concat_stats(first_stats), grid_stats=grid_stats,
                 grid_inputs=grid_inputs, tokens=gen_tokens, entropies=gen_entropy, lens_s=lens_s, gen_s=gen_s,
                 counts=counts_all)


@dataclass
class Encoded:
    prompts: list[str]
    prompt_ids: list[list[int]]
    ref_ids: list[list[int]]


def encode(config: RunConfig, examples: list[Any], tok: Any, model: Any, data_path: Path) -> Encoded:
    """Prompts in the configured format, their token ids, and the references' first N ids; a row
    too long for the model's context is refused naming the row and the option that makes it so."""
    from .data import format_prompt

    N = config.teacher_forced_tokens
    prompts = [format_prompt(ex, config.prompt_format, tok) for ex in examples]
    special = config.prompt_format != "chat"
    prompt_ids = [tok.encode(p, add_special_tokens=special) for p in prompts]
    ref_ids = [tok.encode(ex.reference, add_special_tokens=False)[:N] for ex in examples]
    ctx = _context_length(model)
    more = max(config.decoding.max_new_tokens, N)
    blame = "--max-new-tokens" if config.decoding.max_new_tokens >= N else "--teacher-forced-tokens"
    for ex, ids in zip(examples, prompt_ids):
        if ctx is not None and len(ids) + more > ctx:
            raise ConfigError(
                f"row {ex.index} of {data_path}: its prompt is {len(ids)} tokens; with {more} more ({blame}) it "
                f"exceeds the model's context of {ctx} tokens (layerwise refuses rather than cut the prompt)",
                f"shorten or drop that row, or lower {blame}",
            )
    return Encoded(prompts, prompt_ids, ref_ids)


def evaluate(config: RunConfig, bundle: ModelBundle | None = None, log: Log | None = None,
             examples: list[Any] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole evaluation and return the results dict (not yet written anywhere).

    ``examples``: the prompt rows if the caller already read them (preflight), else read here.
    ``progress``: where phases are reported (default: lines through ``log``, or nothing).
    """
    from .config import resolve_exits
    from .data import default_prompts_path, load_examples
    from .decoding import eos_ids
    from .families import check_early_exit
    from .lens import lens_results
    from .metrics import Scorer
    from .results import assemble

    prog = progress or (Progress("lines", write=log) if log else SILENT)
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

        with prog.phase("load") as ph:
            bundle = load_model(config.model, **config.load_config().kwargs())
            ph.note(f"{bundle.info.get('name')}, {bundle.num_layers} blocks")
    timing["load_s"] = round(time.perf_counter() - t0, 3)
    tok, adapter = bundle.tokenizer, bundle.adapter
    check_early_exit(str(adapter.model_type))  # a family whose early exit is not exact: before any compute
    L = adapter.num_layers
    exits, exit_spec = resolve_exits(config.exit_layers, L)
    enc = encode(config, examples, tok, bundle.model, data_path)

    sw = run_sweep(bundle, enc.prompt_ids, enc.ref_ids, exits, config, progress=prog)
    timing["lens_s"] = round(sw.lens_s, 3)
    timing["generate_s"] = round(sw.gen_s, 3)
    lens = lens_results(
        sw.stats, sw.first_stats, sw.counts, rows=len(examples), exits=exits,
        example_rows=[ex.index for ex in examples[: config.examples]], token_text=lambda t: _token_text(tok, t),
        grid=None if sw.grid_stats is None else (sw.grid_stats, examples[0].index, sw.grid_inputs))

    if config.drift_against:
        from .drift import layer_drift
        from .models import load_model

        t4 = time.perf_counter()
        with prog.phase("drift") as ph:
            ph.note(f"against {config.drift_against}")
            ref_bundle = load_model(config.drift_against, dtype=config.drift_dtype or config.dtype, device=config.device,
                                    revision=config.drift_revision, quantization=config.drift_quantization,
                                    trust_remote_code=config.trust_remote_code, token=config.token,
                                    cache_dir=config.cache_dir)
            drift = layer_drift(ref_bundle, bundle, enc.prompt_ids, enc.ref_ids, batch_size=config.batch_size)
        drift["against"] = config.drift_against + (f"@{config.drift_revision}" if config.drift_revision else "")
        drift["label"] = f"KL({drift['against']} ‖ this model) per layer"
        lens["drift"] = drift
        del ref_bundle
        timing["drift_s"] = round(time.perf_counter() - t4, 3)

    t3 = time.perf_counter()
    eos = eos_ids(bundle)
    kept = {e: [[t for t in ids if t not in eos] for ids in sw.tokens[e]] for e in exits}  # EOS filtered once
    texts = {e: [tok.decode(ids, skip_special_tokens=True).strip() for ids in kept[e]] for e in exits}
    refs = [ex.reference for ex in examples]
    scores = {}
    with prog.phase("metrics", total=len(exits), unit="exit") as ph:
        for e in exits:
            scores[e] = scorer.score(texts[e], refs)
            ph.update()
        ph.note("BLEU, ROUGE-L" + (", BERTScore" if scorer.bertscore_enabled else ""))
    timing["metrics_s"] = round(time.perf_counter() - t3, 3)

    exit_rows = [_exit_row(e, scores[e], kept[e], lens["first_token"]["entropy"]["mean"][e], sw.entropies[e])
                 for e in exits]
    rows = [_row(ex, enc.prompts[i], {e: texts[e][i] for e in exits}, {e: kept[e][i] for e in exits},
                 {e: sw.tokens[e][i] for e in exits}, {e: scores[e]["rows"][i] for e in exits})
            for i, ex in enumerate(examples)]
    run: dict[str, Any] = {
        "model": {k: v for k, v in bundle.info.items() if k != "load_s"},
        "data": {"path": _display_path(data_path), "sha256": examples.sha256, "rows": len(examples),
                 "limit": config.limit, "prompt_format": config.prompt_format},
        "decoding": config.decoding.describe(),
        "exit_layers": exits,
        "lens": {"final_norm": True, "teacher_forced_tokens": config.teacher_forced_tokens, "top_k": config.lens_top_k},
        "metrics": scorer.describe(),
        "versions": _versions(),
        "environment": _environment(bundle),
    }
    if exit_spec:
        run["exit_spec"] = exit_spec
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    return assemble(run=run, lens=lens, exits=exit_rows, rows=rows, timing=timing)


def _exit_row(layer: int, s: dict[str, Any], kept: list[list[int]], first_entropy: float | None,
              entropies: list[list[float]]) -> dict[str, Any]:
    from .lens import rounded

    lengths = [len(ids) for ids in kept]
    return {
        "layer": layer,
        "bleu": rounded(s["bleu"], 4),
        "rougeL": rounded(s["rougeL"]),
        "rougeLsum": rounded(s["rougeLsum"]),
        "bertscore_p": _opt(s.get("bertscore_p")),
        "bertscore_r": _opt(s.get("bertscore_r")),
        "bertscore_f1": _opt(s.get("bertscore_f1")),
        "mean_len": rounded(sum(lengths) / len(lengths), 4),
        "empty": int(s["empty"]),
        "first_entropy": first_entropy,
        "gen_entropy": rounded(_mean_nested(entropies)),
    }


def _row(ex: Any, prompt: str, texts: dict[int, str], kept: dict[int, list[int]], tokens: dict[int, list[int]],
         scores: dict[int, dict[str, Any]]) -> dict[str, Any]:
    from .lens import rounded
    from .results import token_print

    return {
        "index": ex.index, "instruction": ex.instruction, "input": ex.input, "reference": ex.reference,
        "prompt": prompt,
        "generations": {str(e): t for e, t in texts.items()},
        "n_tokens": {str(e): len(ids) for e, ids in kept.items()},
        "scores": {str(e): {"bleu": rounded(s["bleu"], 4), "rougeL": rounded(s["rougeL"]),
                            "bertscore_f1": _opt(s.get("bertscore_f1"))} for e, s in scores.items()},
        "tokens": {str(e): token_print(ids) for e, ids in tokens.items()},
    }


def _mean_nested(rows: list[list[float]]) -> float:
    vals = [v for r in rows for v in r]
    return sum(vals) / len(vals) if vals else float("nan")


def _opt(x: Any) -> float | None:
    from .lens import rounded

    return None if x is None else rounded(x)


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
