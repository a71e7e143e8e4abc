"""What layerwise knows about each model family beyond where its parts are: whether its lens can
be proven and whether its early exit is exact — as data.

Every model type transformers maps to ``AutoModelForCausalLM`` was tried on a tiny random model
(tests/test_families.py, which writes docs/architectures.md): the load-time proof, the lens
against a copy of the model cut to k blocks, and early exit against that copy's own ``generate``.
The test fails when these tables and what it sees disagree, so they cannot go stale.

- :data:`LENS_REFUSED`: the proof refuses the lens (refused before any weights load).
- :data:`EARLY_EXIT_EXACT`: early exit equals the cut copy's ``generate``, batched.
- :data:`EARLY_EXIT_UNPADDED`: exact one prompt at a time only (left padding changes the model's
  outputs); layerwise decodes these one prompt at a time.
- :data:`EARLY_EXIT_REFUSED`: not exact, or not provable; refused with the reason (the lens works).

A model type in none of them (remote code, a newer transformers) gets the lens, proven at load,
and no early exit: it was never shown to be exact.
"""

from __future__ import annotations

from .errors import ConfigError, UnsupportedArchitectureError

# Reasons shared by several families.
_PAD_INDEX_POSITIONS = ("it numbers positions from its padding index, not 0..T-1 as the lens passes them "
                        "(without position ids it matches)")
_STREAMS_HC = 'it keeps several residual streams per position (hyper-connections); the lens reads one'
_DRAFT = "a draft model: its forward needs the target model's states"
_ATTN_RESIDUALS = "its last block's output through its head is not its logits (attention residuals)"
_INDEXED = 'left padding changes its sparse (indexed) attention'
_PAD_POSITIONS = 'its decoder counts positions from the first token, pads included'
_PADDED_BATCH = 'a left-padded batch decodes differently from each prompt alone'
_ALIBI = 'its ALiBi bias is built for the whole batch, so blocks cannot run on some rows only'
_STATE_SPACE = 'the decode differs from generate from the second new token on (state-space cache)'
_CUT_FAILS = ("a copy cut to fewer blocks cannot run (its per-layer inputs are sized by the full depth), "
              "so it cannot be proven")
_OUTSIDE_CACHE = 'it keeps per-row state outside its cache layers, which the decode does not split by exit'
_OWN_CACHE = 'it keeps its recurrent state in a cache of its own, which the decode does not split by exit'

LENS_REFUSED: dict[str, str] = {
    'blt': "a byte-level model: its last block's output through its head is not its logits",
    'camembert': _PAD_INDEX_POSITIONS,
    'cpmant': 'it prepends prompt tokens, so its blocks see more positions than its input has',
    'data2vec-text': _PAD_INDEX_POSITIONS,
    'deepseek_v4': _STREAMS_HC,
    'dory': 'it runs its blocks in a loop (4 block calls for 2 blocks): there is no layer k = block k',
    'gemma3n_text': 'it keeps several residual streams per position (AltUp); the lens reads one',
    'gemma4_assistant': _DRAFT,
    'gemma4_unified_assistant': _DRAFT,
    'hrm_text': 'it runs its blocks in loops (24 and 8 calls for 4 blocks each): no layer k = block k',
    'hy_v4': _STREAMS_HC,
    'inkling2_loop_text': _ATTN_RESIDUALS,
    'inkling2_text': _ATTN_RESIDUALS,
    'mllama': 'its cross-attention blocks do not run on text alone (3 of 4 blocks ran)',
    'prophetnet': 'it predicts several future tokens per position (n-gram streams)',
    'reformer': 'it keeps two residual streams per position (reversible layers); the lens reads one',
    'roberta': _PAD_INDEX_POSITIONS,
    'roberta-prelayernorm': _PAD_INDEX_POSITIONS,
    'xlm': 'its blocks are split over parallel lists (attentions, feed-forwards, norms)',
    'xlm-roberta': _PAD_INDEX_POSITIONS,
    'xlm-roberta-xl': _PAD_INDEX_POSITIONS,
    'xlnet': 'it works in (positions, batch) order with two attention streams',
    'xmod': _PAD_INDEX_POSITIONS,
}

