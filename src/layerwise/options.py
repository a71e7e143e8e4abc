"""The plugin's options, as one table: each is a command-line flag and an ini key (CLI wins).

Importing this module imports nothing heavy: ``pytest --help`` must not import torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    name: str  # the flag without "--"; the ini key is "layerwise_" + name with "_" for "-"
    help: str
    default: Any = None
    kind: str = "str"  # str | int | float | bool | list
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return "layerwise_" + self.name.replace("-", "_")

    @property
    def ini(self) -> str:
        return self.dest


OPTIONS: tuple[Option, ...] = (
    Option("model", "causal LM to test: a Hugging Face id, a local folder, a .gguf file, or the built-in "
           "'smollm2-135m' (default)", "smollm2-135m"),
    Option("dtype", "weights dtype (auto = float32 on CPU, the checkpoint's dtype on GPU)", "auto",
           choices=("auto", "float32", "bfloat16", "float16")),
    Option("device", "cpu, cuda, cuda:N or auto", "auto"),
    Option("revision", "hub revision (branch, tag or commit)"),
    Option("trust-remote-code", "allow model code from the hub (off by default)", False, "bool"),
    Option("device-map", "accelerate device map: 'auto', 'cpu', or a JSON object of module → device"),
    Option("load-in-4bit", "quantize with bitsandbytes 4-bit", False, "bool"),
    Option("load-in-8bit", "quantize with bitsandbytes 8-bit", False, "bool"),
    Option("bnb-4bit-quant-type", "4-bit type", "nf4", choices=("nf4", "fp4")),
    Option("bnb-4bit-compute-dtype", "4-bit compute dtype", "float32", choices=("float32", "bfloat16", "float16")),
    Option("bnb-4bit-double-quant", "4-bit double quantization (--no-bnb-4bit-double-quant to turn it off)", True, "bool"),
    Option("exit-layers", "comma-separated exit layers 1..L (layer k = output of block k); "
           "default ceil(q·L/4) for q = 1..4", None, "list"),
    Option("prompts", "prompts file: JSONL or CSV with instruction/input/output or prompt/reference "
           "(default: the shipped 62-row Alpaca-cleaned sample)"),
    Option("limit", "use the first N rows", 20, "int"),
    Option("prompt-format", "how a row becomes a prompt", "alpaca", choices=("alpaca", "alpaca-stanford", "chat", "raw")),
    Option("max-new-tokens", "tokens to generate per row and exit layer", 64, "int"),
    Option("do-sample", "sample instead of greedy decoding", False, "bool"),
    Option("temperature", "sampling temperature", 1.0, "float"),
    Option("top-k", "sampling top-k", None, "int"),
    Option("top-p", "sampling top-p", None, "float"),
    Option("seed", "seed for sampling", 0, "int"),
    Option("teacher-forced-tokens", "reference tokens per row for the teacher-forced lens", 32, "int"),
    Option("bertscore-model", "BERTScore model: 'default' (offline MiniLM), 'none', a hub name such as "
           "roberta-large, or a local folder", "default"),
    Option("drift-against", "a reference model (same tokenizer and depth): record per-layer KL(reference ‖ "
           "this model), e.g. the fp32 original of a quantized model"),
    Option("report", "HTML report path", "reports/report.html"),
    Option("results-json", "results JSON path", "reports/results.json"),
    Option("baseline", "baseline JSON to compare with (default for smollm2-135m: the shipped one)"),
    Option("update-baseline", "write the baseline (to --baseline) from this run instead of comparing", False, "bool"),
    Option("tolerance", "baseline tolerances, e.g. 'bleu=0.5:0.1,rougeL=0.01:0.05' (metric=abs:rel)"),
    # Thresholds of the shipped layer suite (chosen from measurements: see layer_tests/README.md).
    Option("entropy-trend-max", "Spearman ρ(depth, teacher-forced entropy) over the first three quarters "
           "of the layers must be ≤ this", -0.5, "float"),
    Option("final-entropy-max", "mean teacher-forced entropy at layer L must be ≤ this fraction of ln(V)",
           0.5, "float"),
    Option("kl-trend-max", "Spearman ρ(depth, KL to final) over the last third of the layers must be ≤ this", -0.8, "float"),
    Option("agreement-trend-min", "Spearman ρ(depth, top-1 agreement with final) must be ≥ this", 0.8, "float"),
    Option("min-rouge-gain", "the final exit's ROUGE-L must beat every earlier exit's by this much", 0.05, "float"),
    Option("min-bleu-gain", "the final exit's BLEU must beat every earlier exit's by this many points", 1.0, "float"),
    Option("check-bertscore", "also require BERTScore F1 to be highest at the final exit", False, "bool"),
)

BY_DEST = {o.dest: o for o in OPTIONS}


def _convert(opt: Option, raw: Any) -> Any:
    if raw is None:
        return None
    if opt.kind == "bool":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"--{opt.name} / {opt.ini}: {raw!r} is not true or false", "use true or false")
    where = f"--{opt.name} / {opt.ini}"
    if opt.kind == "list":
        items = [x.strip() for x in str(raw).replace(" ", ",").split(",") if x.strip()]
        out = []
        for x in items:
            try:
                out.append(int(x))
            except ValueError:
                raise ConfigError(f"{where}: {x!r} is not a whole number", "pass layers like 8,16,24,32") from None
        return out
    conv: Callable[[Any], Any] = {"int": int, "float": float, "str": str}[opt.kind]
    try:
        value = conv(str(raw).strip() if opt.kind != "str" else raw)
    except ValueError:
        kind = {"int": "whole number", "float": "number"}.get(opt.kind, opt.kind)
        raise ConfigError(f"{where}: {raw!r} is not a {kind}", f"pass a {kind}") from None
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(opt.choices)}", f"use one of {', '.join(opt.choices)}")
    return value


def add_options(parser: Any) -> None:
    group = parser.getgroup("layerwise", "layerwise: per-layer (logit lens) and early-exit tests of causal LMs")
    for o in OPTIONS:
        kwargs: dict[str, Any] = {"dest": o.dest, "default": None}
        if o.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction  # --x / --no-x: the CLI can undo an ini "true"
        else:
            kwargs["metavar"] = o.name.split("-")[-1].upper() if o.kind == "str" else o.kind.upper()
        default = "" if o.default is None else f" (default: {o.default})"
        group.addoption(f"--{o.name}", help=o.help + default, **kwargs)
        parser.addini(o.ini, help=o.help + default, type="string", default=None)


def read_options(config: Any) -> dict[str, Any]:
    """All option values, CLI over ini over default, converted and validated."""
    out: dict[str, Any] = {}
    for o in OPTIONS:
        cli = config.getoption(o.dest, default=None)
        if cli is not None:
            out[o.name] = _convert(o, cli)
            continue
        try:
            ini = config.getini(o.ini)
        except (ValueError, KeyError):
            ini = None
        if ini not in (None, "", []):
            out[o.name] = _convert(o, ini)
        else:
            out[o.name] = o.default
    return out


def parse_tolerances(spec: str | None) -> dict[str, tuple[float, float]]:
    if not spec:
        return {}
    out: dict[str, tuple[float, float]] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            name, vals = part.split("=", 1)
            a, _, r = vals.partition(":")
            out[name.strip()] = (float(a), float(r or 0.0))
        except ValueError:
            raise ConfigError(f"--tolerance: cannot read {part!r}", "write metric=abs:rel, e.g. rougeL=0.01:0.05") from None
    return out
