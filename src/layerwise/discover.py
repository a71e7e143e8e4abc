"""Finding a model's parts from the model itself, for families without a row in ``archs``.

:func:`discover` returns the same :class:`~layerwise.archs.ArchSpec` a table row would give —
module paths relative to the ``*ForCausalLM`` model — found by watching the model, not by its
name:

- the decoder is ``model.get_decoder()`` (else ``base_model``, else the first child) — the first
  that holds a ``ModuleList``;
- the blocks are the ``ModuleList`` inside the decoder whose elements one forward runs each
  exactly once, in order (the longest such list; lists nested in blocks, such as experts, are
  not candidates);
- the tail — final norm and whatever sits between it and the head (OPT-350m's ``project_out``,
  DeepSeek-V4's hyper-connection head) — is followed by data flow: starting from the last
  block's output, the next module run after the last block that takes the current tensor, until
  the tensor is the decoder's output; the first is the final norm when it is a norm;
- the head is followed the same way, from the decoder's output to the output embeddings' output:
  the outermost modules that carry one to the other (RoBERTa's ``lm_head``: dense, GELU, norm,
  embeddings; ModernBERT's prediction head, then its embeddings);
- logit post-processing comes from the config attributes in :data:`LOGIT_ATTRS`.

The observations come from one forward over a few probe tokens with hooks, removed again. What
discovery finds is a claim until :mod:`layerwise.proof` proves it: the lens must reproduce the
model's logits, or the model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .archs import ArchSpec, text_config
from .errors import UnsupportedArchitectureError

# Config attributes the *ForCausalLM classes apply to their logits, by the convention most
# families follow (a family that follows another convention gets a row in archs.ARCHITECTURES).
LOGIT_ATTRS: dict[str, tuple[str, ...]] = {
    "logit_softcap": ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"),
    "logit_scale": ("logit_scale",),
    "logit_divide": ("logits_scaling", "logits_mup_width_multiplier"),
}


def probe_ids(vocab_size: int, length: int = 8) -> list[int]:
    """Deterministic token ids spread over the vocabulary (no random state is touched)."""
    step = max(1, vocab_size // (length + 1))
    return [(3 + i * step + i * i) % vocab_size for i in range(length)]


def probe_device(model: Any) -> Any:
    """Where probe inputs go: the input embeddings' device."""
    w = model.get_input_embeddings().weight
    return w.device if w.device.type != "meta" else "cpu"


def hidden_of(out: Any) -> Any:
    """The hidden-state tensor of a module's output (first of a tuple, or ``last_hidden_state``)."""
    if isinstance(out, (tuple, list)):
        return out[0] if out else None
    last = getattr(out, "last_hidden_state", None)
    return last if last is not None else out


@dataclass
class Trace:
    """One forward, watched: when each module started and finished (a shared clock), every call,
    and the first input and the output of each module's last call."""

    starts: dict[int, list[int]] = field(default_factory=dict)
    ends: dict[int, list[int]] = field(default_factory=dict)
    inputs: dict[int, Any] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)

    def calls(self, m: Any) -> int:
        return len(self.starts.get(id(m), ()))

    def last(self, m: Any) -> tuple[int, int] | None:
        s, e = self.starts.get(id(m)), self.ends.get(id(m))
        return (s[-1], e[-1]) if s and e else None


def _trace(model: Any, modules: list[Any], ids: list[int]) -> Trace:
    import torch

    clock = [0]
    tr = Trace()
    handles = []

    def pre(mod: Any, args: tuple, kwargs: dict) -> None:
        clock[0] += 1
        tr.starts.setdefault(id(mod), []).append(clock[0])
        tr.inputs[id(mod)] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))

    def post(mod: Any, _args: Any, out: Any) -> None:
        clock[0] += 1
        tr.ends.setdefault(id(mod), []).append(clock[0])
        tr.outputs[id(mod)] = hidden_of(out)

    for m in modules:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
    try:
        x = torch.tensor([ids], device=probe_device(model))
        with torch.inference_mode():
            model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return tr


def _same(a: Any, b: Any) -> bool:
    import torch

    if a is b:
        return True
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _flow(tr: Trace, modules: list[Any], start: Any, done: Any) -> list[Any] | None:
    """The modules, in the order they ran, that carry ``start`` to a tensor ``done`` accepts: each
    takes the previous one's output as its input (depth-first over the few candidates)."""
    order = sorted(modules, key=lambda m: tr.last(m)[0])

    def search(cur: Any, i: int, depth: int) -> list[Any] | None:
        if done(cur):
            return []
        if depth > 8:
            return None
        for k in range(i, len(order)):
            m = order[k]
            if _same(tr.inputs.get(id(m)), cur):
                rest = search(tr.outputs.get(id(m)), k + 1, depth + 1)
                if rest is not None:
                    return [m, *rest]
        return None

    return search(start, 0, 0)


