"""Decode attention with the prompts' keys and values shared by every exit.

The multi-exit decode (:func:`layerwise.decoding.generate_exits`) runs each prompt once per exit
layer. With a plain cache every one of those rows holds its own copy of the prompt's keys and
values at every block it reaches (Σk/L copies on average: 2.5 for exits 8/15/23/30 of 30), and a
decode step reads them all: on the CPU that reading was 12% of the default sweep, and for a
Llama-2-7B shape in float32 compute it was the largest thing the decode allocates.

:class:`SharedPrefix` keeps the prompts' part once per prompt, and each row's generated part in a
buffer of its own; the model runs the step without a cache and the model's "sdpa" attention entry
(overridden while the decode runs) computes each row's attention in two parts — the queries of all
rows of one prompt against that prompt's keys in one matmul, each row against its own generated
keys — joined by their log-sum-exp (as split-K / flash-decoding does). The result is sdpa's up to
float rounding; tests/test_attention.py checks it against sdpa, and the sweep's generations against
truncated-model ``generate``.

It applies where it is proved to (:func:`shares`): CPU, float32, transformers' "sdpa"
attention, plain per-layer caches (no sliding windows or recurrent state), a family whose padded
early exit is exact, and a decode step of two padded prompts run both ways on the model itself
with the same logits. Anything else decodes with the repeated cache, as before.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

_PROBED = "_layerwise_shares_prefix"


def _registry() -> Any:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    local = getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", None)
    return ALL_ATTENTION_FUNCTIONS if isinstance(local, dict) else None


@contextlib.contextmanager
def _sdpa_replaced(fn: Any) -> Iterator[Any]:
    """``fn(original, module, query, key, value, mask, **kw)`` is the "sdpa" attention while the
    block runs (on the registry's instance mapping; restored on exit)."""
    reg = _registry()
    local = reg._local_mapping
    had, before = "sdpa" in local, local.get("sdpa")
    original = reg["sdpa"]

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(original, module, query, key, value, attention_mask, *args, **kwargs)

    local["sdpa"] = attention
    try:
        yield original
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)


def _plain(layers: list[Any]) -> bool:
    return bool(layers) and all(
        type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)
        and layer.keys.dim() == 4 and layer.keys.dtype == torch.float32 for layer in layers)


def shares(model: Any, layers: list[Any], num_layers: int, device: Any) -> bool:
    """Whether the decode of ``model`` may share the prompts' keys and values: CPU, "sdpa",
    float32 plain caches, a family whose padded early exit is exact (layerwise.families), and
    :func:`_prove` (run once per model)."""
    from .families import EARLY_EXIT_EXACT

    config = getattr(model, "config", None)
    if torch.device(device).type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "model_type", None) not in EARLY_EXIT_EXACT or _registry() is None:
        return False
    if len(layers) < num_layers or not _plain(layers[:num_layers]):
        return False
    known = model.__dict__.get(_PROBED)
    if known is None:
        known = _prove(model, num_layers)
        model.__dict__[_PROBED] = known
    return known


def _prove(model: Any, num_layers: int) -> bool:
    """Two left-padded prompts prefilled with a cache, then one decode step both ways — the model's
    own (cache and mask) and the shared prefix (no cache) — must give the same logits (1e-4 of
    their scale), every block's attention having gone through :meth:`SharedPrefix.attend`."""
    from .compat import accepts, cache_kwarg, cache_layers, new_cache, position_ids_from_mask

    if not accepts(model, "position_ids"):
        return False
    dev = model.device
    ids = torch.tensor([[3, 4, 5, 6], [0, 0, 7, 8]], device=dev)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], device=dev)
    step = torch.tensor([[9], [10]], device=dev)
    pos = position_ids_from_mask(mask)[:, -1:] + 1
    calls: list[int] = []
    try:
        with torch.inference_mode():
            cache = new_cache(model.config)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                  **{cache_kwarg(model): cache})
            layers = cache_layers(cache)[:num_layers]
            if len(layers) < num_layers or not _plain(layers):
                return False
            shared = SharedPrefix(layers, mask, torch.arange(2).repeat(2), torch.tensor([0, 0, 1, 1]),
                                  [4] * num_layers, 1)  # two groups: the two-part layout everywhere
            real = shared.attend

            def counted(j: int, *args: Any, **kwargs: Any) -> torch.Tensor:
                calls.append(j)
                return real(j, *args, **kwargs)

            shared.attend = counted  # type: ignore[method-assign]
            with shared.installed():
                got = model(input_ids=step.repeat(2, 1), position_ids=pos.repeat(2, 1),
                            use_cache=False).logits[:, -1].float()
            want = model(input_ids=step, attention_mask=torch.cat([mask, mask.new_ones(2, 1)], dim=1),
                         position_ids=pos, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1].float()
    except Exception:  # noqa: BLE001 - a model that cannot decode this way decodes the plain way
        return False
    scale = float(want.abs().max()) or 1.0
    return (sorted(calls) == list(range(num_layers)) and bool(torch.isfinite(got).all())
            and float((got - want.repeat(2, 1)).abs().max()) <= 1e-4 * scale)


