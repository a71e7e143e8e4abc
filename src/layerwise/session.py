"""Run state of one pytest session, and its public API for the plugin, the shipped suite and
users' tests: the settings, the model and results (computed once, on first use), the gate's
verdict, test outcomes, and what is written at the end (results JSON, report, baseline, digest).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Settings, from_options
from .errors import LayerwiseError
from .options import read_pytest_options


class LayerwiseSession:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.opts, self.given = read_pytest_options(config)
        self.root = Path(config.invocation_params.dir)
        self.settings: Settings = from_options(self.opts, self.root, Path(config.rootpath))
        #: The suite joins the run when the model (or a results file) is named — see plugin.suite_files.
        self.enabled = bool({"model", "results"} & self.given)
        self._checked: Any = None
        self._bundle: Any = None
        self._tuned: Any = None
        self._results: dict[str, Any] | None = None
        self._verdict: Any = None
        self.outcomes: dict[str, dict[str, str]] = {}
        self.phases: dict[str, float] = {}
        self.written: list[str] = []
        if self.given:  # a project that names no layerwise option is left alone until a fixture is used
            self.check()

    # -- before the model ---------------------------------------------------------------------
    def check(self) -> Any:
        """Everything that needs no model (data, outputs, baseline); once."""
        if self._checked is None:
            from .preflight import preflight

            self._checked = preflight(self.settings)
        return self._checked

    @property
    def tolerances(self) -> dict[str, tuple[float, float]]:
        return self.settings.gate.tolerances

    @property
    def baseline_path(self) -> Path | None:
        return self.settings.gate.baseline

    def baseline(self) -> dict[str, Any] | None:
        """The baseline being compared with (None when there is none or it is being updated)."""
        return self.check().baseline

    # -- the run ------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None and self.config.option.verbose >= 0:
            with self._uncaptured():  # the terminal's file is fd 1, which pytest captures during a test
                tr.write_line(f"layerwise: {msg}")

    @property
    def gating_a_file(self) -> bool:
        return self.settings.results_file is not None

    def progress(self) -> Any:
        """Phase progress for this session: a tqdm bar per phase on a terminal, one line per phase
        in a CI log, nothing under ``-q``."""
        import sys

        from .progress import Progress

        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None or self.config.option.verbose < 0:
            return Progress("off")
        stream = sys.__stderr__
        if stream is not None and stream.isatty():
            return Progress("bar", stream=stream, write=lambda line: tr.write_line(line))
        return Progress("lines", write=lambda line: tr.write_line(line))

    def _uncaptured(self) -> Any:
        """Let progress bars reach the terminal while a fixture computes (pytest captures output)."""
        import contextlib

        capman = self.config.pluginmanager.get_plugin("capturemanager")
        return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()

    def bundle(self) -> Any:
        if self.gating_a_file:
            raise LayerwiseError(f"this run gates the results file {self._display(self.settings.results_file)} and "
                                 "loads no model", "run the tests that need the model without --results")
        if self._bundle is None:
            self.check()
            from .models import load_model

            rc = self.settings.run
            t0 = time.perf_counter()
            with self._uncaptured(), self.progress().phase("load") as ph:
                self._bundle = load_model(rc.model, **rc.load_config().kwargs())
                ph.note(f"{self._bundle.info.get('name')}{' + adapter ' + rc.adapter if rc.adapter else ''}, "
                        f"{self._bundle.num_layers} blocks")
            self.phases["load"] = time.perf_counter() - t0
        return self._bundle

    def tuned_lens(self) -> Any:
        """The run's tuned lens (``--lens logit,tuned:PATH``), loaded once and checked against the
        model; None when the run has none."""
        path = self.settings.run.tuned_lens
        if path is None or self.gating_a_file:
            return None
        if self._tuned is None:
            from .tuned import TunedLens

            self._tuned = TunedLens.load(path, self.bundle())
        return self._tuned

    def results(self) -> dict[str, Any]:
        if self._results is None and self.gating_a_file:
            self._results = self.check().results
        if self._results is None and self.settings.cache_results:
            from . import results_cache

            key = results_cache.cache_key(self.settings.run, self.check().examples.sha256)
            cached = results_cache.load(key)
            if cached is not None:
                self.say(f"results from the cache ({results_cache.entry_path(key)}): the model is not loaded")
                self._results = cached
                self.phases["cached"] = 0.0
        if self._results is None:
            from .runner import evaluate

            bundle = self.bundle()
            t0 = time.perf_counter()
            with self._uncaptured():
                res = evaluate(self.settings.run, bundle=bundle, examples=self.check().examples, progress=self.progress(),
                               tuned_lens=self.tuned_lens())
            from .results import validate_results

            validate_results(res, "the results of this run")  # the runner keeps the contract it declares
            if self.settings.cache_results:
                from . import results_cache

                results_cache.store(results_cache.cache_key(self.settings.run, self.check().examples.sha256), res)
            res["timing"]["load_s"] = round(self.phases.get("load", 0.0), 3)
            for k in ("lens_s", "generate_s", "metrics_s"):
                self.phases[k[:-2]] = res["timing"][k]
            self.phases["evaluate"] = time.perf_counter() - t0
            self._results = res
        return self._results

    @property
    def has_results(self) -> bool:
        return self._results is not None

    # -- the gate -----------------------------------------------------------------------------
    def _display(self, p: Path | None) -> str | None:
        if p is None:
            return None
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)

    def verdict(self) -> Any:
        """The gate's verdict for this session's results (computed once)."""
        if self._verdict is None:
            from .baseline import judge

            g = self.settings.gate
            name = self._display(g.baseline)
            if g.source == "shipped":
                name = f"the shipped baseline for {self.settings.run.model}"
            self._verdict = judge(self.baseline(), self.results(), name=name, tolerances=g.tolerances,
                                  updating=g.update, missing=self.check().missing)
        return self._verdict

    def check_gate(self) -> None:
        """The shipped gate test: fail on a failed gate; not gated → skip, or fail when a baseline
        is required (or one named explicitly was refused)."""
        import pytest

        v = self.verdict()
        if v.status == "failed":
            pytest.fail(v.message(self._display(self.settings.output.results or self.settings.results_file)), pytrace=False)
        if v.status == "not_gated":
            if self.settings.gate.require or (v.refused and self.settings.gate.source == "option"):
                hint = "" if not self.settings.gate.require else " (--require-baseline)"
                pytest.fail(v.line() + hint, pytrace=False)
            raise pytest.skip.Exception(v.line(), _use_item_location=True)  # reported at the test, not here

    # -- xdist -------------------------------------------------------------------------------
    def worker_payload(self) -> dict[str, str]:
        """What an xdist worker hands to the controller."""
        if self._results is None:
            return {}
        return {"layerwise_results": json.dumps(self._results), "layerwise_phases": json.dumps(self.phases)}

    def take_worker_payload(self, payload: dict[str, Any]) -> None:
        """The controller takes one worker's results (every worker computes the same)."""
        if self._results is None and payload.get("layerwise_results"):
            self._results = json.loads(payload["layerwise_results"])
            self.phases.update(json.loads(payload.get("layerwise_phases", "{}")))

    # -- outcomes and output -----------------------------------------------------------------
    def record(self, report: Any) -> None:
        """Keep each test's outcome: its call, or a failing/skipping setup, or a failing teardown."""
        if not (report.when == "call" or (report.when in ("setup", "teardown") and not report.passed)):
            return
        nodeid = report.nodeid
        if report.when == "teardown" and nodeid in self.outcomes and report.passed:
            return
        msg = ""
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
            msg = str(report.wasxfail)
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            text = str(report.longrepr).strip()
            msg = crash.message if crash is not None else (text.splitlines()[-1] if text else "")
            if report.when == "teardown":
                outcome, msg = "error", f"error in teardown: {msg}"
            elif report.when == "setup":
                outcome = "error"
        elif report.skipped and isinstance(report.longrepr, tuple):
            msg = str(report.longrepr[2])
        self.outcomes[nodeid] = {"nodeid": nodeid, "outcome": outcome, "message": msg}

    def finish(self, exitstatus: int) -> None:
        """Write results JSON, report, baseline (if asked) and the obtained file of a failed gate as
        one set (one run id, renamed together), then the Markdown digest — only for a complete run."""
        if self._results is None or exitstatus == 2:  # never evaluated, or interrupted
            return
        from .baseline import dumps_baseline, make_baseline
        from .io import atomic_write_text, dumps_json, write_set
        from .report import render_report
        from .runid import stamp_run_id
        from .terminal import markdown

        out, gate = self.settings.output, self.settings.gate
        res = self._results
        res["tests"] = sorted(self.outcomes.values(), key=lambda r: r["nodeid"])
        verdict = self.verdict()
        res["gate"] = verdict.to_json()
        t0 = time.perf_counter()
        stamp_run_id(res)
        files: list[tuple[Path, bytes]] = []
        what: list[str] = []
        if gate.update and gate.baseline is not None:
            files.append((gate.baseline, dumps_baseline(make_baseline(res)).encode()))
            what.append("--baseline")
        if verdict.status == "failed" and gate.baseline is not None:
            folder = (out.results or out.report or Path("reports/x")).parent
            obtained = folder / f"{gate.baseline.stem}.obtained.json"
            res["gate"]["obtained"] = self._display(obtained)
            files.append((obtained, dumps_baseline(make_baseline(res)).encode()))
            what.append("the obtained baseline")
        res.setdefault("timing", {})["report_s"] = 0.0
        if out.results is not None:
            files.append((out.results, dumps_json(res).encode()))
            what.append("--results-json")
        if out.report is not None:
            html = render_report(res, baseline=None if gate.update else self.baseline(), baseline_name=verdict.baseline)
            files.append((out.report, html.encode("utf-8")))
            what.append("--report")
        write_set(files, what=what)
        labels = {"--baseline": "baseline", "the obtained baseline": "obtained", "--results-json": "results", "--report": "report"}
        for (path, _), w in zip(files, what):
            note = f" (accept the change: copy it over {self._display(gate.baseline)})" if w == "the obtained baseline" else ""
            self.written.append(f"{labels[w]} {self._display(path)}{note}")
        self.phases["report"] = time.perf_counter() - t0
        if out.summary_md is not None:
            text = markdown(res, self.baseline(), report=self._display(out.report))
            if out.summary_append:
                try:
                    with open(out.summary_md, "a", encoding="utf-8") as fh:
                        fh.write(text)
                except OSError as exc:
                    raise LayerwiseError(f"cannot append to the step summary {out.summary_md}: {exc.strerror or exc}",
                                         "check GITHUB_STEP_SUMMARY, or pass --summary-md PATH") from None
            else:
                atomic_write_text(out.summary_md, text, "--summary-md")
            self.written.append(f"summary {self._display(out.summary_md)}")


__all__ = ["LayerwiseSession", "LayerwiseError"]
