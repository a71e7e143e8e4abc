"""Every transformers internal that layerwise relies on, in one place.

The engine drives the decoder below ``generate``: it fills and reshapes the KV cache itself, calls
the base model with that cache, and wraps the blocks. The parts of transformers this touches have
changed between releases, and this module is where each difference is absorbed — the next change
of transformers is one place to fix. Supported: transformers 4.56 (the first release whose cache
keeps per-layer ``keys`` / ``values``) up to the newest 5.x that CI runs; see README
("Supported versions").

What differs, and where it is handled here:

- the cache argument of ``forward``: ``past_key_values`` up to 5.1x, ``cache`` later
  (:func:`cache_kwarg`);
- ``DynamicCache(config=...)`` builds one layer per block, sliding-window layers where the config
  says so (both lines); its layers keep ``keys`` / ``values`` tensors of shape
  ``(batch, heads, tokens, head_dim)``, and some layers more per-row state, which their
  ``reorder_cache`` selects along (:func:`cache_layers`, :func:`select_cache_rows`);
- ``Cache.crop(n)``: 4.x reads a positive ``n`` as the length to keep, 5.x refuses it — both
  remove ``|n|`` tokens for a negative ``n``, and 4.x keeps nothing for ``crop(0)``
  (:func:`crop_cache`);
- a decoder block returns its hidden states as a tensor in 5.x, but as a tuple
  ``(hidden_states, ...)`` in 4.x for GPT-2, GPT-NeoX, OPT and Gemma-2 (:func:`block_hidden`,
  :func:`block_output`);
- which of a block's arguments are per row (sliced with the batch) and which are shared
  (``cache_position``) (:func:`slice_block_call`);
- whether a model's ``forward`` takes ``position_ids`` (:func:`accepts`), and the positions of a
  left-padded batch the way ``generate`` makes them (:func:`position_ids_from_mask`);
- ``DynamicLayer.update`` concatenates every new token onto its keys and values (a copy of the
  whole cache per step); :func:`preallocated` gives a decode room to write in place.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any, Iterator

import torch


def accepts(module: Any, name: str) -> bool:
    """Whether ``module.forward`` takes an argument ``name`` (True when it cannot be told)."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True


def cache_kwarg(module: Any) -> str:
    """Name of the KV-cache argument of ``module.forward``: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (before)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` with one layer per block of the model described by ``config``."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def cache_layers(cache: Any) -> list[Any]:
    """The per-block layers of a cache, each holding ``keys`` / ``values`` tensors."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's cache has no per-layer storage (cache.layers); "
                           "layerwise needs transformers >= 4.56")
    return layers


def select_cache_rows(layer: Any, index: torch.Tensor) -> None:
    """Keep (or repeat) the rows ``index`` of one cache layer: keys and values, and whatever else
    the layer holds per row (indexer keys, convolution and recurrent states) — the layer's own
    ``reorder_cache`` (4.56 on) knows its state; a layer without one has its keys and values
    index-selected."""
    reorder = getattr(layer, "reorder_cache", None)
    if reorder is not None:
        reorder(index)
        return
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor) and t.numel():
            setattr(layer, name, t.index_select(0, index.to(t.device)))


