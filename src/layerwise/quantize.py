"""bitsandbytes quantization settings (4-bit NF4/FP4 or 8-bit) for ``from_pretrained``."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def bnb_config(q: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("quantization needs bitsandbytes, which is not installed", "pip install 'bitsandbytes>=0.46'") from None
    import torch
    from transformers import BitsAndBytesConfig

    if q.method == "4bit":
        if q.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"unknown 4-bit quant type {q.quant_type!r}", "use nf4 or fp4")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
            bnb_4bit_use_double_quant=q.double_quant,
        )
    if q.method == "8bit":
        # LLM.int8 casts every matmul's inputs to float16 and logs that once per call; say it
        # once (in the model's notes) instead of thousands of times.
        import logging

        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"unknown quantization {q.method!r}", "use --load-in-4bit or --load-in-8bit")
