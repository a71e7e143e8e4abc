"""A tiny random model of every model type transformers maps to ``AutoModelForCausalLM``.

``tiny_config(model_type)`` starts from the config class's defaults and shrinks every size it
knows (:data:`SIZES`: hidden width, blocks, heads, experts, state sizes, ...) to a few units;
:data:`OVERRIDES` holds what a family needs beyond that (its own field names, constraints its
config validates). Features that change how blocks run are switched on and made to bite on short
prompts: sliding windows of 4 tokens, every block a mixture of experts where the family has
them, hybrid layer patterns that mix attention and state-space blocks.

Built models are float32, in eval mode, with a larger initialisation spread than the library's
(next-token distributions peaked, so greedy decoding compares real choices, not near-ties).
"""

from __future__ import annotations

import dataclasses
from typing import Any

VOCAB = 96
HIDDEN = 32
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_PARAMS = 3_000_000

SIZES: dict[str, Any] = {
    # widths and depths
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "decoder_ffn_dim": 64,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS, "decoder_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "decoder_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "attention_hidden_size": HIDDEN, "rotary_dim": 4,
    # mixture of experts: every block routed where the family allows it
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "num_experts_per_token": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 0,
    # multi-head latent attention
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "qk_head_dim": 8,
    # sliding windows shorter than the test prompts
    "sliding_window": 4, "sliding_window_size": 4,
    # state-space / linear-attention layers
    "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
    "state_size": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4,
    "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS, "swa_head_dim": HEAD_DIM,
    # what the *ForCausalLM does to its logits, made to bite (scales away from 1, caps below the logits)
    "logits_scaling": 2.0, "lm_head_multiplier": 0.5, "logit_scale": 0.5, "logits_mup_width_multiplier": 3.0,
    "final_logit_softcapping": 5.0, "logits_soft_cap": 5.0, "output_logit_soft_cap": 5.0,
    # ids inside the vocabulary, no multi-token prediction heads
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "num_nextn_predict_layers": 0,
}

DEPTHS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
# Sizes whose default None switches a feature off (no sliding window, no query LoRA): left off.
OPTIONAL = {"sliding_window", "sliding_window_size", "q_lora_rank", "logit_scale", "final_logit_softcapping",
            "logits_soft_cap", "output_logit_soft_cap"}