def _block_lists(decoder: Any) -> list[tuple[str, Any]]:
    """Outermost ``ModuleList``s inside the decoder (lists nested in a list's elements are not blocks)."""
    import torch

    found: list[tuple[str, Any]] = []
    for name, mod in decoder.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue
        found.append((name, mod))
    return found


def find_decoder(model: Any) -> Any:
    """``get_decoder()``, else ``base_model``, else a child: the first that holds a block list."""
    import torch

    head = model.get_output_embeddings()
    get = getattr(model, "get_decoder", None)
    tried = [get() if callable(get) else None, getattr(model, "base_model", None), *model.children()]
    for dec in tried:
        if dec is None or dec is model or dec is head or not isinstance(dec, torch.nn.Module):
            continue
        if any(isinstance(m, torch.nn.ModuleList) and len(m) for m in dec.modules()):
            return dec
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: no submodule holds a list of blocks (get_decoder(), base_model and the children tried)",
        "add a row for this model_type to layerwise.archs.ARCHITECTURES",
    )


def discover(model: Any, probe_length: int = 8) -> ArchSpec:
    """The parts of ``model``, from its structure and one watched forward (see the module doc)."""
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False) if name}
    emb_out = model.get_output_embeddings()
    if emb_out is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no output embeddings (no LM head)",
                                           "pass a *ForCausalLM model")
    decoder = find_decoder(model)
    lists = _block_lists(decoder)
    in_lists = {id(m) for _n, lst in lists for el in lst for m in el.modules()}
    watched = [m for m in model.modules() if id(m) not in in_lists and m is not model]
    watched += [el for _n, lst in lists for el in lst]
    vocab = int(getattr(emb_out, "out_features", None) or emb_out.weight.shape[0])
    what = type(model).__name__
    try:
        tr = _trace(model, watched, probe_ids(vocab, probe_length))
    except Exception as exc:  # noqa: BLE001 - reported as the reason for refusing
        text = " ".join(str(exc).split())
        raise UnsupportedArchitectureError(
            f"{what}: its own forward on {probe_length} probe tokens raises {type(exc).__name__}: {text[:160]}",
            "layerwise needs a model that runs on token ids alone",
        ) from None

    # Blocks: every element ran exactly once, each after the previous one finished.
    best = None
    for _name, lst in lists:
        spans = [tr.last(b) for b in lst]
        ok = all(tr.calls(b) == 1 for b in lst) and all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
        if ok and (best is None or len(lst) > len(best)):
            best = lst
    if best is None:
        ran = ", ".join(f"{n} ({sum(tr.calls(b) for b in lst)} calls for {len(lst)} blocks)" for n, lst in lists)
        raise UnsupportedArchitectureError(
            f"{what}: no block list runs each block once, in order: {ran}",
            "layerwise needs layer k = the output of block k; add a row to layerwise.archs.ARCHITECTURES "
            "if the blocks live elsewhere",
        )
    dec_span, emb_span = tr.last(decoder), tr.last(emb_out)
    if dec_span is None or emb_span is None:
        raise UnsupportedArchitectureError(
            f"{what}: the forward never calls its {'decoder' if dec_span is None else 'output embeddings'}",
            "pass a *ForCausalLM model",
        )

    # The tail, by data flow from the last block's output to the decoder's output; the head, by
    # data flow from the decoder's output to the output embeddings' output.
    last_end = tr.last(best[-1])[1]
    spans = {id(m): tr.last(m) for m in watched}
    inner = [m for m in watched if spans[id(m)] and spans[id(m)][0] > last_end and spans[id(m)][1] < dec_span[1]]
    chain = _flow(tr, inner, tr.outputs.get(id(best[-1])), lambda t: _same(t, tr.outputs.get(id(decoder))))
    paths = [names[id(m)] for m in chain or []]
    norm = paths[0] if paths and "norm" in type(chain[0]).__name__.lower() else None
    between = tuple(paths[1:] if norm else paths)
    outer = [m for m in watched if spans[id(m)] and spans[id(m)][0] > dec_span[1] and m is not emb_out]
    head_chain = _flow(tr, outer + [emb_out], tr.outputs.get(id(decoder)),
                       lambda t: _same(t, tr.outputs.get(id(emb_out))))
    head = tuple(names[id(m)] for m in head_chain or [])
    if head == (names[id(emb_out)],):
        head = ()

    cfg = text_config(model.config)
    post = {key: next((a for a in attrs if getattr(cfg, a, None) is not None), None) for key, attrs in LOGIT_ATTRS.items()}
    return ArchSpec(decoder=names[id(decoder)], blocks=names[id(best)], final_norm=norm, between=between,
                    head=head, **post)
