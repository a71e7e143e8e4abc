"""The logit lens on one prompt of your own, as an object with statistics methods — the engine of
the ``logit_lens`` fixture (in the spirit of tuned-lens's ``PredictionTrajectory``).

``Probe(bundle)("The capital of France is")`` runs the prompt once through the model
(:meth:`Adapter.forward`) and keeps, for every layer 0..L, the lens's log-probabilities of the next
token at the prompt's last position (layers 0..L-1 through the final norm and head; layer L is the
model's own logits): a :class:`PromptLens`. Layer k is the output of block k, layer 0 the
embeddings, as everywhere in layerwise. Results are cached per (prompt, position).

A token is a token id or a string; a string is encoded as the tokenizer encodes it on its own,
without special tokens, and must be exactly one token: in most vocabularies a word after a space
is one token *with* its space (``" Paris"``, not ``"Paris"``). Anything else is refused with one
line that shows how the string tokenizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ProbeError

Token = int | str


@dataclass(frozen=True)
class PromptLens:
    """The lens at one position of one prompt: ``log_probs[k]`` is layer k's next-token
    distribution (log-probabilities over the vocabulary, float32), k = 0..L."""

    prompt: str
    ids: list[int]
    position: int  # the position read (an index into ids; the last by default)
    log_probs: torch.Tensor = field(repr=False)  # (L+1, V)
    tokenizer: Any = field(repr=False, compare=False)

    # -- shape -----------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """L, the number of blocks: layers are 0..L."""
        return self.log_probs.shape[0] - 1

    @property
    def layers(self) -> range:
        return range(self.num_layers + 1)

    @property
    def tokens(self) -> list[str]:
        """The prompt's tokens as the tokenizer writes them."""
        return list(self.tokenizer.convert_ids_to_tokens(self.ids))

    # -- tokens ----------------------------------------------------------------------------------

    def token_id(self, token: Token) -> int:
        """A token id, or a string that the tokenizer encodes as exactly one token → its id."""
        V = self.log_probs.shape[1]
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise ProbeError(f"a token must be a string or a token id, got {token!r}",
                             "pass a string such as ' Paris' or an int id")
        if isinstance(token, int):
            if not 0 <= token < V:
                raise ProbeError(f"token id {token} is outside the vocabulary (0..{V - 1})", "pass an id of this tokenizer")
            return token
        ids = list(self.tokenizer.encode(token, add_special_tokens=False))
        if len(ids) == 1 and 0 <= ids[0] < V:
            return int(ids[0])
        pieces = [self.text(i) for i in ids]
        hint = ""
        stripped = token.strip()
        if stripped and not token.startswith(" "):
            alt = " " + stripped
            if len(self.tokenizer.encode(alt, add_special_tokens=False)) == 1:
                hint = f"; {alt!r} (with a leading space, as after a word) is one token"
        raise ProbeError(
            f"{token!r} is not one token of this tokenizer: it encodes as {len(ids)} tokens {pieces!r}{hint}",
            "pass exactly one token (leading spaces matter: a word after a space is usually ' word'), or its id")

    def text(self, token_id: int) -> str:
        """A token id as text."""
        try:
            return str(self.tokenizer.decode([int(token_id)]))
        except Exception:  # noqa: BLE001 - a display string only
            return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def _layer(self, layer: int) -> int:
        L = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(L + 1) <= layer <= L:
            raise ProbeError(f"layer {layer!r} is not a layer of this model (0..{L}; layer k = output of block k, "
                             "0 = embeddings)", f"pass a layer between 0 and {L} (or -1 for the last)")
        return layer % (L + 1)

    # -- statistics ------------------------------------------------------------------------------

    def log_prob(self, layer: int, token: Token) -> float:
        return float(self.log_probs[self._layer(layer), self.token_id(token)])

    def prob(self, layer: int, token: Token) -> float:
        """The probability layer ``layer`` gives ``token`` as the next token."""
        return math.exp(self.log_prob(layer, token))

    def rank(self, layer: int, token: Token) -> int:
        """1 for the layer's most likely token: 1 + the number of tokens strictly more likely."""
        row = self.log_probs[self._layer(layer)]
        return 1 + int(torch.count_nonzero(row > row[self.token_id(token)]))

    def entropy(self, layer: int) -> float:
        """The entropy (nats) of layer ``layer``'s next-token distribution."""
        lp = self.log_probs[self._layer(layer)]
        return float(-(lp.exp() * lp).sum(dtype=torch.float64))

    def kl_to_final(self, layer: int) -> float:
        """KL(final layer ‖ layer), nats."""
        lp, lf = self.log_probs[self._layer(layer)], self.log_probs[-1]
        return float((lf.exp() * (lf - lp)).sum(dtype=torch.float64))

    def top(self, layer: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most likely next tokens at ``layer``: [(text, probability)], most likely first."""
        vals, ids = self.log_probs[self._layer(layer)].topk(k)
        return [(self.text(i), float(v.exp())) for i, v in zip(ids.tolist(), vals)]

    def top_ids(self, layer: int, k: int = 5) -> list[int]:
        return self.log_probs[self._layer(layer)].topk(k).indices.tolist()

    def first_layer(self, token: Token, rank: int = 1) -> int | None:
        """The first layer from which ``token`` stays within the top ``rank`` at every deeper layer
        (its decision depth); None when it is not within the top ``rank`` at the last layer."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ProbeError(f"rank must be a whole number ≥ 1, got {rank!r}", "pass rank=1 for the top token")
        tid = self.token_id(token)
        ref = self.log_probs[:, tid].unsqueeze(1)
        within = torch.count_nonzero(self.log_probs > ref, dim=1) < rank  # (L+1,)
        if not bool(within[-1]):
            return None
        k = self.num_layers
        while k > 0 and bool(within[k - 1]):
            k -= 1
        return k

    def table(self, k: int = 3, layers: Any = None) -> str:
        """The top-``k`` tokens by layer as text (for a failing assertion's message, or print)."""
        rows = [f"logit lens of {self.prompt!r} at position {self.position} (layer k = output of block k)"]
        for layer in (self.layers if layers is None else layers):
            tops = ", ".join(f"{t!r} {p:.3f}" for t, p in self.top(layer, k))
            rows.append(f"  layer {layer:>3}: {tops}  (entropy {self.entropy(layer):.2f})")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


class Probe:
    """Callable on a prompt → :class:`PromptLens`; caches each (prompt, position)."""

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle
        self._cache: dict[tuple[str, int], PromptLens] = {}

    def __call__(self, prompt: str, position: int = -1) -> PromptLens:
        if not isinstance(prompt, str) or not prompt:
            raise ProbeError(f"the prompt must be a non-empty string, got {prompt!r}", "pass the text to read, e.g. \"The capital of France is\"")
        key = (prompt, position)
        if key not in self._cache:
            self._cache[key] = self._run(prompt, position)
        return self._cache[key]

    def _run(self, prompt: str, position: int) -> PromptLens:
        adapter = self.bundle.adapter
        ids = list(self.bundle.tokenizer.encode(prompt))
        if not -len(ids) <= position < len(ids) or isinstance(position, bool):
            raise ProbeError(f"position {position} is outside the prompt's {len(ids)} tokens",
                             f"pass a position between {-len(ids)} and {len(ids) - 1} (-1: the last)")
        pos = position % len(ids)
        L = adapter.num_layers
        dev = self.bundle.device
        x = torch.tensor([ids], device=dev)
        hidden = adapter.forward(x, torch.ones_like(x), select=slice(pos, pos + 1))
        with torch.inference_mode():
            h = torch.cat([adapter.prepare(hidden[k][:, 0], norm=True) for k in range(L)]
                          + [adapter.prepare(hidden[L][:, 0], norm=False)])
            logp = torch.log_softmax(adapter.logits(h), dim=-1).cpu()
        return PromptLens(prompt=prompt, ids=ids, position=pos, log_probs=logp, tokenizer=self.bundle.tokenizer)