OVERRIDES: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1, 3]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "cpmant": {"dim_head": HEAD_DIM, "dim_ff": 64, "position_bias_num_buckets": 32, "position_bias_max_distance": 64,
               "prompt_types": 3, "prompt_length": 2},
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
    "dots1": {"n_shared_experts": 1},
    "dots3_note_text": {"num_key_value_heads": HEADS, "per_layer_config": {}, "shared_experts_intermediate_size": 32},
    "ernie4_5_moe": {"moe_k": 2, "moe_layer_start_index": 0, "moe_layer_end_index": LAYERS - 1,
                     "moe_num_shared_experts": 1},
    "ergo": {"first_dense_intermediate_size": 64, "global_attention_every_n_layers": 2,
             "layer_types": ["sliding_attention", "full_attention"] * (LAYERS // 2),
             "mlp_layer_types": ["dense"] + ["sparse"] * (LAYERS - 1)},
    "falcon_h1": {"mamba_d_ssm": 64},
    "gemma3n_text": {"num_kv_shared_layers": 0, "vocab_size_per_layer_input": VOCAB,
                     "hidden_size_per_layer_input": 8, "laurel_rank": 4},
    "gemma4_assistant": {"text_config": {"model_type": "gemma4_text", "hidden_size_per_layer_input": 0,
                                         "vocab_size_per_layer_input": 0}},
    "dots3_note": {"vision_config": {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN},
                   "audio_config": {"adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN},
                   "text_config": {"num_key_value_heads": HEADS, "per_layer_config": {}}},
    "gemma4_text": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8},
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]], "window_size": 4},
    "inkling2_text": {"unpadded_vocab_size": VOCAB, "d_rel": 4, "rel_extent": 64, "n_layers_per_attn_res_block": 2},
    "inkling2_loop_text": {"unpadded_vocab_size": VOCAB, "d_rel": 4, "rel_extent": 64, "n_layers_per_attn_res_block": 2},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * (LAYERS // 2)},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "kimi_linear": {"linear_head_dim": 8, "linear_num_heads": 4},
    "kolibri1_1": {"head_dim": 16, "layer_types": ["sliding_attention", "indexed_attention"] * (LAYERS // 2),
                   "index_layers": [1], "kv_source_layers": [0, 1, 2, 1], "mlp_only_layers": [0],
                   "mlp_only_intermediate_size": 64, "index_pool_size": 16, "index_compression": 2,
                   "index_num_heads": 2, "index_num_local_tokens": 2, "index_num_sink_tokens": 1},
    "longcat_flash": {"head_dim": 4, "ffn_hidden_size": 64, "zero_expert_num": 2, "expert_ffn_hidden_size": 32},
    "lfm2": {"layer_types": ["conv", "full_attention"] * (LAYERS // 2)},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_dense_layers": 1},
    "mamba2": {"head_dim": 16, "n_groups": 1, "chunk_size": 16, "time_step_rank": 8},
    "xlm": {"emb_dim": HIDDEN, "is_decoder": True},
    "reformer": {"axial_pos_embds_dim": [8, 24], "axial_pos_shape": [16, 16],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "num_buckets": 2},
    "roc_bert": {"pronunciation_embed_dim": 8, "pronunciation_vocab_size": 16, "shape_embed_dim": 8,
                 "shape_vocab_size": 16},
    "blt": {"encoder_hash_byte_group_vocab": 64, "encoder_config": {"hidden_size_global": HIDDEN},
            "decoder_config": {"hidden_size_global": HIDDEN}},
    "phi4_multimodal": {"audio_config": {"ext_pw_out_channel": 16, "depthwise_separable_out_channel": 16,
                                         "nemo_conv_channels": 16}},
    "gemma4_unified": {"vision_config": {"mm_embed_dim": HIDDEN, "output_proj_dims": HIDDEN, "mm_posemb_size": 16}},
    "zamba": {"attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS, "n_mamba_heads": 2, "mamba_dt_rank": 8,
              "attn_layer_period": 2, "attn_layer_offset": 1},
    "zamba2": {"attention_head_dim": 2 * HIDDEN // HEADS, "mamba_headdim": 16, "n_mamba_heads": 4, "kv_channels": 8,
               "num_query_groups": HEADS, "adapter_rank": 8, "chunk_size": 16},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                       "indexer_compress_ratio": 2, "hc_lowrank": 8, "ple_embed_dim": 16},
}


def _fields(cls: Any) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def _defaults(cls: Any) -> dict[str, Any]:
    try:
        return cls().to_dict()
    except Exception:  # noqa: BLE001 - some defaults do not validate; shrink by field names only
        return {}


def shrink_kwargs(cls: Any, model_type: str | None = None) -> dict[str, Any]:
    """Keyword arguments that make ``cls`` (a config class) tiny."""
    names = _fields(cls)
    d = _defaults(cls)
    kw = {k: v for k, v in SIZES.items() if k in names and (k not in OPTIONAL or d.get(k, 0) is not None)}
    depth = next((d[k] for k in DEPTHS if isinstance(d.get(k), int)), None)
    for key, value in d.items():
        if isinstance(value, list) and value and len(value) == depth and all(isinstance(v, str) for v in value):
            # a per-block pattern (layer_types, layers_block_type, ...): every kind it has, in turn
            kinds = list(dict.fromkeys(value))
            kw[key] = [kinds[i % len(kinds)] for i in range(LAYERS)]
    if "per_layer_config" in names:
        kw["per_layer_config"] = {}
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        sub_type = (d.get(name) or {}).get("model_type") if isinstance(d.get(name), dict) else None
        sub_type = sub_type or OVERRIDES.get(model_type or "", {}).get(name, {}).get("model_type")
        if sub_type:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            sub = CONFIG_MAPPING[sub_type]
        if name in names and isinstance(sub, type):
            kw[name] = shrink_kwargs(sub, sub_type)
            if sub_type:
                kw[name]["model_type"] = sub_type
    if "is_decoder" in names:  # encoder families (BERT, RoBERTa, ...) run causally only as decoders
        kw["is_decoder"] = True
    if "kv_lora_rank" in names:  # multi-head latent attention: as many key/value heads as query heads
        kw["num_key_value_heads"] = HEADS
    for key, value in OVERRIDES.get(model_type or "", {}).items():
        kw[key] = {**kw[key], **value} if isinstance(value, dict) and isinstance(kw.get(key), dict) else value
    return kw


def tiny_config(model_type: str) -> Any:
    """The shrunk config (raises what the config class raises when it cannot be made)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    cfg = cls(**shrink_kwargs(cls, model_type))
    for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    return cfg


# Model types no tiny model can be made of here, with why (tests/test_families.py checks each
# still fails to build, so none stays listed once it can be made).
NO_TINY_MODEL: dict[str, str] = {
    "gemma3n": "its vision tower needs the timm package",
    "musicgen": "an audio model: its config nests a text encoder and a decoder of audio codebooks",
    "musicgen_melody": "an audio model: its config nests a text encoder and a decoder of audio codebooks",
}

# What a family needs after it is built to run on input ids alone.
AFTER_BUILD: dict[str, Any] = {
    "xmod": lambda m: m.set_default_language("en_XX"),
}


def param_count(cfg: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


def build(model_type: str, seed: int = 0, std: float = 0.3) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    n = param_count(cfg)
    if n > MAX_PARAMS:
        raise ValueError(f"the shrunk config still has {n:,} parameters")
    for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
        if hasattr(c, "initializer_range"):
            c.initializer_range = std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type](model)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = 0, 2, 1
    return model