class SharedPrefix:
    """The decode's keys and values. Rows are the decode's batch rows, group-major (``row_slot``:
    the group, ``row_prompt``: the prompt); block ``j`` runs on the first ``active[j]`` of them
    (deepest exit first), so its buffers hold that many rows. A block that more than one group
    reaches keeps the prompts' part once per prompt and each row's generated part in a buffer of
    its own (two-part attention); a block only the first group reaches has one row per prompt, so
    it keeps one buffer per row, prompt part copied in, and attends with sdpa over it."""

    def __init__(self, layers: list[Any], prompt_mask: torch.Tensor, row_prompt: torch.Tensor,
                 row_slot: torch.Tensor, active: list[int], room: int) -> None:
        p, s_len = prompt_mask.shape
        self.prefix = [(layer.keys, layer.values) for layer in layers]  # (P, Hkv, S, D), no copy
        self.mask = prompt_mask.bool()[:, None, None, :]  # (P, 1, 1, S): True where a prompt token is
        self.row_prompt = row_prompt.to(prompt_mask.device)
        self.row_slot = row_slot.to(prompt_mask.device)
        self.prompt_len = s_len
        self.gen: list[tuple[torch.Tensor, ...]] = []
        for (k, v), n in zip(self.prefix, active):
            if n <= p:  # the first group only: rows are the prompts, in order
                pad = (0, 0, 0, room)
                whole_mask = torch.nn.functional.pad(self.mask[:n], (0, room), value=True)
                self.gen.append((torch.nn.functional.pad(k[:n], pad), torch.nn.functional.pad(v[:n], pad), whole_mask))
            else:
                self.gen.append((k.new_empty(n, k.shape[1], room, k.shape[3]), v.new_empty(n, v.shape[1], room, v.shape[3])))
        self.t = 0  # generated positions stored

    def keep(self, keep: torch.Tensor, active: list[int]) -> None:
        """Keep the batch rows ``keep`` (ascending); ``active`` is the rows per block before."""
        for j, bufs in enumerate(self.gen):
            idx = keep[keep < active[j]]
            self.gen[j] = tuple(b.index_select(0, idx) for b in bufs)
        self.row_prompt, self.row_slot = self.row_prompt[keep], self.row_slot[keep]

    def attend(self, j: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Block ``j``'s attention for its ``n`` rows: ``query`` (n, H, 1, D), the step's ``key`` /
        ``value`` (n, Hkv, 1, D), stored at position ``t``. Returns (n, 1, H, D)."""
        n, h, _, d = query.shape
        pk, pv = self.prefix[j]
        p, hkv = pk.shape[0], pk.shape[1]
        g = h // hkv
        t = self.t
        scale = d ** -0.5 if scaling is None else scaling
        if len(self.gen[j]) == 3:  # one row per prompt: its whole cache in one buffer
            wk, wv, wm = self.gen[j]
            end = self.prompt_len + t
            wk[:n, :, end] = key[:, :, 0]
            wv[:n, :, end] = value[:, :, 0]
            out = torch.nn.functional.scaled_dot_product_attention(
                query, wk[:n, :, : end + 1], wv[:n, :, : end + 1], attn_mask=wm[:n, :, :, : end + 1], scale=scale,
                enable_gqa=g > 1)
            return out.transpose(1, 2).contiguous()
        gk, gv = self.gen[j]
        gk[:n, :, t] = key[:, :, 0]
        gv[:n, :, t] = value[:, :, 0]
        q = query.reshape(n, hkv, g, d)
        rp, rs = self.row_prompt[:n], self.row_slot[:n]
        slots = int(rs.max()) + 1  # the groups this block reaches
        # The prompts' part: every row's query beside the other rows of its prompt, one matmul per prompt.
        qp = q.new_zeros(p, hkv, slots, g, d)
        qp[rp, :, rs] = q
        s1 = torch.matmul(qp.view(p, hkv, slots * g, d), pk.transpose(-1, -2)).mul_(scale)
        s1.masked_fill_(~self.mask, float("-inf"))
        m1 = s1.amax(-1, keepdim=True)
        e1 = s1.sub_(m1).exp_()
        l1 = e1.sum(-1, keepdim=True)
        o1 = torch.matmul(e1, pv)  # (P, Hkv, slots·G, D), not yet divided by l1

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x.view(p, hkv, slots, g, x.shape[-1])[rp, :, rs]  # (n, Hkv, G, ·)

        o1, m1, l1 = rows(o1), rows(m1), rows(l1)
        # Each row's generated part.
        s2 = torch.matmul(q, gk[:n, :, : t + 1].transpose(-1, -2)).mul_(scale)  # (n, Hkv, G, t+1)
        m2 = s2.amax(-1, keepdim=True)
        e2 = s2.sub_(m2).exp_()
        l2 = e2.sum(-1, keepdim=True)
        o2 = torch.matmul(e2, gv[:n, :, : t + 1])
        m = torch.maximum(m1, m2)
        a1, a2 = (m1 - m).exp_(), (m2 - m).exp_()
        out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)
        return out.reshape(n, h, 1, out.shape[-1]).transpose(1, 2).contiguous()  # values may be narrower than keys

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """While the block runs, the model's "sdpa" attention is :meth:`attend` for single-query
        calls (the decode steps), and the original for anything else."""

        def fn(original: Any, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: Any, *args: Any, scaling: float | None = None, **kwargs: Any) -> Any:
            j = getattr(module, "layer_idx", None)
            if query.shape[2] != 1 or key.shape[2] != 1 or not isinstance(j, int):
                return original(module, query, key, value, mask, *args, scaling=scaling, **kwargs)
            return self.attend(j, query, key, value, scaling), None

        with _sdpa_replaced(fn):
            yield
