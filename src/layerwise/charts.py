"""Charts for the HTML report, drawn from a results dict (never from a model).

Every chart is a ``matplotlib.figure.Figure`` (no pyplot, no global backend switch) saved as an
SVG string ready to be inlined in HTML. Output is deterministic: a fixed ``svg.hashsalt`` per
chart, no date metadata, and element ids prefixed so that several SVGs can live in one page.
Text is written as ``<text>`` elements (``svg.fonttype = none``), which matplotlib escapes; token
strings are further passed through :func:`token_label` so that ``$`` never starts mathtext.
A chart function returns ``None`` when the results lack the data it needs.
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

DEPTH_NOTE = "layer k = output of block k; 0 = embeddings"
X_LABEL = "layer (0 = embeddings, k = output of block k)"

# Colour-blind-safe palette (Okabe–Ito), fixed so that a series keeps its colour everywhere.
BLUE, ORANGE, GREEN, VERMILION, PURPLE, SKY, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#7f7f7f")

_RC = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "path.simplify": True,
}


# --------------------------------------------------------------------------- helpers

# Characters that draw nothing (or nothing distinguishable): other spaces, format, separators, private use.
_INVISIBLE = {"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"}


def token_label(token: Any, maxlen: int = 14) -> str:
    """A token as a readable, single-line label: whitespace made visible, long ones cut.

    Newline → ``\\n``, tab → ``\\t``, a leading/trailing space → ``␣``, empty → ``∅``; other
    control characters as ``\\xNN``, invisible ones (no-break space, zero-width joiner, ...) as
    ``\\uNNNN``; ``$`` escaped so matplotlib does not parse it as math.
    """
    s = "" if token is None else str(token)
    if s == "":
        return "∅"
    out = []
    for ch in s:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        elif ch != " " and unicodedata.category(ch) in _INVISIBLE:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    s = "".join(out)
    if s.startswith(" "):
        s = "␣" + s[1:]
    if s.endswith(" "):
        s = s[:-1] + "␣"
    if s.strip() == "":
        s = s.replace(" ", "␣")
    if len(s) > maxlen:
        s = s[: maxlen - 1] + "…"
    return s.replace("$", r"\$")


def _label(text: str) -> str:
    """Free text (titles, legends) with ``$`` escaped."""
    return str(text).replace("$", r"\$")


def _floats(values: Any) -> list[float]:
    out = []
    for v in values or []:
        try:
            out.append(float(v) if v is not None else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _has_values(values: Any) -> bool:
    return any(not math.isnan(v) for v in _floats(values))


def _band(stats: Any) -> tuple[list[float], list[float] | None, list[float] | None] | None:
    """(mean, q25, q75) from {"mean", "q25", "q75"}; None when there is no mean."""
    if not isinstance(stats, dict) or not _has_values(stats.get("mean")):
        return None
    mean = _floats(stats.get("mean"))
    q25, q75 = _floats(stats.get("q25")), _floats(stats.get("q75"))
    if len(q25) != len(mean) or len(q75) != len(mean):
        q25 = q75 = None  # type: ignore[assignment]
    return mean, q25, q75


def _layers(results: dict, n: int) -> list[int]:
    layers = results.get("layers")
    if isinstance(layers, list) and len(layers) == n:
        return [int(x) for x in layers]
    return list(range(n))


@contextlib.contextmanager
def _style(name: str) -> Iterator[None]:
    import matplotlib

    rc = dict(_RC, **{"svg.hashsalt": f"layerwise-{name}"})
    with matplotlib.rc_context(rc), warnings.catch_warnings():
        # Tokens from any vocabulary may lack a glyph in DejaVu Sans; the browser's font
        # fallback draws them, so matplotlib's layout warning is noise here.
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing")
        warnings.filterwarnings("ignore", message=r".*[Mm]issing from font")
        yield


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


_ID_RE = re.compile(r'(\bid=")|(url\(#)|(xlink:href="#)|(href="#)')


def _svg(fig, name: str, alt: str) -> str:
    """Save ``fig`` as an SVG string for inlining: no XML prolog, no metadata, unique ids."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    start = text.find("<svg")
    text = text[start:]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    prefix = f"lw-{name}-"
    text = _ID_RE.sub(lambda m: m.group(0) + prefix, text)
    text = text.replace(
        "<svg ",
        f'<svg class="chart" role="img" aria-label="{html.escape(alt, quote=True)}" ',
        1,
    )
    return text.strip() + "\n"


