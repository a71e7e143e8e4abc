"""Where each architecture keeps its blocks, final norm and unembedding — as data, not code.

A family with a row in :data:`ARCHITECTURES`, keyed by ``config.model_type``, has its parts here:
dotted module paths relative to the ``*ForCausalLM`` model, plus the config attributes of anything
the model applies to its logits after the head. Any other model has them found from its own
structure (:mod:`layerwise.discover`), and either way they are proven at load
(:mod:`layerwise.proof`). :class:`Adapter` resolves a row against a loaded model
and gives the lens its one operation, :meth:`Adapter.unembed` — final norm, whatever sits between
norm and head, the head, and the logit post-processing — so that ``unembed(output of block L)``
is exactly the model's own logits.

A row is for what discovery cannot see, or for speed; tests/test_families.py tries every model
type transformers ships and writes docs/architectures.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .errors import UnsupportedArchitectureError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class ArchSpec:
    decoder: str
    """The base model: its forward returns ``last_hidden_state`` with the final norm applied."""
    blocks: str
    """The ``ModuleList`` of decoder blocks, in order."""
    final_norm: str | None
    """The norm applied after the last block (may resolve to ``None``, e.g. OPT-350m)."""
    between: tuple[str, ...] = ()
    """Modules applied after the final norm and before the head (e.g. OPT's ``project_out``)."""
    head: tuple[str, ...] = ()
    """The modules that map the head input to logits, in order, when that is more than the output
    embeddings (RoBERTa's ``lm_head``: dense, GELU, norm, then the output embeddings); empty: the
    output embeddings alone."""
    logit_softcap: str | None = None
    """Config attribute: ``logits = cap * tanh(logits / cap)`` (Gemma-2)."""
    logit_scale: str | None = None
    """Config attribute: ``logits = logits * scale`` (Cohere)."""
    logit_divide: str | None = None
    """Config attribute: ``logits = logits / d`` (Granite)."""


_LLAMA_LIKE = ArchSpec(decoder="model", blocks="model.layers", final_norm="model.norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": ArchSpec("model", "model.layers", "model.norm", logit_softcap="final_logit_softcapping"),
    "gpt2": ArchSpec(decoder="transformer", blocks="transformer.h", final_norm="transformer.ln_f"),
    "gpt_neox": ArchSpec(decoder="gpt_neox", blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm"),
    # What discovery cannot see: these multiply their logits by a config value that other families
    # divide by (Granite) or do not have; the load proof refuses the discovered guess for them.
    "hyperclovax": ArchSpec("model", "model.layers", "model.norm", logit_scale="logits_scaling"),
    "falcon_h1": ArchSpec("model", "model.layers", "model.final_layernorm", logit_scale="lm_head_multiplier"),
    "opt": ArchSpec(
        decoder="model",
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        between=("model.decoder.project_out",),
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def spec_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no row in layerwise.archs (rows: {', '.join(supported_model_types())})",
            "build its adapter with layerwise.proof.proven_adapter(model), which discovers and proves the parts",
        ) from None


def text_config(config: Any) -> Any:
    """The config of the text decoder (multimodal configs nest it), else ``config`` itself."""
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):
        return config


def _resolve(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Adapter:
    """One loaded model seen through its :class:`ArchSpec`."""

    def __init__(self, model: Any, spec: ArchSpec | None = None) -> None:
        model_type = getattr(model.config, "model_type", None)
        self.model = model
        self.spec = spec or spec_for(str(model_type))
        self.model_type = model_type
        self.decoder = _resolve(model, self.spec.decoder)
        self.blocks = _resolve(model, self.spec.blocks)
        if self.decoder is None or self.blocks is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} (model_type {model_type!r}) has no {self.spec.blocks!r}",
                "its module layout differs from layerwise.archs.ARCHITECTURES; fix that row",
            )
        self.final_norm = _resolve(model, self.spec.final_norm) if self.spec.final_norm else None
        self.between = [m for m in (_resolve(model, p) for p in self.spec.between) if m is not None]
        self.head = model.get_output_embeddings()
        self.head_modules = [_resolve(model, p) for p in self.spec.head] or [self.head]
        if self.head is None or any(m is None for m in self.head_modules):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no output embeddings (no LM head)",
                "pass a *ForCausalLM model",
            )
        cfg = text_config(model.config)
        self.softcap = getattr(cfg, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        self.scale = getattr(cfg, self.spec.logit_scale, None) if self.spec.logit_scale else None
        self.divide = getattr(cfg, self.spec.logit_divide, None) if self.spec.logit_divide else None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def _head_device(self) -> "torch.device":
        for p in self.head_modules[0].parameters():
            return p.device
        raise UnsupportedArchitectureError("the LM head has no parameters", "pass a *ForCausalLM model")

    def _norm_device(self) -> "torch.device | None":
        if self.final_norm is None:
            return None
        for p in self.final_norm.parameters():
            return p.device
        return None

    def prepare(self, hidden: "torch.Tensor", *, norm: bool = True) -> "torch.Tensor":
        """Hidden states → head input: the final norm (when ``norm``) and anything before the head."""
        x = hidden
        if norm and self.final_norm is not None:
            dev = self._norm_device()
            if dev is not None and x.device != dev:
                x = x.to(dev)
            x = self.final_norm(x)
        for mod in self.between:
            # Without the norm, a state the head can take as it is (the decoder's output, already
            # through these modules) skips them; one of another width (OPT-350m's residual stream
            # before project_out) cannot skip them.
            if norm or x.shape[-1] != self._head_width():
                x = mod(x)
        return x

    def _head_width(self) -> int | None:
        first = self.head_modules[0]
        width = getattr(first, "in_features", None)
        return width if width is not None else getattr(getattr(first, "weight", None), "shape", (None,))[-1]

    def logits(self, x: "torch.Tensor") -> "torch.Tensor":
        """Head input → logits (float32), with the model's logit scaling / soft-capping."""
        import torch

        dev = self._head_device()
        if x.device != dev:
            x = x.to(dev)
        out = x
        for mod in self.head_modules:
            out = mod(out)
        if self.scale is not None:
            out = out * self.scale
        if self.divide is not None:
            out = out / self.divide
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out.float()

    def unembed(self, hidden: "torch.Tensor", *, norm: bool = True) -> "torch.Tensor":
        """Logits (float32) for hidden states at any layer.

        ``norm=True`` applies the final norm first (use it for layers 0..L-1; the base model's
        ``last_hidden_state`` is already normed, so pass ``norm=False`` for layer L).
        ``norm=False`` on an intermediate layer is the raw lens that skips the norm (and whatever
        sits between norm and head, unless the state's width needs it).
        """
        return self.logits(self.prepare(hidden, norm=norm))

    # -- the forward primitive: one pass, hidden states of every layer ----------------------------

    @contextlib.contextmanager
    def capture(self, select: Any = None) -> "Iterator[dict[int, torch.Tensor]]":
        """Record layers 0..L-1 (input of block 1, outputs of blocks 1..L-1) during a forward.

        ``select`` indexes the position axis (a slice or index tensor) so only what is needed is
        kept. Layer L is not recorded here: it is the base model's ``last_hidden_state``
        (:meth:`forward` adds it).
        """
        from .compat import block_hidden

        store: dict[int, Any] = {}
        sel = slice(None) if select is None else select

        def pre_hook(_mod: Any, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            store[0] = h[:, sel].detach().clone()  # a copy: a view would keep the whole (B, T, d) tensor alive

        handles = [self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
        for j in range(len(self.blocks) - 1):

            def hook(_mod: Any, _args: Any, out: Any, k: int = j + 1) -> None:
                store[k] = block_hidden(out)[:, sel].detach().clone()

            handles.append(self.blocks[j].register_forward_hook(hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def forward(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor | None" = None, *,
                cache: Any = None, select: Any = None) -> "dict[int, torch.Tensor]":
        """One pass of the base model over a (left-padded) batch → hidden states of layers 0..L,
        each ``(B, positions, d)``, at the positions ``select`` (a slice or index tensor over the
        position axis; ``None``: all).

        Layer L is the base model's ``last_hidden_state`` (normed already: unembed it with
        ``norm=False``). Position ids follow the mask, as ``generate`` makes them, whenever the
        decoder takes them. With ``cache`` (:func:`layerwise.compat.new_cache`) the pass fills
        it, so that decoding can continue from it. The inputs must be on the model's device.
        """
        import torch

        from .compat import forward_kwargs

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = forward_kwargs(self.decoder, attention_mask, cache)
        with torch.inference_mode(), self.capture(select) as store:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None, **kwargs)
        store[self.num_layers] = out.last_hidden_state[:, slice(None) if select is None else select]
        return store
