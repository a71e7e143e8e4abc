"""The options, as one table: each is a pytest flag, an ini key (CLI wins) and — for the scopes a
subcommand takes — a ``layerwise`` command-line flag. :func:`declare` adds them to any
argparse-like parser (pytest's option group or argparse itself); defaults and choices come from
:mod:`layerwise.config`.

Importing this module imports nothing heavy: ``pytest --help`` must not import torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import config as C
from .errors import ConfigError

#: model: what to load · run: what to compute · output: files written · gate: the baseline ·
#: suite: the shipped suite and its thresholds.
SCOPES = ("model", "run", "output", "gate", "suite")


@dataclass(frozen=True)
class Option:
    name: str  # the flag without "--"; the ini key is "layerwise_" + name with "_" for "-"
    help: str
    default: Any = None
    kind: str = "str"  # str | path | int | float | bool | list | lens
    choices: tuple[str, ...] | None = None
    scope: str = "run"

    @property
    def dest(self) -> str:
        return "layerwise_" + self.name.replace("-", "_")

    @property
    def ini(self) -> str:
        return self.dest

    def argparse_kwargs(self) -> dict[str, Any]:
        default = "" if self.default is None else f" (default: {self.default})"
        # argparse expands %-formats in help texts: a literal % (as in "25%") is written %%
        kwargs: dict[str, Any] = {"dest": self.dest, "default": None, "help": (self.help + default).replace("%", "%%")}
        if self.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction  # --x / --no-x: the CLI can undo an ini "true"
        else:
            kwargs["metavar"] = {"path": "PATH", "int": "N", "float": "X", "list": "LIST", "lens": "LENSES"}.get(
                self.kind, self.name.split("-")[-1].upper())
        return kwargs


OPTIONS: tuple[Option, ...] = (
    # -- model: what to load
    Option("model", "causal LM to test: a Hugging Face id, a local folder, a .gguf file, or the built-in "
           f"'{C.DEFAULT_MODEL}' (default)", C.DEFAULT_MODEL, scope="model"),
    Option("adapter", "a PEFT (LoRA) adapter — folder or hub id — applied on top of --model", scope="model"),
    Option("dtype", "weights dtype (auto = float32 on CPU, the checkpoint's dtype on GPU)", "auto",
           choices=C.DTYPES, scope="model"),
    Option("device", "cpu, cuda, cuda:N or auto", "auto", scope="model"),
    Option("revision", "hub revision (branch, tag or commit)", scope="model"),
    Option("token", "Hugging Face token for gated or private models (default: HF_TOKEN / the stored login); "
           "never written to any output", scope="model"),
    Option("cache-dir", "Hugging Face cache folder for downloaded models (default: HF_HOME's)", kind="path", scope="model"),
    Option("attn-implementation", "attention implementation passed to from_pretrained (eager, sdpa, "
           "flash_attention_2, …)", scope="model"),
    Option("trust-remote-code", "allow model code from the hub (off by default)", False, "bool", scope="model"),
    Option("device-map", "accelerate device map: " + ", ".join(C.DEVICE_MAP_NAMES) + ", or a JSON object of "
           "module → device", scope="model"),
    Option("load-in-4bit", "quantize with bitsandbytes 4-bit", False, "bool", scope="model"),
    Option("load-in-8bit", "quantize with bitsandbytes 8-bit", False, "bool", scope="model"),
    Option("bnb-4bit-quant-type", "4-bit type", "nf4", choices=C.QUANT_TYPES, scope="model"),
    Option("bnb-4bit-compute-dtype", "4-bit compute dtype", "float32", choices=C.COMPUTE_DTYPES, scope="model"),
    Option("bnb-4bit-double-quant", "4-bit double quantization (--no-bnb-4bit-double-quant to turn it off)", True,
           "bool", scope="model"),
    # -- run: what to compute
    Option("exit-layers", "comma-separated exit layers 1..L (layer k = output of block k), or relative depths "
           "such as 25%,50%,75%,100% (a baseline made with these gates a model of another depth); "
           "default ceil(q·L/4) for q = 1..4", None, "list"),
    Option("prompts", "prompts file: JSONL or CSV with instruction/input/output or prompt/reference "
           "(default: the shipped 62-row Alpaca-cleaned sample)", kind="path"),
    Option("limit", "use the first N rows", C.DEFAULT_LIMIT, "int"),
    Option("prompt-format", "how a row becomes a prompt", "alpaca", choices=C.PROMPT_FORMATS),
    Option("batch-size", "rows per forward / decode batch (lower it for a large model on a small GPU)",
           C.DEFAULT_BATCH_SIZE, "int"),
    Option("max-new-tokens", "tokens to generate per row and exit layer", C.DEFAULT_MAX_NEW_TOKENS, "int"),
    Option("do-sample", "sample instead of greedy decoding", False, "bool"),
    Option("temperature", "sampling temperature", 1.0, "float"),
    Option("top-k", "sampling top-k", None, "int"),
    Option("top-p", "sampling top-p", None, "float"),
    Option("seed", "seed for sampling", 0, "int"),
    Option("teacher-forced-tokens", "reference tokens per row for the teacher-forced lens",
           C.DEFAULT_TEACHER_FORCED_TOKENS, "int"),
    Option("bertscore-model", "BERTScore model: 'default' (offline MiniLM), 'none', a hub name such as "
           "roberta-large, or a local folder", C.DEFAULT_BERTSCORE),
    Option("bertscore-num-layers", "which layer of the BERTScore model to compare (default: bert-score's tuned "
           "layer for a table name, the last layer for a folder)", None, "int"),
    Option("draft-tokens", "γ of the self-speculative decoding forecast: tokens each exit layer drafts per "
           "full-model forward (the report shows the expected tokens per forward at each exit)",
           C.DEFAULT_DRAFT_TOKENS, "int"),
    Option("lens", "lenses to read every layer through: logit, or logit,tuned:PATH to add a tuned lens (a folder "
           "written by layerwise train-lens) — every lens statistic of both from the same forward pass", C.DEFAULT_LENS,
           "lens"),
    Option("tuned-exits", "also decode every exit layer below L through the tuned lens (translator k, final norm, "
           "head), in the same batched decode as the plain exits; needs --lens logit,tuned:PATH", False, "bool"),
    Option("drift-against", "a reference model (same tokenizer and depth): record per-layer KL(reference ‖ "
           "this model), e.g. the fp32 original of a quantized model, or the previous revision"),
    Option("drift-revision", "the reference model's hub revision (e.g. the release you upgrade from)"),
    Option("drift-dtype", "the reference model's dtype (default: --dtype)", choices=C.DTYPES),
    Option("drift-load-in-4bit", "quantize the reference model with bitsandbytes 4-bit", False, "bool"),
    Option("drift-load-in-8bit", "quantize the reference model with bitsandbytes 8-bit", False, "bool"),
    Option("cache-results", "reuse the evaluation of an earlier run with the same model, data, settings and "
           "library versions (kept in $LAYERWISE_CACHE/results): editing your own tests does not recompute it",
           False, "bool"),
    # -- output: files written
    Option("report", "HTML report path", C.DEFAULT_REPORT, "path", scope="output"),
    Option("results-json", "results JSON path", C.DEFAULT_RESULTS, "path", scope="output"),
    Option("summary-md", "write a Markdown digest (verdict, exit table, failures) here; default: append to "
           "$GITHUB_STEP_SUMMARY when that is set", kind="path", scope="output"),
    # -- gate: the baseline (and a results file to gate instead of computing one)
    Option("results", "gate this results JSON (written by `layerwise run`, e.g. under torchrun on GPU machines) "
           "instead of loading a model: the shipped suite's checks and the baseline gate run on it", kind="path",
           scope="gate"),
    Option("baseline", "baseline JSON to compare with (default: baselines/<model>.json in the rootdir if it "
           f"exists; for {C.DEFAULT_MODEL}, the shipped one)", kind="path", scope="gate"),
    Option("update-baseline", "write the baseline from this run instead of comparing (to --baseline, default "
           "baselines/<model>.json in the rootdir)", False, "bool", scope="gate"),
    Option("require-baseline", "fail (exit 1) when the run is not gated: no baseline, a refused one, or one "
           "being updated", False, "bool", scope="gate"),
    Option("tolerance", "baseline tolerances, e.g. 'bleu=0.5:0.1,rougeL=0.01:0.05' (metric=abs:rel)", scope="gate"),
    # -- suite: the shipped suite and its thresholds (chosen from measurements: layer_tests/README.md)
    Option("layer-suite", "run the shipped layer suite alongside your tests when --model or layerwise_model "
           "is given (--no-layer-suite leaves it out)", True, "bool", scope="suite"),
    Option("entropy-trend-max", "Spearman ρ(depth, teacher-forced entropy) over the first three quarters "
           "of the layers must be ≤ this", -0.5, "float", scope="suite"),
    Option("final-entropy-max", "mean teacher-forced entropy at layer L must be ≤ this fraction of ln(V)",
           0.5, "float", scope="suite"),
    Option("kl-trend-max", "Spearman ρ(depth, KL to final) over the last third of the layers must be ≤ this",
           -0.8, "float", scope="suite"),
    Option("agreement-trend-min", "Spearman ρ(depth, top-1 agreement with final) must be ≥ this", 0.8, "float",
           scope="suite"),
    Option("min-rouge-gain", "the final exit's ROUGE-L must beat every earlier exit's by this much", 0.05, "float",
           scope="suite"),
    Option("min-bleu-gain", "the final exit's BLEU must beat every earlier exit's by this many points", 1.0, "float",
           scope="suite"),
    Option("check-bertscore", "also require BERTScore F1 to be highest at the final exit", False, "bool",
           scope="suite"),
    Option("max-drift-kl", "with --drift-against: every layer's mean KL(reference ‖ this model) must be ≤ this "
           "(nats; unset: drift is recorded, not gated)", None, "float", scope="suite"),
    Option("trend-lens", "the lens the trend tests (entropy, KL, agreement) read: logit, or tuned (needs --lens "
           "logit,tuned:PATH)", C.DEFAULT_LENS, choices=C.LENSES, scope="suite"),
)

BY_NAME = {o.name: o for o in OPTIONS}


def declare(add_argument: Callable[..., Any], scopes: Iterable[str] = SCOPES, skip: Iterable[str] = ()) -> None:
    """Add the options of ``scopes`` (but not those named in ``skip``) with ``add_argument``
    (argparse's, or pytest's ``addoption``)."""
    wanted, unwanted = set(scopes), set(skip)
    for o in OPTIONS:
        if o.scope in wanted and o.name not in unwanted:
            add_argument(f"--{o.name}", **o.argparse_kwargs())


def add_pytest_options(parser: Any) -> None:
    group = parser.getgroup("layerwise", "layerwise: per-layer (logit lens) and early-exit tests of causal LMs")
    declare(group.addoption)
    for o in OPTIONS:
        default = "" if o.default is None else f" (default: {o.default})"
        parser.addini(o.ini, help=o.help + default, type="string", default=None)


def convert(opt: Option, raw: Any, base: Path | None = None) -> Any:
    """One raw option value (a CLI string or ini string) → its typed value; ConfigError naming it."""
    if raw is None:
        return None
    where = f"--{opt.name} / {opt.ini}"
    if opt.kind == "bool":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: {raw!r} is not true or false", "use true or false")
    if opt.kind == "list":
        items = [x.strip() for x in str(raw).replace(" ", ",").split(",") if x.strip()]
        out = []
        for x in items:
            if x.endswith("%"):
                out.append(x)  # a relative depth, checked with the others by config.check_exit_syntax
                continue
            try:
                out.append(int(x))
            except ValueError:
                raise ConfigError(f"{where}: {x!r} is not a whole number", "pass layers like 8,16,24,32 or depths like 25%,50%,100%") from None
        return out
    if opt.kind == "lens":  # checked, its path made absolute here (CLI: from the cwd; ini: the ini's folder)
        return C.lens_option(C.parse_lens(raw, base))
    if opt.kind == "path":
        s = str(raw)
        if not s.strip():
            raise ConfigError(f"{where} is empty", "pass a file path")
        p = Path(os.path.expanduser(s))
        return p if p.is_absolute() or base is None else base / p
    conv: Callable[[Any], Any] = {"int": int, "float": float, "str": str}[opt.kind]
    try:
        value = conv(str(raw).strip() if opt.kind != "str" else raw)
    except (ValueError, OverflowError):
        kind = {"int": "whole number", "float": "number"}.get(opt.kind, opt.kind)
        raise ConfigError(f"{where}: {raw!r} is not a {kind}", f"pass a {kind}") from None
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(opt.choices)}", f"use one of {', '.join(opt.choices)}")
    return value


def read_pytest_options(config: Any) -> tuple[dict[str, Any], set[str]]:
    """All option values (CLI over ini over default), converted; and the names set explicitly.

    A relative path on the command line is taken from the invocation folder, one in the ini file
    from the ini file's folder (as pytest does for its own path options).
    """
    out: dict[str, Any] = {}
    given: set[str] = set()
    cli_base = Path(config.invocation_params.dir)
    inipath = getattr(config, "inipath", None)
    ini_base = Path(inipath).parent if inipath else Path(config.rootpath)
    for o in OPTIONS:
        cli = config.getoption(o.dest, default=None)
        if cli is not None:
            out[o.name] = convert(o, cli, cli_base)
            given.add(o.name)
            continue
        try:
            ini = config.getini(o.ini)
        except (ValueError, KeyError):
            ini = None
        if ini not in (None, "", []):
            out[o.name] = convert(o, ini, ini_base)
            given.add(o.name)
        else:
            out[o.name] = o.default
    return out, given


def read_namespace(ns: argparse.Namespace, base: Path | None = None) -> dict[str, Any]:
    """Option values from an argparse namespace built with :func:`declare` (absent scopes: defaults)."""
    base = base or Path.cwd()
    return {o.name: (convert(o, getattr(ns, o.dest), base) if getattr(ns, o.dest, None) is not None else o.default)
            for o in OPTIONS}