def _mark_exits(ax, exit_layers: Sequence[int]) -> None:
    for k in exit_layers or []:
        ax.axvline(k, color=GREY, lw=0.8, ls=":", zorder=0)


def _plot_band(ax, x, stats, color, label, ls="-", band: bool = True) -> bool:
    b = _band(stats)
    if b is None:
        return False
    mean, q25, q75 = b
    xs = x[: len(mean)]
    ax.plot(xs, mean[: len(xs)], color=color, lw=1.8, ls=ls, marker="o", ms=3, label=label)
    if band and q25 is not None and q75 is not None:
        ax.fill_between(xs, q25[: len(xs)], q75[: len(xs)], color=color, alpha=0.18, lw=0)
    return True


def _depth_axes(ax, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------- (a) examples

def chart_example(example: dict, caption: str = "", index: int = 0, lens: str = "logit") -> str | None:
    """The original study's chart for one row: top-k of the first response token per exit layer,
    read through the logit lens (or, ``lens="tuned"``, through the tuned lens)."""
    top = example.get("top") if isinstance(example, dict) else None
    if not isinstance(top, dict) or not top:
        return None
    keys = sorted(top, key=lambda k: int(k) if str(k).lstrip("-").isdigit() else 10**9)
    keys = [k for k in keys if isinstance(top[k], list) and top[k]]
    if not keys:
        return None
    ncols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / ncols)
    kmax = max(len(top[k]) for k in keys)
    name = f"example-{index}" if lens == "logit" else f"example-{lens}-{index}"
    with _style(name):
        fig = _figure(2.9 * ncols + 0.4, (0.22 * kmax + 0.9) * nrows + 0.5)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i >= len(keys):
                ax.set_visible(False)
                continue
            k = keys[i]
            entries = [e if isinstance(e, dict) else {} for e in top[k][:kmax]]
            probs = [float(e.get("prob") or 0.0) for e in entries]
            labels = [token_label(e.get("token")) for e in entries]
            y = list(range(len(entries)))
            ax.barh(y, probs, color=BLUE if lens == "logit" else GREEN, height=0.7)
            ax.set_yticks(y, labels=labels)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.grid(axis="y", visible=False)
            for yi, p in zip(y, probs):
                if p > 0.8:  # long bar: label inside its end, in white
                    ax.text(p - 0.02, yi, f"{p:.2f}", va="center", ha="right", fontsize=7, color="white")
                else:
                    ax.text(p + 0.02, yi, f"{p:.2f}", va="center", fontsize=7, color="#333")
            ax.set_title(f"exit layer {k}")
            if i // ncols == nrows - 1:
                ax.set_xlabel("probability")
        row = example.get("row")
        title = f"Row {row}: first response token, top-{kmax} at each exit layer, {lens} lens ({DEPTH_NOTE})"
        fig.suptitle(_label(title), fontsize=10)
        return _svg(fig, name, title + (f" — {caption}" if caption else ""))


# --------------------------------------------------------------------------- (b–d) depth curves

def _lens(results: dict, kind: str) -> dict:
    part = results["lens"].get(kind)
    return part if isinstance(part, dict) else {}