def crop_cache(cache: Any, tokens: int) -> None:
    """Drop the last ``tokens`` positions from every layer of ``cache``, and free them: a cropped
    layer's keys and values are views of the longer tensors until they are copied."""
    if tokens > 0:
        cache.crop(-tokens)
        for layer in cache_layers(cache):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and not t.is_contiguous():
                    setattr(layer, name, t.contiguous())


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions for a left-padded batch, the way ``generate`` makes them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def forward_kwargs(module: Any, mask: torch.Tensor, cache: Any = None) -> dict[str, Any]:
    """The keyword arguments layerwise adds to a ``forward`` over a left-padded batch: the cache
    under the name this transformers uses (when given) and the positions (when taken)."""
    kwargs: dict[str, Any] = {}
    if cache is not None:
        kwargs[cache_kwarg(module)] = cache
    if accepts(module, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(mask)
    return kwargs


def block_hidden(out: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def block_output(hidden: torch.Tensor, like: Any) -> Any:
    """``hidden`` returned the way a block returns its output, ``like`` being one such output (or
    :func:`output_form` of one): a tensor, or a tuple whose other items are kept."""
    return (hidden, *like[1:]) if isinstance(like, tuple) else hidden


def output_form(out: Any) -> tuple | None:
    """What :func:`block_output` needs to know of a block's output, without keeping its tensors:
    ``None`` for a tensor, a tuple of as many ``None`` for a tuple."""
    return (None,) * len(out) if isinstance(out, tuple) else None


def _slice_rows(x: Any, batch: int, n: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() >= 2 and x.shape[0] == batch else x
    if isinstance(x, tuple) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(_slice_rows(t, batch, n) for t in x)
    return x


def slice_block_call(args: tuple, kwargs: dict[str, Any], batch: int, n: int) -> tuple[list[Any], dict[str, Any]]:
    """A block's arguments for its first ``n`` rows of ``batch``: every per-row tensor (attention
    mask, position ids, rotary ``position_embeddings``) is cut; ``cache_position`` (one per
    position, shared by the rows) and non-tensors (the cache, flags) are passed as they are."""
    sub_args = [_slice_rows(a, batch, n) for a in args]
    sub_kwargs = {k: (v if k == "cache_position" else _slice_rows(v, batch, n)) for k, v in kwargs.items()}
    return sub_args, sub_kwargs


def context_length(model: Any) -> int | None:
    """The longest sequence the model's config allows, under whichever name its family uses."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _update_in_place(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    kb, vb = layer.layerwise_buffers
    t, n = layer.keys.shape[-2], key_states.shape[-2]
    if t + n > kb.shape[-2]:  # out of room: grow (doubling), as the concatenation would have
        grow = max(t + n, 2 * kb.shape[-2]) - kb.shape[-2]
        kb = torch.nn.functional.pad(kb, (0, 0, 0, grow))
        vb = torch.nn.functional.pad(vb, (0, 0, 0, grow))
        layer.layerwise_buffers = (kb, vb)
    kb[:, :, t:t + n].copy_(key_states)
    vb[:, :, t:t + n].copy_(value_states)
    layer.keys, layer.values = kb[:, :, :t + n], vb[:, :, :t + n]
    return layer.keys, layer.values


def _reorder_in_place(layer: Any, index: torch.Tensor) -> None:
    kb, vb = layer.layerwise_buffers
    t = layer.keys.shape[-2]
    idx = index.to(kb.device)
    kb, vb = kb.index_select(0, idx), vb.index_select(0, idx)
    layer.layerwise_buffers = (kb, vb)
    layer.keys, layer.values = kb[:, :, :t], vb[:, :, :t]


@contextlib.contextmanager
def preallocated(layers: list[Any], extra: int) -> Iterator[None]:
    """Room for ``extra`` more tokens in every plain ``DynamicLayer`` of ``layers``: its keys and
    values become views of buffers that ``update`` writes into (``reorder_cache`` selects rows of
    the buffers), instead of a concatenation that copies the whole cache at every token. Other
    layers (sliding windows, recurrent states) are left as they are. On exit the layers are
    plain again (keys and values compacted)."""
    patched = []
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if type(layer).__name__ != "DynamicLayer" or not isinstance(keys, torch.Tensor) or keys.dim() != 4 or not keys.numel():
            continue
        kb = torch.nn.functional.pad(keys, (0, 0, 0, extra))
        vb = torch.nn.functional.pad(layer.values, (0, 0, 0, extra))
        layer.layerwise_buffers = (kb, vb)
        layer.keys, layer.values = kb[:, :, :keys.shape[-2]], vb[:, :, :keys.shape[-2]]
        layer.update = types.MethodType(_update_in_place, layer)
        layer.reorder_cache = types.MethodType(_reorder_in_place, layer)
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.update, layer.reorder_cache, layer.layerwise_buffers
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
