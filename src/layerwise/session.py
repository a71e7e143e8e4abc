"""Run state of one pytest session: options, the model and results (computed once, on first
use), test outcomes, and what is written at the end (results JSON, report, baseline)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .options import parse_tolerances, read_options

DEFAULT_BASELINES = {"smollm2-135m": "smollm2-135m.json"}


def shipped_baseline(model: str) -> Path | None:
    name = DEFAULT_BASELINES.get(model)
    if name is None:
        return None
    from importlib.resources import files

    return Path(str(files("layerwise.fixtures").joinpath("baselines", name)))


class LayerwiseSession:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.opts = read_options(config)
        self.root = Path(config.invocation_params.dir)
        self._bundle: Any = None
        self._results: dict[str, Any] | None = None
        self._baseline: dict[str, Any] | None = None
        self.baseline_path: Path | None = None
        self.baseline_implicit = False
        self.outcomes: dict[str, dict[str, str]] = {}
        self.phases: dict[str, float] = {}
        self.written: list[str] = []
        self.tolerances = parse_tolerances(self.opts["tolerance"])
        self._check_cheap()

    # -- validation that needs no model ------------------------------------------------------
    def _check_cheap(self) -> None:
        o = self.opts
        if o["load-in-4bit"] and o["load-in-8bit"]:
            raise ConfigError("--load-in-4bit and --load-in-8bit both given", "choose one")
        if o["max-new-tokens"] < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {o['max-new-tokens']}", "pass a positive number")
        if o["limit"] is not None and o["limit"] < 1:
            raise ConfigError(f"--limit must be at least 1, got {o['limit']}", "pass a positive number of rows")
        if o["exit-layers"] is not None:
            layers = o["exit-layers"]
            if not layers:
                raise ConfigError("--exit-layers is empty", "pass layers like 8,16,24,32")
            bad = [x for x in layers if x < 1]
            if bad:
                raise ConfigError(f"exit layer {bad[0]} is not a block output (layers are 1..L; layer k = output of block k)",
                                  "pass layers between 1 and the model's number of blocks")
            dup = sorted({x for x in layers if layers.count(x) > 1})
            if dup:
                raise ConfigError(f"exit layer {dup[0]} is given twice", "list each exit layer once")
        if o["prompts"] is not None:
            from .data import load_examples

            load_examples(self._path(o["prompts"]), o["limit"])  # raises DataError with file:line
        for key in ("report", "results-json"):
            _check_writable(self._path(o[key]), f"--{key}")
        if o["baseline"] and not o["update-baseline"]:
            from .baseline import load_baseline

            self.baseline_path = self._path(o["baseline"])
            self._baseline = load_baseline(self.baseline_path)
        elif o["update-baseline"]:
            target = self._path(o["baseline"]) if o["baseline"] else shipped_baseline(o["model"])
            if target is None:
                raise ConfigError(f"--update-baseline needs --baseline PATH for model {o['model']!r}",
                                  "pass --baseline where the new baseline should be written")
            _check_writable(target, "--baseline")
            self.baseline_path = target
        else:
            shipped = shipped_baseline(o["model"])
            if shipped is not None and shipped.is_file():
                from .baseline import load_baseline

                self.baseline_path = shipped
                self._baseline = load_baseline(shipped)
                self.baseline_implicit = True

    def _path(self, p: str | Path) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.root / q

    # -- the run -----------------------------------------------------------------------------
    def run_config(self) -> Any:
        return build_run_config(self.opts, self._path)

    def say(self, msg: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"layerwise: {msg}")

    def bundle(self) -> Any:
        if self._bundle is None:
            from .models import load_model

            rc = self.run_config()
            t0 = time.perf_counter()
            self.say(f"loading {rc.model} …")
            self._bundle = load_model(rc.model, dtype=rc.dtype, device=rc.device, revision=rc.revision,
                                      trust_remote_code=rc.trust_remote_code, quantization=rc.quantization,
                                      device_map=rc.device_map)
            self.phases["load"] = time.perf_counter() - t0
            self.say(f"loaded {self._bundle.info.get('name')} ({self._bundle.num_layers} blocks) in {self.phases['load']:.1f} s")
        return self._bundle

    def results(self) -> dict[str, Any]:
        if self._results is None:
            from .runner import evaluate

            bundle = self.bundle()
            t0 = time.perf_counter()
            res = evaluate(self.run_config(), bundle=bundle, log=self.say)
            res["timing"]["load_s"] = round(self.phases.get("load", 0.0), 3)
            for k in ("lens_s", "generate_s", "metrics_s"):
                self.phases[k[:-2]] = res["timing"][k]
            self.phases["evaluate"] = time.perf_counter() - t0
            self._results = res
        return self._results

    @property
    def has_results(self) -> bool:
        return self._results is not None

    def baseline(self) -> dict[str, Any] | None:
        return self._baseline

    # -- outcomes and output -----------------------------------------------------------------
    def record(self, report: Any) -> None:
        """Keep each test's outcome: its call, or a failing/skipping setup, or a failing teardown."""
        if not (report.when == "call" or (report.when in ("setup", "teardown") and not report.passed)):
            return
        if report.when == "teardown" and report.nodeid in self.outcomes and report.passed:
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
        self.outcomes[report.nodeid] = {"nodeid": report.nodeid, "outcome": outcome, "message": msg}

    def finish(self, exitstatus: int) -> None:
        """Write results JSON, report and (if asked) baseline — only for a complete run."""
        if self._results is None or exitstatus == 2:  # never evaluated, or interrupted
            return
        from .io import atomic_write_json
        from .report import write_report

        res = self._results
        res["tests"] = sorted(self.outcomes.values(), key=lambda r: r["nodeid"])
        t0 = time.perf_counter()
        if self.opts["update-baseline"] and self.baseline_path is not None:
            from .baseline import write_baseline

            write_baseline(res, self.baseline_path)
            self.written.append(f"baseline {self.baseline_path}")
        results_path = self._path(self.opts["results-json"])
        report_path = self._path(self.opts["report"])
        res["timing"]["report_s"] = 0.0
        atomic_write_json(results_path, res)
        self.written.append(f"results {results_path}")
        base = None if self.opts["update-baseline"] else self._baseline
        write_report(res, report_path, baseline=base)
        self.phases["report"] = time.perf_counter() - t0
        self.written.append(f"report {report_path}")


