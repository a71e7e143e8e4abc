"""One run id shared by a run's results JSON (``run.id``) and its HTML report
(``<meta name="layerwise-run-id">``), and the check that a results file and a report belong
together.

The writer stamps the id just before writing the set::

    stamp_run_id(results)                       # results["run"]["id"] = a new id
    html = render_report(results)               # the report copies results["run"]["id"]
    write_set([(results_path, dumps_json(results).encode()), (report_path, html.encode())])

``pair_mismatch(results_path, report_path)`` then says when the two files on disk are not from
the same run (an interrupted or concurrent write, a copy from elsewhere), and ``None`` when they
are.
"""

from __future__ import annotations

import datetime as _dt
import html
import re
import secrets
from pathlib import Path
from typing import Any

from .errors import ResultsError
from .io import read_json

#: ``<meta name=…>`` of the report that carries the run id.
META_NAME = "layerwise-run-id"
_META = re.compile(r"<meta\s+name=\"" + re.escape(META_NAME) + r"\"\s+content=\"([^\"]*)\"\s*/?>", re.IGNORECASE)
_GENERATOR = '<meta name="generator" content="pytest-layerwise">'
_HEAD_BYTES = 1 << 16


def new_run_id() -> str:
    """A fresh id: UTC time (readable, sortable) + 48 random bits, e.g. ``20250101T120000Z-3f9a1c0d2b7e``."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(6)}"


def stamp_run_id(results: dict[str, Any]) -> str:
    """Give ``results`` a new ``run.id`` (replacing any) and return it."""
    run = results.setdefault("run", {})
    run["id"] = new_run_id()
    return run["id"]


def run_id_of(results: Any) -> str | None:
    """``results["run"]["id"]`` when it is a string, else None (results written before run ids)."""
    run = results.get("run") if isinstance(results, dict) else None
    rid = run.get("id") if isinstance(run, dict) else None
    return rid if isinstance(rid, str) and rid else None


def report_run_id(report_path: str | Path) -> tuple[bool, str | None]:
    """(is a layerwise report, its run id or None) read from the head of an HTML report."""
    p = Path(report_path)
    if not p.is_file():
        raise ResultsError(f"report {p} does not exist", "pass the path that --report wrote")
    try:
        with p.open("rb") as fh:
            head = fh.read(_HEAD_BYTES).decode("utf-8", errors="replace")
    except OSError as exc:
        raise ResultsError(f"cannot read report {p}: {exc.strerror or exc}", "check the path and its permissions") from None
    m = _META.search(head)
    return _GENERATOR in head, (html.unescape(m.group(1)) or None) if m else None


def pair_mismatch(results_path: str | Path, report_path: str | Path) -> str | None:
    """None when the results JSON and the report at these paths come from the same run;
    otherwise one line saying why they do not (or cannot be shown to) belong together."""
    results = read_json(results_path, "results file", ResultsError, "pass the path that --results-json wrote",
                        "write it again with layerwise")
    rid = run_id_of(results)
    is_report, hid = report_run_id(report_path)
    rerun = "run layerwise again to write both files together"
    redo = f"render the report again from the results: layerwise report {results_path} -o {report_path}" if rid else rerun
    if not is_report:
        return f"{report_path} is not a layerwise report — {redo}"
    if rid is None and hid is None:
        return (f"neither {results_path} nor {report_path} carries a run id (written by an older layerwise), "
                f"so they cannot be matched — {redo}")
    if rid is None:
        return f"results {results_path} carry no run id but report {report_path} is from run {hid} — {redo}"
    if hid is None:
        return f"report {report_path} carries no run id but results {results_path} are from run {rid} — {redo}"
    if rid != hid:
        return (f"results {results_path} are from run {rid} but report {report_path} is from run {hid} "
                f"(an interrupted or concurrent run, or a file copied from elsewhere) — {redo}")
    return None
