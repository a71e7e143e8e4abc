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
    # the tuned lens (--lens logit,tuned:PATH): the same positions, the same forward pass
    tuned_stats: Any = None
    tuned_first_stats: Any = None
    tuned_tokens: dict[int, list[list[int]]] | None = None  # --tuned-exits: exits < L through the tuned lens
    tuned_entropies: dict[int, list[list[float]]] | None = None
    tuned_s: float = 0.0  # the tuned lens's share of lens_s


@dataclass
class BatchPart:
    """One batch's share of a sweep (what a rank hands to rank 0 under torchrun)."""

    index: int  # the batch's number: parts are joined in this order
    stats: Any
    first: Any
    counts: list[int]
    tokens: dict[int, list[list[int]]]
    entropies: dict[int, list[list[float]]]
    tuned_stats: Any = None  # the tuned lens's, when the sweep has one
    tuned_first: Any = None
    tuned_tokens: dict[int, list[list[int]]] | None = None
    tuned_entropies: dict[int, list[list[float]]] | None = None


@dataclass
class SweepParts:
    parts: list[BatchPart]
    grid_stats: Any = None
    grid_inputs: list[int] | None = None
    lens_s: float = 0.0
    gen_s: float = 0.0
    tuned_s: float = 0.0

    def add(self, other: "SweepParts") -> None:
        self.parts += other.parts
        if other.grid_stats is not None:
            self.grid_stats, self.grid_inputs = other.grid_stats, other.grid_inputs
        self.lens_s += other.lens_s
        self.gen_s += other.gen_s
        self.tuned_s += other.tuned_s

    def merge(self, exits: list[int]) -> Sweep:
        """The batches joined in batch order: the same tensors whichever process computed them."""
        from .lens import concat_stats

        parts = sorted(self.parts, key=lambda p: p.index)
        tuned = bool(parts) and parts[0].tuned_stats is not None
        t_exits = sorted(parts[0].tuned_tokens or {}) if tuned else []
        return Sweep(stats=concat_stats([p.stats for p in parts]), first_stats=concat_stats([p.first for p in parts]),
                     grid_stats=self.grid_stats, grid_inputs=self.grid_inputs,
                     tokens={e: [t for p in parts for t in p.tokens[e]] for e in exits},
                     entropies={e: [t for p in parts for t in p.entropies[e]] for e in exits},
                     lens_s=self.lens_s, gen_s=self.gen_s, counts=[c for p in parts for c in p.counts],
                     tuned_stats=concat_stats([p.tuned_stats for p in parts]) if tuned else None,
                     tuned_first_stats=concat_stats([p.tuned_first for p in parts]) if tuned else None,
                     tuned_tokens={e: [t for p in parts for t in p.tuned_tokens[e]] for e in t_exits} if t_exits else None,
                     tuned_entropies=({e: [t for p in parts for t in p.tuned_entropies[e]] for e in t_exits}
                                      if t_exits else None),
                     tuned_s=self.tuned_s)


def run_sweep(bundle: ModelBundle, prompt_ids: list[list[int]], ref_ids: list[list[int]], exits: list[int],
              config: RunConfig, say: Log = lambda _m: None, progress: Progress = SILENT, tuned: Any = None) -> Sweep:
    """For each batch of rows: one forward over ``prompt | reference`` (teacher-forced lens,
    first-token lens, and the prompts' KV cache), then all exits decoded together from that cache.

    ``tuned`` (a :class:`layerwise.tuned.TunedLens`): every lens statistic also through the tuned
    lens, from the same hidden states; with ``config.tuned_exits`` the exits below L are also
    decoded through it, as more rows of the same decode."""
    return sweep_parts(bundle, prompt_ids, ref_ids, exits, config, progress, tuned=tuned).merge(exits)


