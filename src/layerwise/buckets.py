"""Length buckets: a left-padded forward run as sub-batches of similar prompt length.

A batch left-padded to its longest prompt spends compute on padding: on the default 20 rows,
36% of the prompts' prefill. Each row's computation is independent of the others (its positions
follow its own mask, padded keys are masked out), so rows grouped by prompt length can run as
sub-batches, each padded only to its own longest prompt; the hidden states and the KV cache are
then put back together, left-padded to the common length, in the original row order — what
decoding and the lens read is laid out as if one padded forward had run.

Only for decoders that take position ids (so a row's positions do not depend on its padding) and
caches whose every layer is a plain ``DynamicLayer`` (keys and values, nothing else per row); any
other model (sliding windows, recurrent states, positions from the cache) gets the one padded
forward.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import accepts, cache_layers, new_cache

#: What one more sub-batch costs, in padded tokens (per-call overhead; on a GPU padding is cheap).
OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}


def plan(lengths: list[int], extra: int, overhead: int) -> list[list[int]]:
    """Rows grouped into buckets of consecutive lengths (rows in length order, ties by index),
    minimizing Σ rows × (longest + ``extra``) + ``overhead`` × buckets (exact, by dynamic
    programming); each bucket's rows in ascending index order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]] + extra
        for i in range(j):
            c = best[i] + (j - i) * longest + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def _plain_layers(cache: Any) -> bool:
    try:
        layers = cache_layers(cache)
    except RuntimeError:
        return False
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _shifted(select: Any, shift: int) -> Any:
    """``select`` (a slice over the position axis) for a batch whose first ``shift`` columns were cut."""
    if isinstance(select, slice) and select.step in (None, 1):
        def move(x: int | None) -> int | None:
            return x - shift if x is not None and x >= 0 else x
        return slice(move(select.start), move(select.stop))
    return None  # not expressible: the caller does not bucket


def applies(adapter: Any, cache: Any, select: Any) -> bool:
    """Whether :func:`forward` may bucket for this model, cache and ``select``."""
    config = getattr(adapter.decoder, "config", None)
    return (_shifted(select, 0) is not None and config is not None and accepts(adapter.decoder, "position_ids")
            and (cache is None or _plain_layers(new_cache(config))))


def forward(adapter: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, *, cache: Any = None,
            select: Any = None, overhead: int | None = None) -> dict[int, torch.Tensor]:
    """``adapter.forward(ids, mask, cache=cache, select=select)`` for a batch of prompts
    left-padded to ``prompt_len`` (followed by columns common to all rows, e.g. right-padded
    references), run in length buckets where that saves compute. ``select``: a slice over the
    position axis (anything else: one padded forward)."""
    lengths = [int(x) for x in mask[:, :prompt_len].sum(1).tolist()]
    if overhead is None:
        overhead = OVERHEAD_TOKENS["cuda" if ids.device.type == "cuda" else "cpu"]
    groups = plan(lengths, ids.shape[1] - prompt_len, overhead)
    if len(groups) == 1 or not applies(adapter, cache, select):
        return adapter.forward(ids, mask, cache=cache, select=select)
    config = adapter.decoder.config
    stores, caches, shifts = [], [], []
    for g in groups:
        idx = torch.tensor(g, device=ids.device)
        shift = prompt_len - max(lengths[i] for i in g)  # columns that are padding in every row of g
        sub_cache = new_cache(config) if cache is not None else None
        stores.append(adapter.forward(ids[idx, shift:], mask[idx, shift:], cache=sub_cache, select=_shifted(select, shift)))
        caches.append(sub_cache)
        shifts.append(shift)
    inverse = torch.empty(len(lengths), dtype=torch.long)
    inverse[torch.tensor([i for g in groups for i in g])] = torch.arange(len(lengths))
    store = {}
    for k in stores[0]:
        merged = torch.cat([s[k] for s in stores], dim=0)
        store[k] = merged.index_select(0, inverse.to(merged.device))
    if cache is not None:
        def merged(parts: list[torch.Tensor]) -> torch.Tensor:  # left-padded back to the common length, rows in order
            out = torch.cat([torch.nn.functional.pad(t, (0, 0, s, 0)) for t, s in zip(parts, shifts)], dim=0)
            return out.index_select(0, inverse.to(out.device))

        per_bucket = [cache_layers(c) for c in caches]
        for li in range(len(per_bucket[0])):
            cache.update(merged([layers[li].keys for layers in per_bucket]),
                         merged([layers[li].values for layers in per_bucket]), li)
            for layers in per_bucket:  # the buckets' copy of this layer is merged: free it now, not at the end
                layers[li].keys = layers[li].values = None
    return store
