"""The load-time proof that the lens reads this model right, for every model (table row or discovered).

A forward of the model over a few probe tokens, and one of its decoder the way the lens calls it
(with hooks on the blocks), must show that

1. the blocks run each exactly once, in order, and block j+1 takes exactly block j's output
   (so "layer k = output of block k" is the model's own residual stream);
2. layer L of the lens — the decoder's output through the head and the logit post-processing —
   equals the model's logits;
3. the last block's output through the found final norm, whatever sits between it and the head,
   the head and the post-processing equals the model's logits too (so the norm and head the lens
   applies to layers 0..L-1 are the model's own).

Equal means within a tolerance set by the dtype the head computes in (:func:`tolerance`). A model
that fails is refused with :class:`UnsupportedArchitectureError` naming what did not match: never
a silently wrong lens. The hooks are removed and nothing else about the model changes.
"""

from __future__ import annotations

from typing import Any

from .archs import ARCHITECTURES, Adapter
from .compat import accepts, position_ids_from_mask
from .discover import discover, hidden_of, probe_device, probe_ids
from .errors import UnsupportedArchitectureError
from .lens import capture_hidden

PROBE_LENGTH = 8
# Allowed |lens - model| on the logits, relative to max(1, max |logit|), by compute dtype. The two
# sides run the same modules on the same tensors, so float32 differences are normally exactly 0;
# the bounds leave room for kernels that depend on shapes and are still far below what a missing
# norm, soft-cap or scale changes.
RELATIVE_TOLERANCE = {"float32": 1e-5, "float64": 1e-9, "bfloat16": 2e-2, "float16": 4e-3}


def compute_dtype(model: Any) -> str:
    """The dtype the head's matmul effectively runs in (bitsandbytes 8-bit: float16 inputs)."""
    q = getattr(model.config, "quantization_config", None)
    get = (lambda k: q.get(k)) if isinstance(q, dict) else (lambda k: getattr(q, k, None))
    if q is not None and get("load_in_8bit"):
        return "float16"
    if q is not None and get("load_in_4bit"):
        return str(get("bnb_4bit_compute_dtype") or "float32").replace("torch.", "")
    dt = getattr(model, "dtype", None)
    return str(dt).replace("torch.", "") if dt is not None else "float32"


def tolerance(model: Any, logits: Any) -> float:
    rel = RELATIVE_TOLERANCE.get(compute_dtype(model), 2e-2)
    return rel * max(1.0, float(logits.abs().max()))


PAD = 3  # pad tokens in the padded probe row


