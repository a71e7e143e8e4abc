"""pytest-layerwise's pytest plugin: thin hooks and fixtures over :mod:`layerwise.session`.

Nothing heavy is imported here: torch and transformers load on first use of a fixture.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .errors import LayerwiseError
from .options import add_options

_KEY = pytest.StashKey["Any"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


class _Recorder:
    """Per-session hook object: records every test's outcome for the results and the report."""

    def __init__(self, sess: Any) -> None:
        self.sess = sess

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.sess.record(report)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "layerwise: a test that uses the layerwise model fixtures")
    if config.option.help or config.option.version:
        return  # show the help even when an option value is wrong
    from .session import LayerwiseSession

    try:
        sess = LayerwiseSession(config)
    except LayerwiseError as exc:
        raise pytest.UsageError(f"layerwise: {exc}") from None
    config.stash[_KEY] = sess
    config.pluginmanager.register(_Recorder(sess), f"layerwise-recorder-{id(config)}")


def _session(config: pytest.Config) -> Any:
    return config.stash.get(_KEY, None)


def _guard(fn: Any) -> Any:
    try:
        return fn()
    except LayerwiseError as exc:
        pytest.exit(f"layerwise: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def layerwise(pytestconfig: pytest.Config) -> Any:
    """The run state: options, model, results, baseline."""
    return _session(pytestconfig)


@pytest.fixture(scope="session")
def layerwise_model(layerwise: Any) -> Any:
    """The loaded :class:`layerwise.models.ModelBundle` (model, tokenizer, adapter, info)."""
    return _guard(layerwise.bundle)


@pytest.fixture(scope="session")
def layerwise_results(layerwise: Any) -> dict[str, Any]:
    """The whole results dict (docs/results-schema.md), computed once per session."""
    return _guard(layerwise.results)


@pytest.fixture(scope="session")
def layer_lens(layerwise_results: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lens statistics: ``["first_token"|"teacher_forced"][stat]["mean"][layer]``."""
    return layerwise_results["lens"]


@pytest.fixture(scope="session")
def early_exit_generations(layerwise_results: dict[str, Any]) -> dict[int, list[str]]:
    """``{exit layer: [generated text per row]}``."""
    return {e: [r["generations"][str(e)] for r in layerwise_results["rows"]] for e in layerwise_results["run"]["exit_layers"]}


@pytest.fixture(scope="session")
def exit_metrics(layerwise_results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{exit layer: {"bleu", "rougeL", "bertscore_f1", "mean_len", "empty", ...}}``."""
    return {e["layer"]: e for e in layerwise_results["exits"]}


@pytest.fixture(scope="session")
def layerwise_baseline(layerwise: Any) -> dict[str, Any] | None:
    """The baseline being compared with (None when there is none or it is being updated)."""
    return layerwise.baseline()


@pytest.fixture(scope="session")
def layerwise_settings(layerwise: Any) -> dict[str, Any]:
    """All option values (CLI over ini over default), keyed by option name."""
    return dict(layerwise.opts)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: take the results a worker computed (every worker computes the same)."""
    sess = _session(node.config)
    payload = getattr(node, "workeroutput", {}).get("layerwise_results")
    if sess is not None and payload and not sess.has_results:
        sess._results = json.loads(payload)
        sess.phases.update(json.loads(node.workeroutput.get("layerwise_phases", "{}")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    sess = _session(session.config)
    if sess is None:
        return
    if hasattr(session.config, "workerinput"):  # xdist worker: hand results to the controller
        if sess.has_results:
            session.config.workeroutput["layerwise_results"] = json.dumps(sess._results)
            session.config.workeroutput["layerwise_phases"] = json.dumps(sess.phases)
        return
    try:
        sess.finish(int(exitstatus))
    except LayerwiseError as exc:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"layerwise: {exc}", red=True)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    sess = _session(config)
    if sess is None or not sess.has_results:
        return
    from .terminal import summary

    summary(terminalreporter, sess)
