"""Early-exit generation for several exit layers in one batched, KV-cached decode.

Rows are ``exits × prompts``, ordered deepest exit first. The prompts are prefilled once through
the whole model (or taken from a prefill the caller already ran, e.g. the lens forward); the KV
cache of block j is then repeated for just the rows whose exit is at or beyond j. In each decode
step every block j runs only on those rows — a prefix of the batch — and passes the other rows'
hidden states through unchanged, so a row that exits at k reaches the model's own final norm and
head with the output of block k: exactly "the first k blocks + final norm + unembedding", at the
cost of k blocks. Finished rows (EOS or budget) are dropped from the batch and from every
layer's cache once enough of them have accumulated.

Tuned exits (``tuned_exits`` with a tuned lens, :mod:`layerwise.tuned`) are more rows of the same
decode: a tuned row exiting at k runs blocks 1..k beside the plain row of exit k, and just before
the model's final norm its hidden state — the output of block k, passed through unchanged by the
blocks it skipped — is replaced by translator k's output (:func:`translated_rows`): exactly
"the first k blocks + translator k + final norm + unembedding".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from . import buckets, compat
from .archs import Adapter
from .config import Decoding, default_exits, validate_exits
from .errors import ConfigError
from .families import check_early_exit
from .scan import scan_logits


@dataclass
class Prefill:
    """A prefill of the prompts through every block.

    ``cache`` holds the KV cache of all L blocks for the P prompts (left padded, ``mask``);
    ``last_hidden[k]`` is layer k's hidden state at the last prompt position, ``(P, d)``, for every
    exit layer k (layer L: the base model's normed last hidden state).
    """

    cache: Any
    mask: torch.Tensor
    last_hidden: dict[int, torch.Tensor]


@dataclass
class ExitGenerations:
    exits: list[int]
    tokens: dict[int, list[list[int]]]  # exit -> per prompt, generated ids (EOS included if produced)
    first_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # exit -> (P, V) float32
    steps: int = 0
    # exit -> per prompt, entropy (nats) of the exit's own next-token distribution at each
    # generated position: lens statistics of the generated sequence, from the same pass
    entropies: dict[int, list[list[float]]] = field(default_factory=dict)
    # the same for the exits decoded through the tuned lens (translator k before the final norm)
    tuned_exits: list[int] = field(default_factory=list)
    tuned_tokens: dict[int, list[list[int]]] = field(default_factory=dict)
    tuned_first_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    tuned_entropies: dict[int, list[list[float]]] = field(default_factory=dict)


def eos_ids(bundle: Any) -> set[int]:
    gen = getattr(bundle.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = bundle.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


@contextlib.contextmanager
def gated_blocks(adapter: Adapter, active: list[int]) -> Iterator[list[int]]:
    """Make block j run on the first ``active[j]`` rows only; other rows pass through unchanged.

    ``active`` is read at call time, so the caller may update it in place between steps.
    A block that runs on no row returns its input in the form the blocks that ran returned
    theirs (block 1 always runs: every exit is at or beyond it).
    """
    patched = []
    form: dict[str, Any] = {}  # what a block's output looks like (a tensor, or a tuple in transformers 4.x)
    for j, block in enumerate(adapter.blocks):
        had_own = "forward" in block.__dict__
        orig = block.forward

        def gated(hidden_states: torch.Tensor, *args: Any, _orig: Any = orig, _j: int = j, **kwargs: Any) -> Any:
            batch = hidden_states.shape[0]
            n = active[_j]
            if n <= 0:
                return compat.block_output(hidden_states, form["out"])
            if n >= batch:
                out = _orig(hidden_states, *args, **kwargs)
                form["out"] = compat.output_form(out)
                return out
            sub_args, sub_kwargs = compat.slice_block_call(args, kwargs, batch, n)
            out = _orig(hidden_states[:n], *sub_args, **sub_kwargs)
            form["out"] = compat.output_form(out)
            full = torch.cat([compat.block_hidden(out), hidden_states[n:]], dim=0)
            return compat.block_output(full, out)

        block.forward = gated
        patched.append((block, had_own, orig))
    try:
        yield active
    finally:
        for block, had_own, orig in patched:
            if had_own:
                block.forward = orig
            else:
                del block.forward


@contextlib.contextmanager
def translated_rows(adapter: Adapter, translate: Callable[[torch.Tensor, int], torch.Tensor],
                    rows: list[tuple[int, torch.Tensor]]) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Just before the model's final norm (the first module after the blocks: the norm, else what
    sits between it and the head, else the head), replace the hidden states of batch rows ``idx``
    by ``translate(h, k)``, for each ``(k, idx)`` in ``rows``.

    ``rows`` is read at call time, so the caller may update it in place between steps.
    """
    target = adapter.final_norm if adapter.final_norm is not None else (
        adapter.between[0] if adapter.between else adapter.head_modules[0])

    def pre_hook(_mod: Any, args: tuple, kwargs: dict) -> Any:
        if not rows:
            return None
        if args:
            h = args[0]
        else:
            key = next(iter(kwargs))
            h = kwargs[key]
        h = h.clone()
        for k, idx in rows:
            h[idx] = translate(h[idx], k)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, key: h}

    handle = target.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def prefill(bundle: Any, input_ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]) -> Prefill:
    """Run the prompts once through all blocks, keeping the cache and the last-position states."""
    cache = compat.new_cache(bundle.model.config)
    hidden = buckets.forward(bundle.adapter, input_ids, mask, input_ids.shape[1], cache=cache, select=slice(-1, None))
    return Prefill(cache=cache, mask=mask, last_hidden={k: hidden[k][:, 0] for k in layers})


