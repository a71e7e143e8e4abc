"""The results JSON: its one typed definition (TypedDicts), reading and full validation.

Data flows one way: model → per-layer records → this file → tests, gate and report. The
declarations below are the contract: the runner writes exactly this shape, :func:`load_results`
and :func:`validate_results` check a file against it (types, finite numbers, required keys, and
that per-layer curves have one value per layer), and the report, charts, baseline and fixtures
read it by these names. docs/results-schema.md is tested against these declarations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Required, TypedDict

from .errors import ResultsError
from .io import read_json
from .schema import check

SCHEMA = "pytest-layerwise/results"
SCHEMA_VERSION = 1

Num = float | None  # a statistic; null where it has no value (e.g. no positions)


class ModelInfo(TypedDict, total=False):
    spec: Required[str]
    name: Required[str | None]
    source: Required[str]  # "hub" | "folder" | "gguf" | "object"
    model_type: Required[str]
    architecture: Required[str]
    num_layers: Required[int]
    hidden_size: int | None
    vocab_size: Required[int]
    revision: str | None
    file_sha256: str | None
    dtype: Required[str | None]
    device: Required[str]
    quantization: dict[str, Any] | None
    weight_bytes: int  # the parameters, and a quantized model's constants (absmax, codebooks) beside them
    adapter: dict[str, Any] | None
    notes: list[str]
    lens_proof: dict[str, Any]


class DataInfo(TypedDict):
    path: str
    sha256: str
    rows: int
    limit: int | None
    prompt_format: str


class DecodingInfo(TypedDict):
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int


class TunedLensInfo(TypedDict, total=False):
    """The tuned lens of a run (``--lens logit,tuned:PATH``)."""

    path: Required[str]
    sha256: Required[str | None]  # SHA-256 of its weights file (params.safetensors, or tuned-lens's params.pt)
    format: Required[str | None]  # "layerwise-tuned-lens" | "tuned-lens"
    training: dict[str, Any]  # steps, positions_per_step, seed, optimizer, lr, positions (as its config records)


class LensInfo(TypedDict, total=False):
    final_norm: Required[bool]
    teacher_forced_tokens: Required[int]
    top_k: Required[int]
    tuned: TunedLensInfo  # present when the run also read every layer through a tuned lens


class MetricsInfo(TypedDict):
    bleu_signature: str
    rouge: dict[str, Any]
    bertscore: dict[str, Any] | None


class Speculative(TypedDict, total=False):
    """The self-speculative decoding forecast (layerwise.speculative): teacher-forced on the final
    exit's own greedy generation; each exit's α and E are in ``exits``."""

    gamma: Required[int]  # draft length γ (--draft-tokens)
    positions: int  # generated positions the acceptance rates are over
    final_matches_text: Num  # fraction of them whose full-model argmax is the generated token (≈ 1)
    skipped: str  # why there is no forecast (no final exit, or sampling)


class RunInfo(TypedDict, total=False):
    id: str
    model: Required[ModelInfo]
    data: Required[DataInfo]
    decoding: Required[DecodingInfo]
    exit_layers: Required[list[int]]
    exit_spec: list[str]  # relative exits: the depth each exit layer resolved from, e.g. "25%"
    lens: Required[LensInfo]
    metrics: Required[MetricsInfo]
    versions: Required[dict[str, str]]
    environment: dict[str, Any]
    speculative: Speculative


class Band(TypedDict):
    """A per-layer statistic over positions: mean and inter-quartile range, one value per layer."""

    mean: list[Num]
    q25: list[Num]
    q75: list[Num]


class Rank(TypedDict):
    mean: list[Num]
    median: list[Num]


class DepthDistribution(TypedDict):
    """Decision depths over a section's rows or positions (layerwise.milestones)."""

    mean: Num
    median: Num
    counts: list[int]  # [layer]: how many are decided at that layer
    decided: list[Num]  # [layer]: the fraction decided at or before that layer


class DecisionDepth(TypedDict):
    top1: DepthDistribution  # the first layer from which the final top-1 stays top-1
    top10: DepthDistribution  # the first layer from which it stays within the top 10


class LensSection(TypedDict, total=False):
    entropy: Required[Band]
    kl_to_final: Required[Band]
    top1_agree: Required[list[Num]]
    final_top1_rank: Required[Rank]
    entropy_raw: Band  # the lens without the final norm (the original notebook's)
    xent: Band  # cross-entropy of the true next token (teacher forcing)
    xent_raw: Band
    rows: int  # first_token: rows
    positions: int  # teacher_forced: positions pooled
    decision_depth: DecisionDepth
    decided_top1: list[Num]  # = decision_depth.top1.decided (a gated curve)
    decided_top10: list[Num]  # = decision_depth.top10.decided (a gated curve)
    copy_rate: list[Num]  # copy collapse: fraction whose top-1 is the input token at that position