def sweep_parts(bundle: ModelBundle, prompt_ids: list[list[int]], ref_ids: list[list[int]], exits: list[int],
                config: RunConfig, progress: Progress = SILENT, shard: tuple[int, int] | None = None,
                tuned: Any = None) -> SweepParts:
    """The sweep's batches — all of them, or under torchrun (``shard`` = (rank, world size)) every
    world-th batch from the rank's own: the batches are the same as in one process, so the
    joined results are byte for byte those of one process. ``tuned``: as in :func:`run_sweep`."""
    import torch

    from . import buckets
    from .compat import crop_cache, new_cache
    from .decoding import Prefill, generate_exits
    from .families import batch_prompts
    from .lens import layer_stats_at, pack_rows

    model, tok, adapter = bundle.model, bundle.tokenizer, bundle.adapter
    dec = config.decoding
    dev = bundle.device
    n_rows = len(prompt_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = SweepParts(parts=[])
    step = config.batch_size if batch_prompts(str(adapter.model_type), bundle.info.get("lens_proof")) else 1
    batches = [range(b0, min(n_rows, b0 + step)) for b0 in range(0, n_rows, step)]
    mine = [(i, b) for i, b in enumerate(batches) if shard is None or i % shard[1] == shard[0]]
    my_rows = sum(len(b) for _, b in mine)
    t_exits = [e for e in exits if e < adapter.num_layers] if tuned is not None and config.tuned_exits else []
    with progress.phase("generate", total=len(mine) * (dec.max_new_tokens - 1) or None, unit="step") as gen_bar, \
            progress.phase("lens", total=my_rows, unit="row") as lens_bar:  # lens ends (and prints) first
        for index, rows in mine:
            t1 = time.perf_counter()
            packed = pack_rows([prompt_ids[i] for i in rows], [ref_ids[i] for i in rows], pad)
            S, valid, targets = packed.prompt_len, packed.valid, packed.targets
            R = targets.shape[1]
            seq, mask = packed.ids.to(dev), packed.mask.to(dev)
            cache = new_cache(model.config)
            store = buckets.forward(adapter, seq, mask, S, cache=cache, select=packed.window)
            crop_cache(cache, R)  # keep the prompts' part: the prefill for decoding
            last_hidden = {k: store[k][:, 0].clone() for k in exits}
            flat = {k: v[valid.to(v.device)] for k, v in store.items()}
            del store
            # Teacher-forced statistics at every reference position; the costlier extras (top-k
            # lists, the raw no-norm lens) only at each row's first response position, read from
            # the same pass.
            counts = valid.sum(1).tolist()
            starts = torch.tensor([sum(counts[:j]) for j in range(len(counts))])
            st, st_first = layer_stats_at(adapter, flat, targets[valid], starts, top_k=config.lens_top_k,
                                          raw=config.raw_lens)
            t_st = t_st_first = None
            if tuned is not None:  # the same positions through translator k, then the final norm and head
                t5 = time.perf_counter()
                with torch.inference_mode():
                    t_flat = tuned.translate_layers(flat)
                t_st, t_st_first = layer_stats_at(adapter, t_flat, targets[valid], starts, top_k=config.lens_top_k)
                del t_flat
                out.tuned_s += time.perf_counter() - t5
            if rows.start == 0 and config.lens_top_k:  # the first row's first positions: top-1 per layer
                n_grid = min(16, counts[0])
                out.grid_stats = st.take(torch.arange(n_grid))
                out.grid_inputs = [prompt_ids[0][-1]] + ref_ids[0][: n_grid - 1]
            out.lens_s += time.perf_counter() - t1
            lens_bar.update(len(rows))

            t2 = time.perf_counter()
            pre = Prefill(cache=cache, mask=mask[:, :S], last_hidden=last_hidden)
            del flat
            g = generate_exits(bundle, seq[:, :S], mask[:, :S], exits, dec, prefilled=pre, on_step=gen_bar.update,
                               tuned=tuned, tuned_exits=t_exits)
            gen_bar.update(dec.max_new_tokens - 1 - g.steps)  # a batch that stops early finishes its share
            out.parts.append(BatchPart(index, st, st_first, counts, {e: g.tokens[e] for e in exits},
                                       {e: g.entropies[e] for e in exits}, t_st, t_st_first,
                                       {e: g.tuned_tokens[e] for e in t_exits}, {e: g.tuned_entropies[e] for e in t_exits}))
            out.gen_s += time.perf_counter() - t2
        positions = sum(c for p in out.parts for c in p.counts)
        lens_bar.note(f"{len(mine)} batch{'es' if len(mine) > 1 else ''}, {positions} positions")
        gen_bar.note(f"{len(exits)} exits{f' + {len(t_exits)} tuned' if t_exits else ''} × {my_rows} rows")
        lens_bar.seconds, gen_bar.seconds = out.lens_s, out.gen_s  # the two phases interleave batch by batch
    return out


@dataclass
class Encoded:
    prompts: list[str]
    prompt_ids: list[list[int]]
    ref_ids: list[list[int]]


def encode(config: RunConfig, examples: list[Any], tok: Any, model: Any, data_path: Path) -> Encoded:
    """Prompts in the configured format, their token ids, and the references' first N ids; a row
    too long for the model's context is refused naming the row and the option that makes it so."""
    from .compat import context_length
    from .data import format_prompt

    N = config.teacher_forced_tokens
    prompts = [format_prompt(ex, config.prompt_format, tok) for ex in examples]
    special = config.prompt_format != "chat"
    prompt_ids = [tok.encode(p, add_special_tokens=special) for p in prompts]
    ref_ids = [tok.encode(ex.reference, add_special_tokens=False)[:N] for ex in examples]
    ctx = context_length(model)
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
             examples: list[Any] | None = None, progress: Progress | None = None,
             shard: Any = None, tuned_lens: Any = None) -> dict[str, Any] | None:
    """Run the whole evaluation and return the results dict (not yet written anywhere).

    ``examples``: the prompt rows if the caller already read them (preflight), else read here.
    ``progress``: where phases are reported (default: lines through ``log``, or nothing).
    ``shard``: under torchrun, this process's :class:`layerwise.distributed.Shard`: the batches are
    shared among the ranks, gathered on rank 0, which scores and returns the results; the other
    ranks return None.
    ``tuned_lens``: the :class:`layerwise.tuned.TunedLens` of ``config.tuned_lens`` if the caller
    already loaded it for this model, else loaded here (refused for another model before any compute).
    """
    from .config import resolve_exits
    from .data import default_prompts_path, load_examples
    from .decoding import eos_ids
    from .families import check_early_exit
    from .lens import lens_results
    from .metrics import Scorer
    from .milestones import milestones
    from .speculative import attach, forecast_phase, forecast_section
    from .results import assemble

    prog = progress or (Progress("lines", write=log) if log else SILENT)
    config.validate()
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    t_start = time.perf_counter()
    timing: dict[str, Any] = {"started": started}

    data_path = Path(config.prompts) if config.prompts else default_prompts_path()
    if examples is None:
        examples = load_examples(data_path, config.limit)
    # A bad BERTScore model fails before the run, not after it: a child process proves it loads
    # while the model under test loads (Scorer.checking); scoring loads it again.
    scorer = Scorer(bertscore_model=config.bertscore_model, bertscore_num_layers=config.bertscore_num_layers)

    t0 = time.perf_counter()
    with scorer.checking(enabled=shard is None or shard.rank == 0):
        if bundle is None:
            from .models import load_model

            with prog.phase("load") as ph:
                bundle = load_model(config.model, **config.load_config().kwargs())
                ph.note(f"{bundle.info.get('name')}, {bundle.num_layers} blocks")
        timing["load_s"] = round(time.perf_counter() - t0, 3)
    tok, adapter = bundle.tokenizer, bundle.adapter
    check_early_exit(str(adapter.model_type))  # a family whose early exit is not exact: before any compute
    tuned = _tuned_lens(config, bundle, tuned_lens)  # a lens for another model: before any compute
    L = adapter.num_layers
    exits, exit_spec = resolve_exits(config.exit_layers, L)
    enc = encode(config, examples, tok, bundle.model, data_path)

    if shard is None:
        sw = run_sweep(bundle, enc.prompt_ids, enc.ref_ids, exits, config, progress=prog, tuned=tuned)
    else:
        mine = sweep_parts(bundle, enc.prompt_ids, enc.ref_ids, exits, config, prog, (shard.rank, shard.world),
                           tuned=tuned)
        gathered = shard.gather(mine)
        if gathered is None:
            return None  # not rank 0: its batches are in rank 0's hands
        whole = SweepParts(parts=[])
        for part in gathered:
            whole.add(part)
        sw = whole.merge(exits)
    timing["lens_s"] = round(sw.lens_s, 3)
    timing["generate_s"] = round(sw.gen_s, 3)
    example_rows = [ex.index for ex in examples[: config.examples]]
    lens = lens_results(
        sw.stats, sw.first_stats, sw.counts, rows=len(examples), exits=exits,
        example_rows=example_rows, token_text=lambda t: _token_text(tok, t),
        grid=None if sw.grid_stats is None else (sw.grid_stats, examples[0].index, sw.grid_inputs))
    milestones(lens, sw.stats, sw.first_stats, enc.prompt_ids, enc.ref_ids, sw.counts)
    t5 = time.perf_counter()
    forecast, no_forecast = forecast_phase(bundle, enc.prompt_ids, sw.tokens, exits, config, prog)
    if forecast is not None:
        timing["forecast_s"] = round(time.perf_counter() - t5, 3)
    if sw.tuned_stats is not None:
        timing["tuned_lens_s"] = round(sw.tuned_s, 3)
        both = lens_results(sw.tuned_stats, sw.tuned_first_stats, sw.counts, rows=len(examples), exits=exits,
                            example_rows=example_rows, token_text=lambda t: _token_text(tok, t))
        lens["tuned"] = {k: both[k] for k in ("first_token", "teacher_forced", "examples") if k in both}

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
    t_exits = sorted(sw.tuned_tokens or {})
    kept = {e: [[t for t in ids if t not in eos] for ids in sw.tokens[e]] for e in exits}  # EOS filtered once
    t_kept = {e: [[t for t in ids if t not in eos] for ids in (sw.tuned_tokens or {})[e]] for e in t_exits}
    texts = {e: [tok.decode(ids, skip_special_tokens=True).strip() for ids in kept[e]] for e in exits}
    t_texts = {e: [tok.decode(ids, skip_special_tokens=True).strip() for ids in t_kept[e]] for e in t_exits}
    refs = [ex.reference for ex in examples]
    scores, t_scores = {}, {}
    with prog.phase("metrics", total=len(exits) + len(t_exits), unit="exit") as ph:
        for e in exits:
            scores[e] = scorer.score(texts[e], refs)
            ph.update()
        for e in t_exits:
            t_scores[e] = scorer.score(t_texts[e], refs)
            ph.update()
        ph.note("BLEU, ROUGE-L" + (", BERTScore" if scorer.bertscore_enabled else ""))
    timing["metrics_s"] = round(time.perf_counter() - t3, 3)

    exit_rows = [_exit_row(e, scores[e], kept[e], lens["first_token"]["entropy"]["mean"][e], sw.entropies[e])
                 for e in exits]
    rows = [_row(ex, enc.prompts[i], {e: texts[e][i] for e in exits}, {e: kept[e][i] for e in exits},
                 {e: sw.tokens[e][i] for e in exits}, {e: scores[e]["rows"][i] for e in exits})
            for i, ex in enumerate(examples)]
    if forecast is not None:
        attach(forecast, exit_rows, rows)
    if t_exits:  # the exits decoded through the tuned lens: their own exit rows, and per row beside the plain ones
        for i, r in enumerate(rows):
            t_row = _row(examples[i], "", {e: t_texts[e][i] for e in t_exits}, {e: t_kept[e][i] for e in t_exits},
                         {e: sw.tuned_tokens[e][i] for e in t_exits}, {e: t_scores[e]["rows"][i] for e in t_exits})
            r["tuned"] = {k: t_row[k] for k in ("generations", "n_tokens", "scores", "tokens")}
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
        "speculative": forecast_section(forecast, config.draft_tokens, no_forecast),
    }
    if exit_spec:
        run["exit_spec"] = exit_spec
    if tuned is not None:
        run["lens"]["tuned"] = _tuned_info(tuned)
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    tuned_rows = [_exit_row(e, t_scores[e], t_kept[e], lens["tuned"]["first_token"]["entropy"]["mean"][e],
                            (sw.tuned_entropies or {})[e]) for e in t_exits]
    return assemble(run=run, lens=lens, exits=exit_rows, rows=rows, timing=timing, tuned_exits=tuned_rows)


def _tuned_lens(config: RunConfig, bundle: ModelBundle, given: Any) -> Any:
    """The run's tuned lens (``--lens logit,tuned:PATH``), checked against the model, or None."""
    if not config.tuned_lens:
        return None
    if given is None:
        from .tuned import TunedLens

        given = TunedLens.load(config.tuned_lens, bundle)
    else:
        given.check_model(bundle, f"tuned lens {config.tuned_lens}")
    return given.to(bundle.device)


def _tuned_info(tuned: Any) -> dict[str, Any]:
    """What the results record of the tuned lens: where it is, its weights' SHA-256, how it was trained."""
    src = getattr(tuned, "source", None) or {}
    training = getattr(tuned, "training_info", None) or {}
    return {"path": _display_path(Path(src["path"])) if src.get("path") else "(in memory)",
            "sha256": src.get("sha256"), "format": src.get("format"),
            "training": {k: training[k] for k in ("steps", "positions_per_step", "seed", "optimizer", "lr", "positions",
                                                  "source") if k in training}}


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