def _pick(logits: torch.Tensor, dec: Decoding, gen: torch.Generator | None) -> torch.Tensor:
    if not dec.do_sample:
        return logits.argmax(-1)
    x = logits.float().cpu() / dec.temperature
    if not torch.isfinite(x.amax(-1)).all():  # NaN propagates through amax
        x = _scaled_stably(logits, dec.temperature)
    if dec.top_k is not None:
        kth = x.topk(min(dec.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if dec.top_p is not None and dec.top_p < 1:
        sorted_x, order = x.sort(dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - dec.top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _scaled_stably(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T for a T so small that the quotient overflows float32 (or that float32 rounds to
    0): shifted by each row's maximum first (softmax does not change) and divided in float64, so
    the top token stays at 0 and the others go to -inf; sampling then picks among the top tokens,
    the limit of sampling as T -> 0."""
    raw = logits.double().cpu()
    top = raw.amax(-1, keepdim=True)
    if torch.isnan(raw).any() or not torch.isfinite(top).all():
        raise ConfigError("the model's next-token scores contain NaN or infinities, so no token can be sampled",
                          "load the model in float32 (--dtype float32), or check its weights")
    return (raw - top) / temperature


def next_tokens(logits: torch.Tensor, dec: Decoding, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row and the entropy (nats) of the row's distribution, both on the
    CPU: one :func:`layerwise.scan.scan_logits` pass, whose top-1 is ``argmax``'s (the first
    maximum) for greedy decoding; sampling draws from the logits first. ``logits`` is consumed."""
    z = logits.float()
    tok = None if not dec.do_sample else _pick(z, dec, gen)
    sc = scan_logits(z, top1=tok is None)
    if tok is None:
        tok = sc.top1
    return tok.cpu(), sc.entropy().cpu()


def generate_exits(
    bundle: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    exits: Sequence[int],
    decoding: Decoding | None = None,
    *,
    prefilled: Prefill | None = None,
    compact_fraction: float = 0.05,
    verify_family: bool = True,
    on_step: Callable[[], None] | None = None,
    tuned: Any = None,
    tuned_exits: Sequence[int] = (),
) -> ExitGenerations:
    """Generate for every prompt (left-padded ``input_ids``) at every exit layer in one decode.

    Returns the generated ids per exit and prompt (stopping at EOS, which is included, or at
    ``max_new_tokens``), and the first-token logits of every exit. A family whose early exit is
    not exact (:mod:`layerwise.families`) is refused before any compute; ``verify_family=False``
    skips that (the test that measures it). ``on_step`` is called after each decode step (progress).

    ``tuned_exits`` (with ``tuned``, anything with ``translate(hidden, layer)`` such as a
    :class:`layerwise.tuned.TunedLens`): these exits are also decoded through the tuned lens, as
    more rows of the same decode (``tuned_tokens``, ``tuned_first_logits``, ``tuned_entropies``).
    """
    dec = decoding or Decoding()
    dec.validate()
    if verify_family:
        check_early_exit(str(bundle.adapter.model_type), padded=bool((attention_mask == 0).any()))
    adapter: Adapter = bundle.adapter
    model = bundle.model
    L = adapter.num_layers
    exits_sorted = validate_exits(list(exits), L)
    tuned_sorted = validate_exits(list(tuned_exits), L) if tuned_exits else []
    if tuned_sorted and tuned is None:
        raise ConfigError("tuned exits need a tuned lens", "pass tuned=TunedLens.load(PATH, bundle)")
    # Row groups (exit, through the tuned lens?), deepest first, so each block's rows are a prefix;
    # at one depth the plain exit comes first.
    order = sorted([(e, False) for e in exits_sorted] + [(e, True) for e in tuned_sorted], key=lambda g: (-g[0], g[1]))
    dev = bundle.device
    input_ids = input_ids.to(dev)
    attention_mask = attention_mask.to(dev)
    P = input_ids.shape[0]
    pre = prefilled or prefill(bundle, input_ids, attention_mask, sorted({e for e, _ in order}, reverse=True))
    eos = eos_ids(bundle)
    gen = torch.Generator(device="cpu").manual_seed(dec.seed) if dec.do_sample else None

    # Rows: group-major, deepest exit first.
    row_exit = torch.tensor([e for e, _ in order for _ in range(P)])
    row_tuned = torch.tensor([t for _, t in order for _ in range(P)], dtype=torch.bool)
    row_prompt = torch.tensor([p for _ in order for p in range(P)])

    with torch.inference_mode():
        first_logits = {g: adapter.unembed(tuned.translate(pre.last_hidden[g[0]].to(dev), g[0]) if g[1]
                                           else pre.last_hidden[g[0]].to(dev), norm=(g[0] != L)) for g in order}
    logits0 = torch.cat([first_logits[g] for g in order], dim=0)

    # Expand the prompts' cache: block j keeps the rows whose exit is >= j+1.
    layers = compat.cache_layers(pre.cache)
    reps = [sum(1 for e, _ in order if e >= j + 1) for j in range(L)]
    for j, layer in enumerate(layers[:L]):
        if reps[j] > 1:  # rows exit-major: the prompts' rows, once per exit that reaches block j
            compat.select_cache_rows(layer, torch.arange(P).repeat(reps[j]))
    mask = attention_mask.repeat(len(order), 1)
    last_pos = compat.position_ids_from_mask(attention_mask)[:, -1].repeat(len(order))

    n_rows = len(order) * P
    out_tokens: list[list[int]] = [[] for _ in range(n_rows)]
    out_entropy: list[list[float]] = [[] for _ in range(n_rows)]
    finished = torch.zeros(n_rows, dtype=torch.bool)  # by original row
    alive = torch.arange(n_rows)  # original row index of each current batch row
    next_tok, ent = next_tokens(logits0, dec, gen)
    active = [int((row_exit >= j + 1).sum()) for j in range(L)]

    def tuned_rows(alive_rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(exit k, batch rows) of the alive rows decoded through translator k (k < L)."""
        ex, tu = row_exit[alive_rows], row_tuned[alive_rows]
        return [(e, ((ex == e) & tu).nonzero().squeeze(-1).to(dev)) for e in tuned_sorted
                if e < L and bool(((ex == e) & tu).any())]

    translated = tuned_rows(alive)
    ckw = compat.cache_kwarg(model)
    use_pos = compat.accepts(model, "position_ids")
    steps = 0
    hook = translated_rows(adapter, tuned.translate, translated) if tuned_sorted else contextlib.nullcontext()
    room = compat.preallocated(layers[:L], dec.max_new_tokens)
    with torch.inference_mode(), gated_blocks(adapter, active), hook, room:
        for t in range(dec.max_new_tokens):
            for i, r in enumerate(alive.tolist()):
                if not finished[r]:
                    tok_i = int(next_tok[i])
                    out_tokens[r].append(tok_i)
                    out_entropy[r].append(round(float(ent[i]), 6))
                    if tok_i in eos:
                        finished[r] = True
            fin = finished[alive]
            if t + 1 >= dec.max_new_tokens or bool(fin.all()):
                break
            # Finished rows ride along (their tokens are ignored) until enough of them gather to
            # be worth dropping from the batch and from every layer's cache. A drop copies each
            # layer's cache once (~a sixth of a decode step on the default model); a finished row
            # of the deepest exit costs ~1/50 of every step it rides. At 25% of the rows, the
            # default sweep (20 prompts, 14 of whose final-exit texts end early) never dropped
            # one: its decode ran 5,040 row-steps where 4,852 suffice (compact_fraction 0.05).
            if int(fin.sum()) >= max(1.0, compact_fraction * len(alive)):
                keep = (~fin).nonzero().squeeze(-1)
                keep_dev = keep.to(dev)
                for j, layer in enumerate(layers[:L]):
                    compat.select_cache_rows(layer, keep_dev[keep_dev < active[j]])
                alive, next_tok, ent = alive[keep], next_tok[keep], ent[keep]
                mask, last_pos = mask[keep_dev], last_pos[keep_dev]
                active[:] = [int((row_exit[alive] >= j + 1).sum()) for j in range(L)]
                translated[:] = tuned_rows(alive)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last_pos = last_pos + 1
            kwargs: dict[str, Any] = {ckw: pre.cache}
            if use_pos:
                kwargs["position_ids"] = last_pos.unsqueeze(-1)
            out = model(
                input_ids=next_tok.to(dev).unsqueeze(-1),
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
            steps += 1
            if on_step is not None:
                on_step()
            next_tok, ent = next_tokens(out.logits[:, -1], dec, gen)
    tokens: dict[tuple[int, bool], list[list[int]]] = {g: [[] for _ in range(P)] for g in order}
    entropies: dict[tuple[int, bool], list[list[float]]] = {g: [[] for _ in range(P)] for g in order}
    for r in range(n_rows):
        g = (int(row_exit[r]), bool(row_tuned[r]))
        tokens[g][int(row_prompt[r])] = out_tokens[r]
        entropies[g][int(row_prompt[r])] = out_entropy[r]

    def part(d: dict[tuple[int, bool], Any], t: bool) -> dict[int, Any]:
        return {e: v for (e, tu), v in d.items() if tu == t}

    return ExitGenerations(exits=exits_sorted, tokens=part(tokens, False), first_logits=part(first_logits, False),
                           steps=steps, entropies=part(entropies, False), tuned_exits=tuned_sorted,
                           tuned_tokens=part(tokens, True), tuned_first_logits=part(first_logits, True),
                           tuned_entropies=part(entropies, True))