class TopToken(TypedDict):
    token: str
    id: int
    prob: Num


class Example(TypedDict):
    row: int
    top: dict[str, list[TopToken]]  # exit layer (as a string) → top-k at the first response position


class Grid(TypedDict):
    row: int
    positions: list[str]
    layers: list[int]
    top_token: list[list[str]]  # [layer][position]
    top_prob: list[list[Num]]


class Drift(TypedDict, total=False):
    kl_mean: Required[list[Num]]
    kl_q25: list[Num]
    kl_q75: list[Num]
    top1_agree: list[Num]
    positions: int
    against: str
    label: str
    first_divergent: int | None  # the first layer whose KL(reference ‖ this model) is above the noise floor


class PerRow(TypedDict, total=False):
    """Row-level lens records (the gate's evidence of where a model changed)."""

    first_top1: list[list[int]]  # [layer][row]: top-1 token id at the first response position
    tf_agree: list[list[Num]]  # [layer][row]: teacher-forced top-1 agreement with the final layer


class TunedSection(TypedDict, total=False):
    """The same positions as the logit lens, read through the tuned lens (translator k, final norm, head)."""

    first_token: Required[LensSection]
    teacher_forced: Required[LensSection]
    examples: list[Example]


class Lens(TypedDict, total=False):
    first_token: Required[LensSection]
    teacher_forced: Required[LensSection]
    per_row: PerRow
    examples: list[Example]
    grid: Grid
    drift: Drift
    tuned: TunedSection  # --lens logit,tuned:PATH


class ExitRow(TypedDict, total=False):
    layer: Required[int]
    bleu: Required[Num]
    rougeL: Required[Num]
    rougeLsum: Num
    bertscore_p: Num
    bertscore_r: Num
    bertscore_f1: Num
    mean_len: Required[Num]
    empty: Required[int]
    first_entropy: Required[Num]
    gen_entropy: Num
    accept_rate: Num  # α: self-speculative acceptance rate of this exit as the draft (run.speculative)
    accept_tokens: Num  # E = (1 − α^(γ+1)) / (1 − α): expected tokens per full-model forward


class RowScores(TypedDict, total=False):
    bleu: Num
    rougeL: Num
    bertscore_f1: Num
    accept_rate: Num  # this row's α (run.speculative)


class TokenPrint(TypedDict):
    sha: str  # SHA-256 (first 16 hex digits) of the generated token ids, EOS included
    head: list[int]  # the first 16 generated ids


class TunedRow(TypedDict, total=False):
    """A row's generations at the exits decoded through the tuned lens (--tuned-exits)."""

    generations: Required[dict[str, str]]  # tuned exit layer → text
    n_tokens: dict[str, int]
    scores: dict[str, RowScores]
    tokens: dict[str, TokenPrint]


class Row(TypedDict, total=False):
    index: Required[int]
    instruction: Required[str]
    input: Required[str]
    reference: Required[str]
    prompt: Required[str]
    generations: Required[dict[str, str]]
    n_tokens: dict[str, int]
    scores: dict[str, RowScores]
    tokens: dict[str, TokenPrint]  # exit layer → fingerprint of the generated tokens
    tuned: TunedRow  # --tuned-exits


class TestOutcome(TypedDict):
    nodeid: str
    outcome: str
    message: str


class GateDeviation(TypedDict, total=False):
    metric: Required[str]
    layer: Required[int]
    baseline: Required[float]
    value: Required[Num]
    allowed: Required[float]
    where: str  # relative exits: depth / exit spec instead of "layer N"


class GateQuality(TypedDict):
    exit: str
    metric: str
    mean: float  # mean paired difference over rows (this run − baseline)
    low: float
    high: float
    n: int
    significant: bool  # the 95 % bootstrap interval excludes zero
    detectable: float  # the mean change these rows detect 80 % of the time at the 5 % level


class GateVerdict(TypedDict, total=False):
    status: Required[Literal["passed", "failed", "not_gated"]]
    line: Required[str]
    baseline: str | None
    checked: int
    outside: int
    why: str | None
    refused: bool
    warnings: list[str]
    baseline_model: str | None
    baseline_created: str | None
    deviations: list[GateDeviation]
    obtained: str
    first_divergent: int | None  # the lowest layer at which this run departs from the baseline
    divergence: str
    summary: list[str]
    quality: list[GateQuality]
    rows_changed: dict[str, list[int]]  # exit → [rows whose generation changed, rows compared]
    within_noise: list[GateDeviation]  # beyond tolerance, but not beyond the rows' noise
    matched_exits: list[list[Any]]