def prove(adapter: Adapter, how: str, probe_length: int = PROBE_LENGTH) -> dict[str, Any]:
    """Prove ``adapter`` on its model; return the proof's record or raise UnsupportedArchitectureError.

    ``how`` says where the parts came from ("table" or "discovered") and goes into the record.
    Three forwards: the model on the probe (its own logits); the decoder on the probe the way the
    lens calls it, its blocks watched; and the decoder on the probe left-padded by PAD tokens,
    which shows whether left padding moves the lens.
    """
    import torch

    model = adapter.model
    spec = adapter.spec
    blocks = list(adapter.blocks)
    L = len(blocks)
    T = probe_length
    what = f"{type(model).__name__} (model_type {adapter.model_type!r}, parts {how})"
    calls = [0] * L
    order: list[int] = []
    inputs: dict[int, Any] = {}
    last_out: list[Any] = []

    def pre(j: int) -> Any:
        def hook(_mod: Any, args: tuple, kwargs: dict) -> None:
            calls[j] += 1
            order.append(j)
            h = args[0] if args else kwargs.get("hidden_states")
            if j > 0 and isinstance(h, torch.Tensor):
                inputs[j] = h.detach().clone()
        return hook

    def refuse(problem: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"{what}: the lens cannot be proven — {problem}",
            "layerwise refuses rather than show a wrong lens; fix or add its row in layerwise.archs.ARCHITECTURES",
        )

    emb = adapter.head
    vocab = int(getattr(emb, "out_features", None) or emb.weight.shape[0])
    dev = probe_device(model)
    probe = torch.tensor([probe_ids(vocab, T)], device=dev)
    ones = torch.ones_like(probe)
    takes_pos = accepts(adapter.decoder, "position_ids")

    def lens_forward(x: Any, m: Any) -> Any:  # the decoder, called the way the lens calls it
        extra = {"position_ids": position_ids_from_mask(m)} if takes_pos else {}
        return hidden_of(adapter.decoder(input_ids=x, attention_mask=m, use_cache=False, **extra))

    head_name = " → ".join(spec.head) or _path(model, adapter.head)

    try:
        with torch.inference_mode():
            logits = model(input_ids=probe, attention_mask=ones, use_cache=False).logits.float()
    except Exception as exc:  # noqa: BLE001 - reported as the reason for refusing
        raise refuse(f"the model's own forward on {T} probe tokens raises {type(exc).__name__}: {_line(exc)}") from None
    if getattr(model.config, "is_decoder", True) is False:  # an encoder family's config: is it causal here?
        changed = probe.clone()
        changed[0, -1] = (changed[0, -1] + 1) % vocab
        with torch.inference_mode():
            moved = model(input_ids=changed, attention_mask=ones, use_cache=False).logits.float()
        if not torch.allclose(moved[:, :-1], logits[:, :-1], rtol=0, atol=tolerance(model, logits)):
            raise UnsupportedArchitectureError(
                f"{what}: it is not causal — changing the last probe token changes the logits at earlier "
                "positions (an encoder: its attention sees later tokens)",
                "load it as a decoder (is_decoder=True in its config), or pass a causal language model",
            )
    # Layer L as the lens reads it: the decoder called on its own, its blocks watched.
    handles = [b.register_forward_pre_hook(pre(j), with_kwargs=True) for j, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(lambda _m, _a, out: last_out.append(hidden_of(out).detach().clone())))
    try:
        with torch.inference_mode(), capture_hidden(adapter) as store:
            dec_out = lens_forward(probe, ones)
    except Exception as exc:  # noqa: BLE001 - reported as the reason for refusing
        raise refuse(f"calling {spec.decoder} the way the lens does raises {type(exc).__name__}: {_line(exc)}") from None
    finally:
        for h in handles:
            h.remove()

    shapes = sorted({tuple(t.shape) for t in (dec_out, *last_out) if isinstance(t, torch.Tensor)})
    if len(last_out) != 1 or any(len(sh) != 3 or sh[:2] != tuple(probe.shape) for sh in shapes):
        raise refuse(f"its hidden states have shape {shapes}, not (batch, positions, width): it keeps several "
                     "streams per position, or other positions than its input, and the lens reads one vector per "
                     "position and layer")
    if calls != [1] * L or order != list(range(L)):
        bad = next(j for j in range(L) if calls[j] != 1) if calls != [1] * L else None
        raise refuse(f"block {bad + 1} of {spec.blocks} ran {calls[bad]} times in one forward" if bad is not None
                     else f"the blocks of {spec.blocks} ran out of order ({order[:8]}…)")
    for j in range(1, L):
        got = inputs.get(j)
        if got is None or store.get(j) is None or got.shape != store[j].shape or not torch.equal(got, store[j]):
            raise refuse(f"block {j + 1} of {spec.blocks} does not take block {j}'s output as its input "
                         "(the decoder changes the hidden state between blocks)")

    tol = tolerance(model, logits)
    post = ", ".join(f"{k.removeprefix('logit_')} {getattr(spec, k)}" for k in ("logit_scale", "logit_divide", "logit_softcap")
                     if getattr(spec, k)) or "none"
    tail = " → ".join([spec.final_norm or "(no final norm)", *spec.between, head_name])
    at_l = f"layer L ({head_name} on the output of {spec.decoder}, logit post-processing: {post})"

    def diff(hidden: Any, norm: bool, what_: str) -> float:
        try:
            with torch.inference_mode():
                got = adapter.unembed(hidden, norm=norm).to(logits.device)
        except Exception as exc:  # noqa: BLE001 - reported as the reason for refusing
            raise refuse(f"{what_} raises {type(exc).__name__}: {_line(exc)}") from None
        if got.shape != logits.shape:
            raise refuse(f"{what_} gives logits of shape {tuple(got.shape)}, the model {tuple(logits.shape)}")
        return float((got - logits).abs().max())

    d_final = diff(dec_out, False, at_l)
    if not d_final <= tol:
        hint = ""
        if takes_pos:  # does the decoder number positions its own way?
            with torch.inference_mode():
                alone = hidden_of(adapter.decoder(input_ids=probe, attention_mask=ones, use_cache=False))
            if diff(alone, False, at_l) <= tol:
                hint = "; without position ids 0..T-1 it matches: the decoder numbers positions its own way"
        raise refuse(f"{at_l} differs from the model's logits by {d_final:.3g} (tolerance {tol:.2g}){hint}")
    d_norm = diff(last_out[0], True, f"block {L}'s output through {tail}")
    if not d_norm <= tol:
        raise refuse(f"block {L}'s output through {tail} differs from the model's logits by {d_norm:.3g} "
                     f"(tolerance {tol:.2g})")
    padded = torch.cat([torch.zeros_like(probe[:, :PAD]), probe], 1)
    pmask = torch.cat([torch.zeros_like(probe[:, :PAD]), ones], 1)
    try:
        with torch.inference_mode():
            d_pad = diff(lens_forward(padded, pmask)[:, PAD:], False, f"{at_l}, left-padded")
    except UnsupportedArchitectureError:
        d_pad = float("inf")  # a model that cannot take left-padded input gets one prompt at a time
    return {
        "parts": how,
        "decoder": spec.decoder,
        "blocks": f"{spec.blocks} ({L})",
        "final_norm": spec.final_norm,
        "between": list(spec.between),
        "head": head_name,
        "logit_postprocessing": post,
        "max_abs_diff": float(f"{max(d_final, d_norm):.3g}"),
        "tolerance": float(f"{tol:.3g}"),
        "dtype": compute_dtype(model),
        "probe_tokens": T,
        # Prompts of different lengths share left-padded batches; a model whose lens moves with
        # the padding (positions counted from the first pad, pad-dependent state) gets one at a time.
        "left_padding_exact": d_pad <= tol,
    }


def proven_adapter(model: Any) -> tuple[Adapter, dict[str, Any]]:
    """The model's adapter — its table row, else discovered — and the proof's record.

    Raises :class:`UnsupportedArchitectureError` when the parts cannot be found or proven.
    """
    row = ARCHITECTURES.get(str(getattr(model.config, "model_type", None)))
    adapter = Adapter(model, row or discover(model))
    return adapter, prove(adapter, "table" if row else "discovered")


def _path(model: Any, module: Any) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    return type(module).__name__


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] + "…" if len(text) > 160 else text
