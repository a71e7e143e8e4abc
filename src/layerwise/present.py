"""What both HTML pages share: the Jinja2 environment, the metric table's columns, and the
formatters that turn numbers into display strings.

Jinja2 with autoescape on for every template: model generations, prompts, tokens and test
messages are untrusted text. The only markup inserted unescaped is the SVG that
:mod:`layerwise.charts` draws, wrapped in :class:`markupsafe.Markup` by :func:`svg` here, nowhere
else. The pages need nothing from the network: CSS is inline, there are no scripts, fonts or images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

# (key, column title, decimals, direction): +1 higher is better, -1 lower is better, 0 neutral.
METRICS: tuple[tuple[str, str, int, int], ...] = (
    ("bleu", "BLEU", 2, +1),
    ("rougeL", "ROUGE-L", 3, +1),
    ("rougeLsum", "ROUGE-Lsum", 3, +1),
    ("bertscore_f1", "BERTScore F1", 3, +1),
    ("mean_len", "mean length (tokens)", 1, 0),
    ("empty", "empty generations", 0, -1),
    ("first_entropy", "first-token entropy (nats)", 2, 0),
)
ROW_SCORES: tuple[tuple[str, str, int], ...] = (("bleu", "BLEU", 2), ("rougeL", "ROUGE-L", 3),
                                                 ("bertscore_f1", "BERTScore F1", 3))

_ENV: Any = None


# --------------------------------------------------------------------------- jinja

def _load_template(name: str) -> str | None:
    from importlib import resources

    try:
        return resources.files("layerwise.templates").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        return None


def env():
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(
            loader=jinja2.FunctionLoader(_load_template),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
    return _ENV


def svg(svg: str | None):
    """Mark SVG produced by layerwise.charts as markup (never call this on user text)."""
    if svg is None:
        return None
    from markupsafe import Markup

    return Markup(svg)


# --------------------------------------------------------------------------- formatting

def num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def fmt(v: Any, digits: int) -> str:
    """A number as displayed in the tables: fixed decimals, ``—`` when absent."""
    f = num(v)
    if f is None:
        return "—"
    if math.isnan(f):
        return "n/a"
    if digits == 0:
        return f"{f:,.0f}"
    return f"{f:,.{digits}f}"


def fmt_delta(d: float, digits: int) -> str:
    s = f"{d:+,.{digits}f}" if digits else f"{d:+,.0f}"
    return "±0" if float(s.replace(",", "")) == 0 else s


def delta_cell(new: Any, old: Any, digits: int, direction: int) -> dict[str, Any]:
    """Display data for one value with its change against an older value."""
    cell: dict[str, Any] = {"value": fmt(new, digits), "old": fmt(old, digits), "delta": None, "cls": ""}
    a, b = num(new), num(old)
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return cell
    d = round(a - b, digits)
    cell["delta"] = fmt_delta(d, digits)
    if d == 0:
        cell["cls"] = "same"
    elif direction == 0:
        cell["cls"] = "neutral"
    else:
        cell["cls"] = "better" if d * direction > 0 else "worse"
    return cell


def bytes_text(n: Any) -> str:
    f = num(n)
    if f is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if f >= size:
            return f"{f / size:.1f} {unit} ({int(f):,} bytes)"
    return f"{int(f):,} bytes"


def seconds_text(v: Any) -> str:
    f = num(v)
    return "—" if f is None else (f"{f:.1f} s" if f < 120 else f"{f / 60:.1f} min")


def quant_text(q: Any) -> str:
    if not q:
        return "none"
    if isinstance(q, dict):
        method = q.get("method", "?")
        rest = ", ".join(f"{k}={v}" for k, v in sorted(q.items()) if k != "method")
        return f"{method} ({rest})" if rest else str(method)
    return str(q)


def decoding_text(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return "—"
    parts = []
    if d.get("do_sample"):
        parts.append("sampling")
        for k in ("temperature", "top_k", "top_p", "seed"):
            if d.get(k) is not None:
                parts.append(f"{k}={d[k]}")
    else:
        parts.append("greedy")
    if d.get("max_new_tokens") is not None:
        parts.append(f"max_new_tokens={d['max_new_tokens']}")
    return ", ".join(parts)


def lens_text(s: Any) -> str:
    if not isinstance(s, dict) or not s:
        return "—"
    parts = ["final norm applied" if s.get("final_norm", True) else "NO final norm (unembedding only)"]
    if s.get("teacher_forced_tokens") is not None:
        parts.append(f"teacher forcing over the first {s['teacher_forced_tokens']} reference tokens")
    if s.get("top_k") is not None:
        parts.append(f"top-{s['top_k']} kept")
    tuned = s.get("tuned")
    if isinstance(tuned, dict):
        trained = tuned.get("training") or {}
        how = f", {trained['steps']} training steps" if trained.get("steps") is not None else ""
        parts.append(f"and the tuned lens {tuned.get('path')} (weights sha256 {short(tuned.get('sha256'), 16)}{how})")
    return "; ".join(parts)


def short(h: Any, n: int = 12) -> str:
    return "—" if not h else (str(h)[:n] + "…" if len(str(h)) > n else str(h))


def layer_key(k: Any) -> int:
    try:
        return int(k)
    except (TypeError, ValueError):
        return 10**9


def output_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder", "pass a file name for the report, e.g. report.html")
    return p


def render(template: str, ctx: dict[str, Any]) -> str:
    return env().get_template(template).render(**ctx)