class Results(TypedDict, total=False):
    """The whole results JSON (docs/results-schema.md)."""

    schema: Required[Literal["pytest-layerwise/results"]]
    schema_version: Required[int]
    run: Required[RunInfo]
    layers: Required[list[int]]
    lens: Required[Lens]
    exits: Required[list[ExitRow]]
    tuned_exits: list[ExitRow]  # --tuned-exits: the exits below L decoded through the tuned lens
    rows: Required[list[Row]]
    tests: list[TestOutcome]
    timing: dict[str, Any]
    gate: GateVerdict


def load_results(path: str | Path) -> Results:
    """Read and fully validate a results JSON written by layerwise, or raise one ResultsError line."""
    p = Path(path)
    data = read_json(p, "results file", ResultsError, "pass the path that --results-json wrote",
                     "re-run to write it again; layerwise never leaves half-written files, so it was changed by hand or by another tool")
    validate_results(data, str(p))
    return data


def validate_results(data: Any, where: str = "results") -> None:
    """Raise a one-line :class:`ResultsError` for the first way ``data`` breaks the contract."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{where} is not a layerwise results file (no \"schema\": \"{SCHEMA}\")",
                           "pass a file written by --results-json or `layerwise run`")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(
            f"{where} has schema version {data.get('schema_version')!r}; this layerwise reads version {SCHEMA_VERSION}",
            "re-run the suite with this version of pytest-layerwise to write it again",
        )
    problem = check(data, Results) or _shape(data)
    if problem:
        raise ResultsError(f"{where} does not match the results schema: {problem}",
                           "re-run to write it again; it was changed by hand or written by another tool")


def _shape(data: Results) -> str | None:
    """What the types cannot say: one value per layer, exits within the model's depth."""
    L = data["run"]["model"]["num_layers"]
    if data["layers"] != list(range(L + 1)):
        return f"layers: expected 0..{L} (the model has {L} blocks)"
    tuned = data["lens"].get("tuned")
    for prefix, lens in (("lens", data["lens"]), ("lens.tuned", tuned or {})):
        for sec_name in ("first_token", "teacher_forced"):
            for stat, val in (lens.get(sec_name) or {}).items():
                curves = {"": val} if isinstance(val, list) else (val if isinstance(val, dict) else {})
                for part, curve in curves.items():
                    if isinstance(curve, list) and len(curve) != L + 1:
                        name = f"{prefix}.{sec_name}.{stat}" + (f".{part}" if part else "")
                        return f"{name}: {len(curve)} values for {L + 1} layers"
    for sec_name in ("first_token", "teacher_forced"):
        for kind, dist in (data["lens"][sec_name].get("decision_depth") or {}).items():
            for part in ("counts", "decided"):
                if len(dist[part]) != L + 1:
                    return f"lens.{sec_name}.decision_depth.{kind}.{part}: {len(dist[part])} values for {L + 1} layers"
    for e in data["exits"]:
        if not 1 <= e["layer"] <= L:
            return f"exits: layer {e['layer']} is outside 1..{L}"
    exits = [e["layer"] for e in data["exits"]]
    if sorted(data["run"]["exit_layers"]) != sorted(exits):
        return f"exits: layers {exits} differ from run.exit_layers {data['run']['exit_layers']}"
    if "tuned_exits" in data:
        if tuned is None:
            return "tuned_exits: present, but lens.tuned is not (tuned exits need the tuned lens)"
        for e in data["tuned_exits"]:
            if e["layer"] not in exits or e["layer"] >= L:
                return f"tuned_exits: layer {e['layer']} is not an exit layer below {L}"
    return None


DOC_BEGIN = "<!-- fields: generated from layerwise.results.Results; tests/test_report.py checks it -->"
DOC_END = "<!-- end of generated fields -->"


def doc_fields() -> str:
    """The field reference of docs/results-schema.md, generated from :class:`Results`."""
    from .schema import describe

    return "\n".join([DOC_BEGIN, "", *describe(Results), "", DOC_END])


def token_print(ids: list[int]) -> dict[str, Any]:
    """A row's generated tokens as a fingerprint: SHA-256 (16 hex digits) of the ids, and the first 16."""
    import hashlib

    return {"sha": hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16], "head": list(ids[:16])}


def assemble(*, run: dict[str, Any], lens: dict[str, Any], exits: list[dict[str, Any]], rows: list[dict[str, Any]],
             timing: dict[str, Any], tuned_exits: list[dict[str, Any]] | None = None) -> Results:
    """The results dict from its parts, in the declared shape (validated by the caller's reader)."""
    L = run["model"]["num_layers"]
    out: Results = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "run": run, "layers": list(range(L + 1)),  # type: ignore[typeddict-item]
                    "lens": lens, "exits": exits, "rows": rows, "tests": [], "timing": timing}
    if tuned_exits:
        out["tuned_exits"] = tuned_exits
    return out