def build_run_config(o: dict[str, Any], path: Any = Path) -> Any:
    """Option values (by option name, see options.OPTIONS) → :class:`layerwise.runner.RunConfig`."""
    from .decoding import Decoding
    from .models import Quantization
    from .runner import RunConfig

    quant = None
    if o["load-in-4bit"]:
        quant = Quantization("4bit", o["bnb-4bit-quant-type"], o["bnb-4bit-compute-dtype"], o["bnb-4bit-double-quant"])
    elif o["load-in-8bit"]:
        quant = Quantization("8bit")
    device_map: Any = o["device-map"]
    if device_map and device_map.strip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--device-map is not valid JSON ({exc.msg})", "pass 'auto' or a JSON object") from None
    bert = o["bertscore-model"]
    return RunConfig(
        model=o["model"], dtype=o["dtype"], device=o["device"], revision=o["revision"],
        trust_remote_code=o["trust-remote-code"], quantization=quant, device_map=device_map,
        exit_layers=o["exit-layers"], prompts=str(path(o["prompts"])) if o["prompts"] else None,
        limit=o["limit"], prompt_format=o["prompt-format"],
        decoding=Decoding(max_new_tokens=o["max-new-tokens"], do_sample=o["do-sample"],
                          temperature=o["temperature"], top_k=o["top-k"], top_p=o["top-p"], seed=o["seed"]),
        bertscore_model=None if str(bert).lower() == "none" else bert,
        teacher_forced_tokens=o["teacher-forced-tokens"], drift_against=o["drift-against"],
    )


def _check_writable(path: Path, what: str) -> None:
    folder = path.parent
    probe = folder
    while not probe.exists():
        probe = probe.parent
    import os

    if path.exists() and path.is_dir():
        raise ConfigError(f"{what} {path} is a folder", "pass a file path")
    if not probe.is_dir():
        raise ConfigError(f"{what} {path} cannot be written ({probe} is a file, not a folder)",
                          "choose a path in a folder you can write to")
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{what} {path} cannot be written (no write permission in {probe})",
                          "choose a path in a folder you can write to")