EARLY_EXIT_EXACT: frozenset[str] = frozenset({
    'afmoe', 'apertus', 'apertus1p5_text', 'arcee', 'aria_text', 'axk1', 'bailing_hybrid',
    'bamba', 'beam', 'bert', 'bert-generation', 'big_bird', 'biogpt', 'bitnet',
    'blenderbot-small', 'codegen', 'cohere', 'cohere2', 'cohere2_moe', 'cohere_compass_text',
    'ctrl', 'cwm', 'dbrx', 'deepseek_v2', 'deepseek_v3', 'diffllama', 'doge', 'dots1',
    'electra', 'emu3', 'ergo', 'ernie', 'ernie4_5', 'ernie4_5_moe', 'exaone', 'exaone4',
    'exaone_moe', 'falcon', 'falcon_h1', 'flex_olmo', 'flint', 'fuyu', 'gemma', 'gemma2',
    'gemma3', 'gemma3_text', 'gemma4_unified', 'gemma4_unified_text', 'glm', 'glm4',
    'glm4_moe', 'glm4_moe_lite', 'got_ocr2', 'gpt-sw3', 'gpt2', 'gpt_bigcode', 'gpt_neo',
    'gpt_neox', 'gpt_neox_japanese', 'gpt_oss', 'gptj', 'granite', 'granite_swa', 'granitemoe',
    'granitemoe_swa', 'granitemoehybrid', 'granitemoeshared', 'helium', 'hunyuan_v1_dense',
    'hunyuan_v1_moe', 'hy_v3', 'hyperclovax', 'inkling_text', 'internlm3', 'iquestcoder',
    'jais2', 'jamba', 'jetmoe', 'kimi_linear', 'kolibri1', 'laguna', 'lara_mini', 'lfm2',
    'lfm2_moe', 'lfm3', 'llama', 'llama4', 'llama4_text', 'mamba2', 'megatron-bert', 'mellum',
    'mimo_v2_flash', 'minicpm3', 'minicpm5_moe', 'minimax_m2', 'minimax_m3_vl_text',
    'ministral', 'ministral3', 'mistral', 'mixtral', 'modernbert-decoder', 'moshi', 'nanochat',
    'nemotron', 'nemotron_h', 'olmo', 'olmo2', 'olmo3', 'olmo_hybrid', 'olmoe', 'opt',
    'param2moe', 'persimmon', 'phi', 'phi3', 'phi4_multimodal', 'phimoe', 'qwen2', 'qwen2_moe',
    'qwen3', 'qwen3_5', 'qwen3_5_moe', 'qwen3_5_moe_text', 'qwen3_5_text', 'qwen3_moe',
    'qwen3_next', 'rembert', 'roc_bert', 'roformer', 'sarvam_mla', 'sarvam_moe', 'seed_oss',
    'smollm3', 'solar_open', 'stablelm', 'starcoder2', 'vaultgemma', 'xglm', 'youtu', 'zamba',
    'zamba2',

})

EARLY_EXIT_UNPADDED: dict[str, str] = {
    'axk2': _INDEXED,
    'bart': _PAD_POSITIONS,
    'bigbird_pegasus': _PAD_POSITIONS,
    'deepseek_v32': _INDEXED,
    'dots3_note': _INDEXED,
    'dots3_note_text': _INDEXED,
    'git': _PADDED_BATCH,
    'glm_moe_dsa': _INDEXED,
    'marian': _PAD_POSITIONS,
    'mbart': _PAD_POSITIONS,
    'moss_transcribe_diarize': _PADDED_BATCH,
    'mvp': _PAD_POSITIONS,
    'pegasus': _PAD_POSITIONS,
    'plbart': _PAD_POSITIONS,
    'trocr': _PAD_POSITIONS,
    'whisper': _PAD_POSITIONS,
}

EARLY_EXIT_REFUSED: dict[str, str] = {
    'blenderbot': "decoding fails in its cache (IndexError in transformers' cache)",
    'bloom': _ALIBI,
    'falcon_mamba': _STATE_SPACE,
    'gemma4': _CUT_FAILS,
    'gemma4_text': _CUT_FAILS,
    'longcat_flash': 'each block holds two attention layers, a cache layer each; the decode maps one to a block',
    'mamba': _STATE_SPACE,
    'minimax': 'it needs a cache class of its own',
    'mpt': _ALIBI,
    'kolibri1_1': 'decoding fails, batched and alone (shape errors in its indexed attention, whose keys and values later blocks share)',
    'openai-gpt': 'it has no KV cache',
    'qwen4_exp': _OUTSIDE_CACHE,
    'qwen4_exp_text': _OUTSIDE_CACHE,
    'recurrent_gemma': "the decode differs from generate (its recurrent blocks' state)",
    'rwkv': _OWN_CACHE,
    'xlstm': _OWN_CACHE,
    'zaya': 'its blocks take a per-row input the decode cannot split by rows',
}


def refuse_early(model_type: str) -> None:
    """Raise for a model type whose lens is known not to be provable (call before loading weights)."""
    why = LENS_REFUSED.get(model_type)
    if why is not None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported: {why}",
            "layerwise refuses rather than show a wrong lens (docs/architectures.md lists every family)",
        )


def early_exit_refusal(model_type: str) -> str | None:
    """Why early exit is refused for this model type, or None when it is exact."""
    if model_type in EARLY_EXIT_EXACT or model_type in EARLY_EXIT_UNPADDED:
        return None
    why = EARLY_EXIT_REFUSED.get(model_type) or "it has not been shown to be exact for this family"
    return f"early exit is not available for model_type {model_type!r}: {why}"


def check_early_exit(model_type: str, padded: bool = False) -> None:
    """Raise (one line) when early exit is refused for this family, or is exact only unpadded and
    the prompts are left-padded."""
    why = early_exit_refusal(model_type)
    if why is not None:
        raise UnsupportedArchitectureError(why, "run the lens alone (it is proven for this model); "
                                           "docs/architectures.md lists every family")
    if padded and model_type in EARLY_EXIT_UNPADDED:
        raise ConfigError(
            f"early exit for model_type {model_type!r} is exact one prompt at a time only: "
            f"{EARLY_EXIT_UNPADDED[model_type]}",
            "pass one prompt per call (no left padding)",
        )


def batch_prompts(model_type: str, lens_proof: dict | None) -> bool:
    """Whether prompts of different lengths may share a left-padded batch: not for a family whose
    early exit is exact one prompt at a time, nor for a model whose load proof saw its logits move
    with left padding."""
    return model_type not in EARLY_EXIT_UNPADDED and bool((lens_proof or {}).get("left_padding_exact", True))
