"""Tiny random models of every supported family, built from configs (no download).

Weights are initialised with a larger spread than the library default so that next-token
distributions are peaked and greedy decoding has no near-ties: equality tests then compare real
choices, not rounding noise.
"""

from __future__ import annotations

import functools
from typing import Any

VOCAB = 96
HIDDEN = 32
LAYERS = 4
HEADS = 4


def _common() -> dict[str, Any]:
    return dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def configs() -> dict[str, Any]:
    import transformers as tf

    c = _common()
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256, **c)
    return {
        "llama": tf.LlamaConfig(**llama_like),
        "mistral": tf.MistralConfig(sliding_window=64, **llama_like),
        "qwen2": tf.Qwen2Config(**llama_like),
        "gemma2": tf.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                                  sliding_window=64, query_pre_attn_scalar=8, **llama_like),
        "phi3": tf.Phi3Config(**llama_like),
        "gpt2": tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256, **c),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, max_position_embeddings=256, **c),
        "opt": tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            max_position_embeddings=256, word_embed_proj_dim=HIDDEN, **c),
    }


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox", "opt")


class TinyTokenizer:
    """Just enough of a tokenizer for the engine: ids are characters mod the vocab."""

    def __init__(self) -> None:
        self.pad_token_id = 0
        self.eos_token_id = 2
        self.bos_token_id = 1
        self.pad_token = "<pad>"
        self.eos_token = "</s>"
        self.padding_side = "left"
        self.chat_template = None

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        if isinstance(ids, int):
            return f"t{ids}"
        return [f"t{i}" for i in ids]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i in (0, 1, 2)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + (ord(ch) % (VOCAB - 3)) for ch in text]


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, seed: int = 0, std: float = 0.3) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = configs()[family]
    cfg.initializer_range = std
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if family == "gemma2" else None)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def tiny_bundle(family: str, seed: int = 0) -> Any:
    from layerwise.models import bundle_from_model

    return bundle_from_model(tiny_model(family, seed), TinyTokenizer(), name=f"tiny-{family}")


def truncated_copy(model: Any, k: int, spec: Any = None) -> Any:
    """An independent reference: a deep copy of ``model`` whose block list is cut to ``k``.

    ``spec`` names the blocks (default: the family's table row, else discovered). The config is
    cut to match: every depth field becomes ``k`` and every per-block list (layer types, block
    kinds, ...) keeps its first ``k`` entries, so the copy builds its caches and masks for ``k``
    blocks.
    """
    import copy

    import torch

    from layerwise.archs import ARCHITECTURES, Adapter, text_config
    from layerwise.discover import discover

    spec = spec or ARCHITECTURES.get(model.config.model_type) or discover(model)
    L = Adapter(model, spec).num_layers
    ref = copy.deepcopy(model)
    adapter = Adapter(ref, spec)
    parent_path, _, attr = spec.blocks.rpartition(".")
    parent = ref.get_submodule(parent_path) if parent_path else ref
    setattr(parent, attr, torch.nn.ModuleList(list(adapter.blocks)[:k]))
    for cfg in {id(ref.config): ref.config, id(text_config(ref.config)): text_config(ref.config)}.values():
        for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
            if isinstance(getattr(cfg, name, None), int):
                setattr(cfg, name, k)
        for name, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == L and not name.startswith("_"):
                setattr(cfg, name, value[:k])
    return ref


def left_pad(seqs: list[list[int]], pad: int = 0) -> tuple[Any, Any]:
    """Left-padded ids and attention mask of token lists, as a tokenizer with left padding gives them."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def random_lens(bundle: Any, seed: int = 0, scale: float = 0.15, frozen: bool = True) -> Any:
    """A tuned lens for ``bundle`` with random translators (not the identity), so that tuned and
    plain readings differ; ``frozen``: without gradients."""
    import torch

    from layerwise.tuned import TunedLens, model_identity

    L, d = bundle.adapter.num_layers, bundle.info["hidden_size"]
    lens = TunedLens(L, d, model=model_identity(bundle))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(L, d, d, generator=g) * scale)
        lens.bias.copy_(torch.randn(L, d, generator=g) * scale)
    return lens.requires_grad_(not frozen)
