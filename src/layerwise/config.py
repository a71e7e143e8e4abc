"""Every setting of a run — its default, its choices and its validation — in one torch-free room.

The option table (:mod:`layerwise.options`) reads its defaults and choices from here; the pytest
session and the ``layerwise`` command both turn option values into these dataclasses through
:func:`resolve`, so a setting is declared once and checked once, before anything heavy loads.
Checks that need the model (exit layers against its depth, prompts against its context) are the
functions here too (:func:`validate_exits`), called by the engine once the model is known.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PROMPT_FORMATS = ("alpaca", "alpaca-stanford", "chat", "raw")
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")  # as the help lists them

DEFAULT_LIMIT = 20
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TEACHER_FORCED_TOKENS = 32
DEFAULT_BATCH_SIZE = 20
DEFAULT_DRAFT_TOKENS = 4  # γ of the speculative-acceptance forecast
DEFAULT_BERTSCORE = "default"
DEFAULT_REPORT = "reports/report.html"
DEFAULT_RESULTS = "reports/results.json"
#: Where a project keeps its baselines when ``--baseline`` is not given (relative to the rootdir).
PROJECT_BASELINES = "baselines"
#: The lenses a run can read layers through: the logit lens (always) and a trained tuned lens.
LENSES = ("logit", "tuned")
DEFAULT_LENS = "logit"
SEED_MAX = 2**64 - 1

# Gate tolerances: a number passes when it is within max(abs, rel × |baseline|). Greedy CPU runs
# are bit-for-bit repeatable (measured spread: 0), so these are not noise margins: they are the
# smallest changes worth failing a pull request over, chosen so that a dtype change (float32 →
# bfloat16) or a perturbed block fails while a rerun passes — measurements in tests/test_gate.py.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "bleu": (0.5, 0.10),
    "rougeL": (0.01, 0.05),
    "bertscore_f1": (0.01, 0.02),
    "entropy": (0.05, 0.05),
    "kl_to_final": (0.05, 0.05),
    "xent": (0.05, 0.02),
    "top1_agree": (0.03, 0.0),
    # fractions of rows / positions, as top1_agree: the decision-depth curves (fraction decided by
    # each layer) and each exit's speculative acceptance rate α
    "decided_top1": (0.03, 0.0),
    "decided_top10": (0.03, 0.0),
    "accept_rate": (0.03, 0.0),
}


# ----------------------------------------------------------------------------------------------
# The dataclasses


@dataclass
class Quantization:
    """bitsandbytes settings (``method`` is ``"4bit"`` or ``"8bit"``)."""

    method: str
    quant_type: str = "nf4"
    compute_dtype: str = "float32"
    double_quant: bool = True

    def validate(self) -> None:
        if self.method not in ("4bit", "8bit"):
            raise ConfigError(f"unknown quantization {self.method!r}", "use --load-in-4bit or --load-in-8bit")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"unknown 4-bit quant type {self.quant_type!r}", f"use one of {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unknown 4-bit compute dtype {self.compute_dtype!r}", f"use one of {', '.join(COMPUTE_DTYPES)}")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": f"bitsandbytes-{self.method}"}
        if self.method == "4bit":
            d.update(quant_type=self.quant_type, compute_dtype=self.compute_dtype, double_quant=self.double_quant)
        return d


@dataclass
class Decoding:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens!r}", "pass a positive number")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"--temperature must be a finite number > 0, got {t!r}", "pass e.g. --temperature 0.7")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}", "pass --top-p between 0 and 1")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k!r}", "pass a positive --top-k")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"--seed must be a whole number in 0..2**64-1, got {self.seed!r}", "pass a smaller non-negative seed")

    def describe(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


@dataclass
class LoadConfig:
    """What to load and how: the arguments of :func:`layerwise.models.load_model`."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    quantization: Quantization | None = None
    device_map: str | dict[str, Any] | None = None
    adapter: str | None = None  # a PEFT adapter folder or hub id applied on top of ``model``
    token: str | None = None  # never recorded anywhere
    attn_implementation: str | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        if not self.model or not str(self.model).strip():
            raise ConfigError("empty model spec", "pass --model with a hub id, a folder or a .gguf file")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}", "use cpu, cuda, cuda:N or auto")
        if self.quantization is not None:
            self.quantization.validate()
        self.device_map = parse_device_map(self.device_map)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`layerwise.models.load_model` (besides the spec)."""
        return {"dtype": self.dtype, "device": self.device, "revision": self.revision,
                "trust_remote_code": self.trust_remote_code, "quantization": self.quantization,
                "device_map": self.device_map, "adapter": self.adapter, "token": self.token,
                "attn_implementation": self.attn_implementation, "cache_dir": self.cache_dir}


@dataclass
class RunConfig(LoadConfig):
    """One evaluation: what to load (the :class:`LoadConfig` fields) and what to compute."""

    exit_layers: list[int] | None = None  # None: ceil(q·L/4), q = 1..4
    prompts: str | None = None  # None: the packaged Alpaca-cleaned sample
    limit: int | None = DEFAULT_LIMIT
    prompt_format: str = "alpaca"
    decoding: Decoding = field(default_factory=Decoding)
    bertscore_model: str | None = DEFAULT_BERTSCORE
    bertscore_num_layers: int | None = None
    teacher_forced_tokens: int = DEFAULT_TEACHER_FORCED_TOKENS
    lens_top_k: int = 10
    examples: int = 3
    batch_size: int = DEFAULT_BATCH_SIZE
    raw_lens: bool = True
    drift_against: str | None = None  # a reference model: per-layer KL(reference ‖ this model)
    drift_revision: str | None = None  # the reference's own revision (two revisions of one hub repo)
    drift_dtype: str | None = None  # the reference's dtype (default: --dtype)
    drift_quantization: Quantization | None = None  # the reference's quantization (default: none)
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # γ: draft length of the speculative-acceptance forecast
    tuned_lens: str | None = None  # a tuned-lens folder: every lens statistic also through it (--lens)
    tuned_exits: bool = False  # also decode every exit < L through the tuned lens (--tuned-exits)

    def validate(self) -> None:
        super().validate()
        self.decoding.validate()
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"--limit must be at least 1, got {self.limit!r}", "pass a positive number of rows")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"unknown prompt format {self.prompt_format!r}", "use one of: " + ", ".join(PROMPT_FORMATS))
        if isinstance(self.teacher_forced_tokens, bool) or not isinstance(self.teacher_forced_tokens, int) or self.teacher_forced_tokens < 1:
            raise ConfigError(f"--teacher-forced-tokens must be at least 1, got {self.teacher_forced_tokens!r}", "pass a positive number")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size!r}", "pass a positive number of rows per batch")
        if isinstance(self.draft_tokens, bool) or not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ConfigError(f"--draft-tokens must be at least 1, got {self.draft_tokens!r}",
                              "pass the number of tokens a draft proposes per step, e.g. 4")
        if self.exit_layers is not None:
            check_exit_syntax(self.exit_layers)
        if self.drift_dtype is not None and self.drift_dtype not in DTYPES:
            raise ConfigError(f"unknown --drift-dtype {self.drift_dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.drift_against is None and (self.drift_revision or self.drift_dtype or self.drift_quantization):
            raise ConfigError("--drift-revision / --drift-dtype / --drift-load-in-* given without --drift-against",
                              "pass --drift-against SPEC (the reference model)")
        if self.tuned_exits and not self.tuned_lens:
            raise ConfigError("--tuned-exits needs a tuned lens", "pass --lens logit,tuned:PATH (a folder written by "
                              "layerwise train-lens), or leave --tuned-exits out")
        if self.bertscore_num_layers is not None and self.bertscore_num_layers < 1:
            raise ConfigError(f"--bertscore-num-layers must be at least 1, got {self.bertscore_num_layers}",
                              "pass a layer number of the BERTScore model, or leave it out")

    def load_config(self) -> LoadConfig:
        return LoadConfig(**{f: getattr(self, f) for f in LoadConfig.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# Checks shared by the option parser and the engine


def parse_device_map(value: Any) -> str | int | dict[str, Any] | None:
    """An option value → a device map: ``None``, a strategy or device name, or (from JSON text) an
    object of module name → device; refused in one line when accelerate could not use it."""
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if s.startswith(("{", "[", '"')) or s in ("null", "true", "false") or s.lstrip("-").isdigit():
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--device-map is not valid JSON ({exc.msg})", _DEVICE_MAP_FIX) from None
            if isinstance(parsed, list):
                raise ConfigError(f"--device-map {s} is a JSON list, not an object", _DEVICE_MAP_FIX)
            value = parsed
        else:
            value = s
    check_device_map(value)
    return value


_DEVICE_MAP_FIX = ("pass auto, balanced, balanced_low_0 or sequential, a device such as cpu or cuda:0, "
                   "or a JSON object of module name → device, e.g. '{\"\": 0}'")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_name_ok(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    if not isinstance(v, str):
        return type(v).__name__ == "device"  # a torch.device
    name, _, index = v.partition(":")
    return name in ("cpu", "cuda", "mps", "xpu", "npu", "disk", "meta") and (not index or index.isdigit())


def check_device_map(device_map: Any) -> None:
    """Refuse a device map that accelerate would choke on (before any weight is read): one of
    :data:`DEVICE_MAP_STRATEGIES`, a device (``cpu``, ``cuda:0``, ``0``), or a mapping of module
    names (strings) to devices."""
    fix = _DEVICE_MAP_FIX
    if device_map is None:
        return
    if isinstance(device_map, str):
        if device_map.strip() in DEVICE_MAP_STRATEGIES or _device_name_ok(device_map.strip()):
            return
        raise ConfigError(f"--device-map {device_map!r} is not a device map", fix)
    if isinstance(device_map, dict):
        if not device_map:
            raise ConfigError("--device-map is an empty object", fix)
        for k, v in device_map.items():
            if not isinstance(k, str):
                raise ConfigError(f"--device-map: module name {k!r} is not a string", fix)
            if not _device_name_ok(v):
                raise ConfigError(f"--device-map: {k!r} is mapped to {v!r}, which is not a device", fix)
        return
    if _device_name_ok(device_map):
        return
    raise ConfigError(f"--device-map {device_map!r} is not a device map (a {type(device_map).__name__})", fix)



def _percent(x: Any) -> float | None:
    """``"25%"`` → 25.0; anything else → None."""
    if isinstance(x, str) and x.strip().endswith("%"):
        try:
            return float(x.strip()[:-1])
        except ValueError:
            return None
    return None


def check_exit_syntax(exits: Sequence[Any]) -> None:
    """What can be said of exit layers without the model: whole numbers ≥ 1, or relative depths
    ``p%`` with 0 < p ≤ 100 (not both kinds), each once."""
    if not exits:
        raise ConfigError("--exit-layers is empty", "pass layers like 8,16,24,32 or depths like 25%,50%,75%,100%")
    relative = [x for x in exits if isinstance(x, str)]
    if relative and len(relative) != len(exits):
        raise ConfigError("--exit-layers mixes layers and relative depths", "pass either layers (8,16,32) or depths (25%,50%,100%)")
    for x in exits:
        if isinstance(x, str):
            p = _percent(x)
            if p is None or not 0 < p <= 100:
                raise ConfigError(f"exit layer {x!r} is not a relative depth in (0%, 100%]", "pass depths like 25%,50%,75%,100%")
            continue
        if isinstance(x, bool) or not isinstance(x, int):
            raise ConfigError(f"exit layer {x!r} is not a whole number", "pass layers like 8,16,24,32")
        if x < 1:
            raise ConfigError(f"exit layer {x} is not a block output (layers are 1..L; layer k = output of block k)",
                              "pass layers between 1 and the model's number of blocks")
    dup = sorted({str(x) for x in exits if list(exits).count(x) > 1})
    if dup:
        raise ConfigError(f"exit layer {dup[0]} is given twice", "list each exit layer once")


def parse_lens(spec: Any, base: Path | None = None) -> str | None:
    """``--lens``: ``logit`` → None; ``logit,tuned:PATH`` → PATH, made absolute from ``base``.

    The logit lens is always computed (the results' main sections); ``tuned:PATH`` alone means
    the same as ``logit,tuned:PATH``. PATH is a folder written by ``layerwise train-lens`` (or a
    tuned-lens checkpoint folder); it cannot contain a comma.
    """
    import os

    fix = "pass --lens logit, or --lens logit,tuned:PATH with the folder written by layerwise train-lens"
    text = "" if spec is None else str(spec).strip()
    if not text:
        raise ConfigError("--lens is empty", fix)
    tuned: str | None = None
    seen: set[str] = set()
    for item in (x.strip() for x in text.split(",")):
        name, colon, path = item.partition(":")
        name = name.strip()
        if name not in LENSES:
            raise ConfigError(f"--lens: unknown lens {item!r} (lenses: {', '.join(LENSES)})", fix)
        if name in seen:
            raise ConfigError(f"--lens names the {name} lens twice", fix)
        seen.add(name)
        if name == "logit":
            if colon:
                raise ConfigError(f"--lens: the logit lens takes no path ({item!r})", fix)
            continue
        if not path.strip():
            raise ConfigError("--lens: the tuned lens needs its folder, as tuned:PATH", fix)
        q = Path(os.path.expanduser(path.strip()))
        tuned = str(q if q.is_absolute() or base is None else base / q)
    return tuned


def lens_option(tuned: str | None) -> str:
    """The ``--lens`` value that names these lenses (:func:`parse_lens` in reverse)."""
    return DEFAULT_LENS if tuned is None else f"{DEFAULT_LENS},tuned:{tuned}"


def resolve_exits(exits: Sequence[Any] | None, num_layers: int) -> tuple[list[int], list[str] | None]:
    """Exit layers for a model of ``num_layers`` blocks, and — for relative exits — their specs.

    ``None``: ceil(q·L/4), q = 1..4. Relative ``p%``: layer ceil(p/100 · L) (at least 1), so
    ``25%,50%,75%,100%`` is the default for any depth; a baseline made with relative exits gates
    a model of another depth, exits matched by spec.
    """
    if exits is None:
        return default_exits(num_layers), None
    if exits and all(isinstance(x, str) for x in exits):
        check_exit_syntax(exits)
        specs = [f"{_percent(x):g}%" for x in exits]
        layers = [max(1, math.ceil(_percent(x) / 100 * num_layers - 1e-9)) for x in exits]
        pairs = sorted(zip(layers, specs))
        for (la, sa), (lb, sb) in zip(pairs, pairs[1:]):
            if la == lb:
                raise ConfigError(f"exit depths {sa} and {sb} are both layer {la} of this {num_layers}-block model",
                                  "pass depths further apart")
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return validate_exits(exits, num_layers), None


def validate_exits(exits: Sequence[Any], num_layers: int) -> list[int]:
    """Exit layers against the model's depth: integers in 1..L, no duplicates; sorted ascending."""
    out: list[int] = []
    for e in exits:
        if isinstance(e, bool) or not isinstance(e, int):
            try:
                e_int = int(str(e).strip())
            except ValueError:
                raise ConfigError(f"exit layer {e!r} is not a whole number",
                                  f"pass layers between 1 and {num_layers}, e.g. --exit-layers 8,16,{num_layers}") from None
        else:
            e_int = e
        if not 1 <= e_int <= num_layers:
            raise ConfigError(
                f"exit layer {e_int} is outside 1..{num_layers} (this model has {num_layers} blocks; layer k = output of block k)",
                f"pass layers between 1 and {num_layers}",
            )
        if e_int in out:
            raise ConfigError(f"exit layer {e_int} is given twice", "list each exit layer once")
        out.append(e_int)
    if not out:
        raise ConfigError("no exit layers given", f"pass at least one layer between 1 and {num_layers}")
    return sorted(out)


def default_exits(num_layers: int) -> list[int]:
    """ceil(q·L/4) for q = 1..4: 8/16/24/32 for 32 blocks, 8/15/23/30 for 30."""
    return sorted({-(-q * num_layers // 4) for q in range(1, 5)})


def parse_tolerances(spec: str | None) -> dict[str, tuple[float, float]]:
    """``metric=abs[:rel],…`` → {metric: (abs, rel)}; finite, ≥ 0, known metric names only."""
    if not spec:
        return {}
    known = ", ".join(DEFAULT_TOLERANCES)
    out: dict[str, tuple[float, float]] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, vals = part.partition("=")
        name = name.strip()
        if not eq:
            raise ConfigError(f"--tolerance: cannot read {part!r}", "write metric=abs:rel, e.g. rougeL=0.01:0.05")
        if name not in DEFAULT_TOLERANCES:
            raise ConfigError(f"--tolerance: unknown metric {name!r}", f"use one of {known}")
        a, _, r = vals.partition(":")
        try:
            pair = (float(a), float(r) if r.strip() else 0.0)
        except ValueError:
            raise ConfigError(f"--tolerance: cannot read {part!r}", "write metric=abs:rel, e.g. rougeL=0.01:0.05") from None
        if not all(math.isfinite(x) and x >= 0 for x in pair):
            raise ConfigError(f"--tolerance {name}: {vals!r} must be finite and ≥ 0",
                              "a tolerance is a margin: pass non-negative numbers, e.g. rougeL=0.01:0.05")
        out[name] = pair
    return out


# ----------------------------------------------------------------------------------------------
# Option values → settings


@dataclass
class GateConfig:
    """The baseline: where it is, where it came from, and how it is used."""

    baseline: Path | None = None
    source: str | None = None  # "option" (--baseline / ini), "project" (baselines/<model>.json), "shipped"
    project_root: Path | None = None
    update: bool = False
    require: bool = False
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class OutputConfig:
    report: Path | None
    results: Path
    summary_md: Path | None = None
    summary_append: bool = False  # $GITHUB_STEP_SUMMARY is shared by a job's steps: append, never replace


@dataclass
class Settings:
    """Everything one run of the plugin or the command line was asked to do."""

    run: RunConfig
    gate: GateConfig
    output: OutputConfig
    thresholds: dict[str, Any]
    layer_suite: bool = True
    results_file: Path | None = None  # gate this results file: no model is loaded
    cache_results: bool = False  # reuse an evaluation with the same identity (results_cache)
    values: dict[str, Any] = field(default_factory=dict)  # every option value, by option name


THRESHOLDS = ("entropy-trend-max", "final-entropy-max", "kl-trend-max", "agreement-trend-min", "min-rouge-gain",
              "min-bleu-gain", "check-bertscore", "max-drift-kl", "trend-lens")


def _drift_quant(o: dict[str, Any]) -> Quantization | None:
    if o["drift-load-in-4bit"] and o["drift-load-in-8bit"]:
        raise ConfigError("--drift-load-in-4bit and --drift-load-in-8bit both given", "choose one")
    if o["drift-load-in-4bit"]:
        return Quantization("4bit", o["bnb-4bit-quant-type"], o["bnb-4bit-compute-dtype"], o["bnb-4bit-double-quant"])
    if o["drift-load-in-8bit"]:
        return Quantization("8bit")
    return None


def model_slug(model: str, quantization: Quantization | None = None) -> str:
    """A file name for a model's baseline: ``meta-llama/Llama-2-7b-hf`` → ``meta-llama--Llama-2-7b-hf``."""
    s = str(model).strip().rstrip("/\\")
    if s.startswith(("/", "./", "../", "~")) or s.endswith(".gguf"):
        s = Path(s).name
        if s.endswith(".gguf"):
            s = s[: -len(".gguf")]
    s = re.sub(r"[^A-Za-z0-9._-]+", "--", s.replace("/", "--")).strip(".-") or "model"
    if quantization is not None:
        s += f"-{quantization.method}" + (f"-{quantization.quant_type}" if quantization.method == "4bit" else "")
    return s


DEFAULT_BASELINES = {DEFAULT_MODEL: "smollm2-135m.json"}


def shipped_baseline(model: str) -> Path | None:
    """The baseline shipped inside the package for the default model (read-only), if any."""
    name = DEFAULT_BASELINES.get(model)
    if name is None:
        return None
    from importlib.resources import files

    return Path(str(files("layerwise.fixtures").joinpath("baselines", name)))


def package_folders() -> list[Path]:
    """The installed ``layerwise`` package and its data folders: never written to."""
    from importlib.resources import files

    out = [Path(__file__).resolve().parent]
    for sub in ("fixtures", "templates", "layer_tests"):
        try:
            out.append(Path(str(files(f"layerwise.{sub}"))).resolve())
        except (ModuleNotFoundError, TypeError):
            pass
    return out


def default_baseline(model: str, quant: Quantization | None, project_root: Path, update: bool) -> tuple[Path, str]:
    """Where a model's baseline is when ``--baseline`` is not given: ``baselines/<model>.json`` in
    the project (always, when writing one), else the one shipped for the default model."""
    project = project_root / PROJECT_BASELINES / f"{model_slug(model, quant)}.json"
    shipped = shipped_baseline(model)
    if update or project.is_file() or shipped is None:
        return project, "project"
    return shipped, "shipped"


def _abs(p: Any, base: Path) -> Path | None:
    if p is None:
        return None
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _opt_str(v: Any) -> str | None:
    return None if v is None or not str(v).strip() else str(v)


def from_options(values: dict[str, Any], base: Path, project_root: Path | None = None,
                 environ: dict[str, str] | None = None) -> Settings:
    """Option values (by option name, see :data:`layerwise.options.OPTIONS`) → validated settings.

    ``base`` resolves relative paths of defaults; ``project_root`` is where ``baselines/`` lives.
    Nothing is read or written here; :mod:`layerwise.preflight` checks files.
    """
    import os

    o = values
    env = os.environ if environ is None else environ
    if o["load-in-4bit"] and o["load-in-8bit"]:
        raise ConfigError("--load-in-4bit and --load-in-8bit both given", "choose one")
    quant = None
    if o["load-in-4bit"]:
        quant = Quantization("4bit", o["bnb-4bit-quant-type"], o["bnb-4bit-compute-dtype"], o["bnb-4bit-double-quant"])
    elif o["load-in-8bit"]:
        quant = Quantization("8bit")
    model = str(o["model"]).strip() if o["model"] is not None else ""
    if model.startswith("~"):
        model = os.path.expanduser(model)
    bert = o["bertscore-model"]
    prompts = _abs(o["prompts"], base)
    run = RunConfig(
        model=model, dtype=o["dtype"], device=o["device"], revision=_opt_str(o["revision"]),
        trust_remote_code=o["trust-remote-code"], quantization=quant, device_map=o["device-map"],
        adapter=_opt_str(o["adapter"]), token=_opt_str(o["token"]), attn_implementation=_opt_str(o["attn-implementation"]),
        cache_dir=str(_abs(o["cache-dir"], base)) if o["cache-dir"] else None,
        exit_layers=o["exit-layers"], prompts=str(prompts) if prompts else None,
        limit=o["limit"], prompt_format=o["prompt-format"], batch_size=o["batch-size"],
        decoding=Decoding(max_new_tokens=o["max-new-tokens"], do_sample=o["do-sample"], temperature=o["temperature"],
                          top_k=o["top-k"], top_p=o["top-p"], seed=o["seed"]),
        bertscore_model=None if bert is None or str(bert).strip().lower() == "none" else os.path.expanduser(str(bert)),
        bertscore_num_layers=o["bertscore-num-layers"],
        teacher_forced_tokens=o["teacher-forced-tokens"], drift_against=_opt_str(o["drift-against"]),
        drift_revision=_opt_str(o["drift-revision"]), drift_dtype=o["drift-dtype"],
        drift_quantization=_drift_quant(o),
        draft_tokens=o["draft-tokens"],
        tuned_lens=parse_lens(o.get("lens", DEFAULT_LENS), base), tuned_exits=bool(o.get("tuned-exits")),
    )
    run.validate()
    if o.get("trend-lens", DEFAULT_LENS) == "tuned" and not run.tuned_lens and not o.get("results"):
        raise ConfigError("--trend-lens tuned needs a tuned lens in the run",
                          "pass --lens logit,tuned:PATH as well, or --trend-lens logit")

    gate = GateConfig(update=bool(o["update-baseline"]), require=bool(o["require-baseline"]),
                      tolerances=parse_tolerances(o["tolerance"]))
    gate.project_root = project_root or base
    if o["baseline"] is not None:
        gate.baseline, gate.source = _abs(o["baseline"], base), "option"
    else:
        gate.baseline, gate.source = default_baseline(model, quant, gate.project_root, gate.update)

    summary = _abs(o["summary-md"], base)
    append = False
    if summary is None and env.get("GITHUB_STEP_SUMMARY"):
        summary, append = Path(env["GITHUB_STEP_SUMMARY"]), True
    results_file = _abs(o.get("results"), base)
    results_out = _abs(o["results-json"], base)
    if results_file is not None and o["results-json"] == DEFAULT_RESULTS:
        results_out = None  # gating a file: its copy with the verdict is written only where asked
    output = OutputConfig(report=_abs(o["report"], base), results=results_out,  # type: ignore[arg-type]
                          summary_md=summary, summary_append=append)
    return Settings(run=run, gate=gate, output=output, thresholds={k: o[k] for k in THRESHOLDS},
                    layer_suite=bool(o["layer-suite"]), results_file=results_file,
                    cache_results=bool(o["cache-results"]), values=dict(o))