def _wide_range(series: list) -> bool:
    """True when the largest mean is over 4× the median of the positive means (one layer dwarfs the rest)."""
    vals = []
    for stats in series:
        if isinstance(stats, dict):
            vals += [v for v in _floats(stats.get("mean")) if not math.isnan(v)]
    pos = sorted(v for v in vals if v > 0)
    return bool(pos) and max(pos) > 4 * pos[len(pos) // 2]


def _depth_chart(results: dict, key: str, ylabel: str, title: str, name: str,
                 ylim: tuple[float, float] | None = None, symlog_if_wide: bool = False) -> str | None:
    ft, tf = _lens(results, "first_token"), _lens(results, "teacher_forced")
    exits = results["run"]["exit_layers"]
    tuned = _lens(results, "tuned")
    both = bool(tuned)
    suffix = ", logit lens" if both else ""
    series = [(ft.get(key), BLUE, f"first response token (last prompt position){suffix}", "-"),
              (tf.get(key), ORANGE, f"teacher-forced reference tokens ({tf.get('positions', '?')} positions){suffix}", "-")]
    if both:  # the same positions through the tuned lens: dashed, no band (the logit lens's band stays readable)
        series += [((tuned.get("first_token") or {}).get(key), BLUE, "first response token, tuned lens", "--"),
                   ((tuned.get("teacher_forced") or {}).get(key), ORANGE, "teacher-forced, tuned lens", "--")]
    if not any(_band(s) is not None or (isinstance(s, list) and _has_values(s)) for s, _, _, _ in series):
        return None
    full_title = f"{title} ({DEPTH_NOTE})"
    with _style(name):
        fig = _figure(8.0, 3.8 if not both else 4.4)
        ax = fig.add_subplot()
        for stats, color, label, ls in series:
            if isinstance(stats, list):  # plain per-layer array (top-1 agreement)
                vals = _floats(stats)
                if _has_values(vals):
                    ax.plot(_layers(results, len(vals)), vals, color=color, lw=1.8, ls=ls, marker="o", ms=3, label=label)
            elif isinstance(stats, dict):
                n = len(stats.get("mean") or [])
                _plot_band(ax, _layers(results, n), stats, color, label, ls, band=ls == "-")
        _mark_exits(ax, exits)
        if symlog_if_wide and _wide_range([s for s, _, _, _ in series]):
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
            ylabel += " — symlog scale"
        _depth_axes(ax, ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(_label(full_title))
        ax.legend(loc="best")
        return _svg(fig, name, full_title)


def chart_entropy(results: dict) -> str | None:
    """(b) mean lens entropy by depth, inter-quartile band, first token and teacher-forced."""
    return _depth_chart(results, "entropy", "entropy (nats); band = 25–75 %",
                        "Mean lens entropy by depth", "entropy")


def chart_kl(results: dict) -> str | None:
    """(c) KL(final || layer) by depth with inter-quartile band."""
    return _depth_chart(results, "kl_to_final", "KL(final ‖ layer) (nats); band = 25–75 %",
                        "KL divergence to the final layer by depth", "kl", symlog_if_wide=True)


def chart_top1(results: dict) -> str | None:
    """(d) fraction of positions whose top-1 token equals the final layer's."""
    return _depth_chart(results, "top1_agree", "top-1 agreement with final layer (fraction)",
                        "Top-1 agreement with the final layer by depth", "top1", ylim=(-0.03, 1.03))


def chart_copy(results: dict) -> str | None:
    """Copy collapse: per layer, the fraction of positions whose top-1 is the input token there."""
    return _depth_chart(results, "copy_rate", "top-1 = the input token (fraction)",
                        "Copy collapse: the lens predicts the token it reads", "copy", ylim=(-0.03, 1.03))


def chart_decision_depth(results: dict) -> str | None:
    """Histograms of decision depth (the first layer from which the final top-1 stays top-1, and
    stays in the top 10), first token and teacher-forced, with the exits marked."""
    ft, tf = _lens(results, "first_token"), _lens(results, "teacher_forced")
    kinds = [k for k in ("top1", "top10") if isinstance((tf.get("decision_depth") or {}).get(k), dict)
             or isinstance((ft.get("decision_depth") or {}).get(k), dict)]
    if not kinds:
        return None
    name = "decision"
    title = f"Decision depth: where each prediction is settled ({DEPTH_NOTE})"
    with _style(name):
        fig = _figure(10.0, 3.6)
        axes = fig.subplots(1, len(kinds), squeeze=False)[0]
        for ax, kind in zip(axes, kinds):
            drawn = False
            for sec, color, label, dx in ((ft, BLUE, "first response token", -0.2),
                                          (tf, ORANGE, "teacher-forced positions", 0.2)):
                d = (sec.get("decision_depth") or {}).get(kind)
                if not isinstance(d, dict) or not d.get("counts"):
                    continue
                counts = _floats(d["counts"])
                total = sum(c for c in counts if not math.isnan(c))
                if not total:
                    continue
                xs = [i + dx for i in range(len(counts))]
                mean = _num_text(d.get("mean"))
                ax.bar(xs, [c / total for c in counts], width=0.4, color=color, label=_label(f"{label} (mean {mean})"))
                drawn = True
            if not drawn:
                ax.set_visible(False)
                continue
            _mark_exits(ax, results["run"]["exit_layers"])
            _depth_axes(ax, "fraction decided at this layer")
            what = "stays top-1" if kind == "top1" else "stays in the top 10"
            ax.set_title(_label(f"first layer from which the final top-1 {what}"))
            ax.legend(loc="upper left")
        fig.suptitle(_label(title), fontsize=10)
        return _svg(fig, name, title)


def _num_text(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f}"


# --------------------------------------------------------------------------- (e) metrics

METRIC_SERIES = (("rougeL", "ROUGE-L", GREEN), ("rougeLsum", "ROUGE-Lsum", SKY),
                 ("bertscore_f1", "BERTScore F1", PURPLE))


def _metric_runs(ax_bleu, ax_01, exits: list[dict], ls: str) -> None:
    exits = sorted((e for e in exits if isinstance(e, dict) and "layer" in e), key=lambda e: e["layer"])
    xs = [int(e["layer"]) for e in exits]
    bleu = _floats([e.get("bleu") for e in exits])
    if _has_values(bleu):
        ax_bleu.plot(xs, bleu, color=BLUE, ls=ls, marker="o", lw=1.8, label="BLEU")
    for key, label, color in METRIC_SERIES:
        vals = _floats([e.get(key) for e in exits])
        if _has_values(vals):
            ax_01.plot(xs, vals, color=color, ls=ls, marker="o", lw=1.8, label=label)


def _metrics_figure(runs: list[tuple[list[dict], str, str]], name: str, title: str) -> str | None:
    """runs: (exits, line style, run label); with two runs the legend explains colour and style."""
    from matplotlib.lines import Line2D

    if not any(e for e, _, _ in runs):
        return None
    with _style(name):
        fig = _figure(9.0 if len(runs) == 1 else 10.5, 3.6)
        ax_bleu, ax_01 = fig.subplots(1, 2)
        for exits, ls, _label_ in runs:
            _metric_runs(ax_bleu, ax_01, exits, ls)
        all_layers = sorted({int(e["layer"]) for exits, _, _ in runs for e in exits if "layer" in e})
        top = max([v for exits, _, _ in runs for v in _floats([e.get("bleu") for e in exits]) if not math.isnan(v)] + [1.0])
        ax_bleu.set_ylim(0, min(100.0, top * 1.15 + 0.5))
        ax_bleu.set_ylabel("BLEU (sacrebleu, 0–100)")
        ax_bleu.set_title("BLEU by exit layer")
        ax_01.set_ylim(0, 1)
        ax_01.set_ylabel("score (0–1)")
        ax_01.set_title("ROUGE and BERTScore by exit layer")
        for ax in (ax_bleu, ax_01):
            ax.set_xticks(all_layers)
            ax.set_xlabel("exit layer (output of block k)")
        if len(runs) == 1:
            for ax in (ax_bleu, ax_01):
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(loc="best")
        else:
            handles, labels = [], []
            for ax in (ax_bleu, ax_01):
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(Line2D([], [], color=h.get_color(), marker="o", lw=1.8))
                        labels.append(lab)
            for _exits, ls, run_label in runs:
                handles.append(Line2D([], [], color=GREY, ls=ls, lw=1.8))
                labels.append(_label(run_label))
            ax_01.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(_label(title), fontsize=10)
        return _svg(fig, name, title)


def chart_metrics(results: dict) -> str | None:
    """(e) BLEU (own axis, 0–100) and ROUGE-L / ROUGE-Lsum / BERTScore F1 (0–1) by exit layer;
    with tuned exits, theirs dashed over the plain ones (solid)."""
    tuned = results.get("tuned_exits")
    if isinstance(tuned, list) and tuned:
        return _metrics_figure([(results["exits"], "-", "plain exits (final norm + head)"),
                                (tuned, "--", "tuned-lens exits (translator k first)")], "metrics",
                               f"Generation quality by exit layer, plain and through the tuned lens ({DEPTH_NOTE})")
    return _metrics_figure([(results["exits"], "-", "this run")], "metrics",
                           f"Generation quality by exit layer ({DEPTH_NOTE})")


# --------------------------------------------------------------------------- (f) grid

GRID_MAX_LAYERS = 32
GRID_MAX_POSITIONS = 24


def _pick_layers(layers: list[int], keep: Sequence[int], limit: int) -> list[int]:
    """Indices into ``layers``: all when few, else an even subset with 0, the last and ``keep``."""
    n = len(layers)
    if n <= limit:
        return list(range(n))
    chosen = {0, n - 1} | {i for i, l in enumerate(layers) if l in set(keep)}
    step = (n - 1) / (limit - 1)
    chosen |= {round(i * step) for i in range(limit)}
    return sorted(chosen)


def chart_grid(results: dict) -> tuple[str, str] | None:
    """(f) logit-lens grid: layers × positions, cell = top token, colour = its probability.

    Returns (svg, note) where note says which layers/positions are shown, or None.
    """
    grid = results["lens"].get("grid")
    if not isinstance(grid, dict):
        return None
    toks, probs = grid.get("top_token"), grid.get("top_prob")
    if not toks or not probs or not isinstance(toks, list) or not isinstance(probs, list):
        return None
    positions = list(grid.get("positions") or [""] * len(toks[0]))
    try:
        layers = [int(x) for x in (grid.get("layers") or range(len(toks)))]
    except (TypeError, ValueError):
        layers = list(range(len(toks)))
    n_layers = min(len(layers), len(toks), len(probs))
    layers = layers[:n_layers]
    if not all(isinstance(r, list) for r in toks[:n_layers] + probs[:n_layers]):
        return None
    n_pos = min(len(positions), min(len(r) for r in toks[:n_layers]), min(len(r) for r in probs[:n_layers]))
    if n_layers == 0 or n_pos == 0:
        return None
    exits = results["run"]["exit_layers"]
    li = _pick_layers(layers, exits, GRID_MAX_LAYERS)
    p0 = max(0, n_pos - GRID_MAX_POSITIONS)
    pi = list(range(p0, n_pos))
    notes = []
    if len(li) < n_layers:
        notes.append("layers shown: " + ", ".join(str(layers[i]) for i in li) + f" (of 0–{layers[-1]})")
    else:
        notes.append(f"all {n_layers} layers shown")
    if p0:
        notes.append(f"last {len(pi)} of {n_pos} positions shown")
    else:
        notes.append(f"all {n_pos} positions shown")
    note = "; ".join(notes)

    import numpy as np

    data = np.array([[_floats([probs[i][p]])[0] for p in pi] for i in li], dtype=float)
    name = "grid"
    title = f"Logit lens, row {grid.get('row', '?')}: top token at each layer and position ({DEPTH_NOTE})"
    with _style(name):
        fig = _figure(1.8 + 0.62 * len(pi), 1.9 + 0.27 * len(li))
        ax = fig.add_subplot()
        ax.grid(False)
        # pcolormesh, not imshow: vector cells stay sharp at any zoom (imshow embeds a PNG).
        im = ax.pcolormesh(np.arange(len(pi) + 1) - 0.5, np.arange(len(li) + 1) - 0.5, data,
                           cmap="viridis", vmin=0.0, vmax=1.0, edgecolors="white", linewidth=0.3)
        ax.set_xlim(-0.5, len(pi) - 0.5)
        ax.set_ylim(-0.5, len(li) - 0.5)
        for r, i in enumerate(li):
            for c, p in enumerate(pi):
                v = data[r, c]
                color = "black" if (not math.isnan(v) and v > 0.55) else "white"
                ax.text(c, r, token_label(toks[i][p], 7), ha="center", va="center", fontsize=6.5, color=color)
        ax.set_yticks(range(len(li)), labels=[str(layers[i]) for i in li])
        ax.set_xticks(range(len(pi)), labels=[token_label(positions[p], 12) for p in pi],
                      rotation=55, ha="right", rotation_mode="anchor")
        ax.set_ylabel("layer")
        ax.set_xlabel("input token at each position (cell = top prediction for the next token)")
        for side in ("top", "right"):
            ax.spines[side].set_visible(True)
        cb = fig.colorbar(im, ax=ax, shrink=0.6, pad=0.01)
        if cb.solids is not None:
            cb.solids.set_rasterized(False)  # keep the page free of embedded images
            cb.solids.set_edgecolor("face")  # no hairline seams between the colour steps
        cb.set_label("probability of the top token")
        ax.set_title(_label(title))
        return _svg(fig, name, title + "; " + note), note


# --------------------------------------------------------------------------- (g) norm vs raw

def chart_norm(results: dict) -> str | None:
    """(g) lens entropy with and without the final norm, first token and teacher-forced side by side."""
    panels = []
    for kind, label in (("first_token", "first response token"), ("teacher_forced", "teacher-forced tokens")):
        part = _lens(results, kind)
        if _band(part.get("entropy")) or _band(part.get("entropy_raw")):
            panels.append((part, label))
    if not panels:
        return None
    vocab = ((results["run"]).get("model") or {}).get("vocab_size")
    exits = results["run"]["exit_layers"]
    name = "norm"
    title = f"Lens entropy with and without the final norm ({DEPTH_NOTE})"
    with _style(name):
        fig = _figure(5.0 * len(panels) + 0.4, 4.2)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (part, label) in zip(axes, panels):
            for key, color, lab, ls in (("entropy", BLUE, "final norm + unembedding", "-"),
                                        ("entropy_raw", VERMILION, "unembedding only (no final norm)", "--")):
                st = part.get(key)
                if isinstance(st, dict):
                    _plot_band(ax, _layers(results, len(st.get("mean") or [])), st, color, lab, ls)
            if isinstance(vocab, int) and vocab > 1:
                ax.axhline(math.log(vocab), color=GREY, lw=1, ls="-.",
                           label=f"uniform over {vocab:,} tokens (ln V = {math.log(vocab):.1f})")
            if _band(part.get("entropy_raw")) is None:
                ax.text(0.5, 0.5, "no-norm curve not recorded", transform=ax.transAxes, ha="center",
                        color=GREY, fontsize=8)
            _mark_exits(ax, exits)
            _depth_axes(ax, "entropy (nats); band = 25–75 %")
            ax.set_title(label)
        handles, labels = [], []
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside lower center", ncols=3)
        fig.suptitle(_label(title), fontsize=10)
        return _svg(fig, name, title)


# --------------------------------------------------------------------------- (h) compare

def chart_compare_depth(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> str | None:
    """Overlaid depth curves (entropy, KL to final, top-1 agreement) of two runs."""
    metrics = (("entropy", "mean entropy (nats)"), ("kl_to_final", "KL(final ‖ layer) (nats)"),
               ("top1_agree", "top-1 agreement with final"))
    kinds = (("first_token", "first response token"), ("teacher_forced", "teacher-forced"))
    have = any(_lens(r, k).get(m) is not None for r in (old, new) for k, _ in kinds for m, _ in metrics)
    if not have:
        return None
    name = "compare-depth"
    title = f"Depth curves: {labels[0]} (dashed) vs {labels[1]} (solid) ({DEPTH_NOTE})"
    with _style(name):
        fig = _figure(12.0, 6.6)
        axes = fig.subplots(2, 3, squeeze=False)
        for r, (kind, klabel) in enumerate(kinds):
            for c, (metric, mlabel) in enumerate(metrics):
                ax = axes[r][c]
                for res, color, ls, lab in ((old, ORANGE, "--", labels[0]), (new, BLUE, "-", labels[1])):
                    st = _lens(res, kind).get(metric)
                    if isinstance(st, list):
                        vals = _floats(st)
                        if _has_values(vals):
                            ax.plot(_layers(res, len(vals)), vals, color=color, ls=ls, lw=1.8, marker="o",
                                    ms=3, label=_label(lab))
                    elif isinstance(st, dict):
                        _plot_band(ax, _layers(res, len(st.get("mean") or [])), st, color, _label(lab), ls)
                _depth_axes(ax, mlabel)
                if metric == "top1_agree":
                    ax.set_ylim(-0.03, 1.03)
                ax.set_title(f"{mlabel.split(' (')[0]} — {klabel}")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(loc="best")
                else:
                    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color=GREY)
        fig.suptitle(_label(title), fontsize=10)
        return _svg(fig, name, title)


def chart_compare_metrics(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> str | None:
    return _metrics_figure([(old.get("exits") or [], "--", str(labels[0])),
                            (new.get("exits") or [], "-", str(labels[1]))],
                           "compare-metrics", f"Quality by exit layer: {labels[0]} (dashed) vs {labels[1]} (solid)")


def drift_of(results: dict) -> dict | None:
    d = results["lens"].get("drift")
    if isinstance(d, dict) and _has_values(d.get("kl_mean")):
        return d
    return None


def _drift_figure(found: list[tuple[dict, dict, str | None, str]], name: str) -> str:
    """found: (results, drift, run label or None, colour). KL with IQR band; top-1 agreement if recorded."""
    has_agree = any(_has_values(d.get("top1_agree")) for _r, d, _l, _c in found)
    title = f"Per-layer drift ({DEPTH_NOTE})"
    with _style(name):
        fig = _figure(11.0 if has_agree else 8.0, 3.6)
        axes = fig.subplots(1, 2 if has_agree else 1, squeeze=False)[0]
        for res, d, lab, color in found:
            text = str(d.get("label") or "drift (mean KL)") + (f" [in {lab}]" if lab else "")
            stats = {"mean": d.get("kl_mean"), "q25": d.get("kl_q25"), "q75": d.get("kl_q75")}
            _plot_band(axes[0], _layers(res, len(_floats(d.get("kl_mean")))), stats, color, _label(text))
            if has_agree and _has_values(d.get("top1_agree")):
                vals = _floats(d.get("top1_agree"))
                axes[1].plot(_layers(res, len(vals)), vals, color=color, lw=1.8, marker="o", ms=3,
                             label=_label(lab or "top-1 agreement"))
        _depth_axes(axes[0], "mean KL (nats); band = 25–75 %")
        axes[0].set_title("KL between the two models' lens distributions")
        axes[0].legend(loc="best")
        if has_agree:
            _depth_axes(axes[1], "top-1 agreement (fraction)")
            axes[1].set_ylim(-0.03, 1.03)
            axes[1].set_title("Same top-1 token in both models")
            if len(found) > 1:
                axes[1].legend(loc="best")
        fig.suptitle(_label(title), fontsize=10)
        return _svg(fig, name, title)


def chart_drift_report(results: dict) -> str | None:
    """Drift recorded in one run (``--drift-against``): per-layer KL(reference ‖ this model)."""
    d = drift_of(results)
    return None if d is None else _drift_figure([(results, d, None, BLUE)], "drift")


def chart_drift(old: dict, new: dict, labels: Sequence[str] = ("old", "new")) -> str | None:
    """Per-layer drift curve(s) from ``lens.drift`` ({"kl_mean": [L+1], "label": ...}), when present."""
    found = [(res, d, str(lab), color) for res, lab, color in ((old, labels[0], ORANGE), (new, labels[1], BLUE))
             if (d := drift_of(res)) is not None]
    return _drift_figure(found, "drift") if found else None
