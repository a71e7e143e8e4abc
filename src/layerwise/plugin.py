"""pytest-layerwise's pytest plugin: thin hooks and fixtures over :mod:`layerwise.session`.

Nothing heavy is imported here: torch and transformers load on first use of a fixture.
The shipped suite (``layerwise.layer_tests``) joins a run when the model is named — ``--model``
or ``layerwise_model`` in the ini file — unless ``--no-layer-suite`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from .errors import LayerwiseError, ProbeError
from .options import add_pytest_options

if TYPE_CHECKING:  # pragma: no cover
    from .results import Results

_KEY = pytest.StashKey["Any"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_pytest_options(parser)


class _Recorder:
    """Per-session hook object: records every test's outcome for the results and the report."""

    def __init__(self, sess: Any) -> None:
        self.sess = sess

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.sess.record(report)


def suite_folder() -> Path:
    """The shipped suite as installed (in this repository: ``layer_tests/``)."""
    from importlib.resources import files

    return Path(str(files("layerwise.layer_tests")))


def suite_files() -> list[Path]:
    return sorted(suite_folder().glob("test_*.py"))


def _covers(arg: str, folder: Path, base: Path) -> bool:
    """Whether a collection argument already takes in (or lies within) the suite folder."""
    raw = arg.split("::", 1)[0]
    p = Path(raw)
    if not p.is_absolute():
        p = base / p
    if not p.exists():
        import importlib.util

        try:
            spec = importlib.util.find_spec(raw)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            return False
        p = Path(spec.origin)
        if p.name == "__init__.py":
            p = p.parent
    p, folder = p.resolve(), folder.resolve()
    return p == folder or folder in p.parents or p in folder.parents


def _add_suite(config: pytest.Config) -> None:
    folder = suite_folder()
    base = Path(config.invocation_params.dir)
    if any(_covers(str(a), folder, base) for a in config.args):
        return
    # Explicit files: collected whatever the project's python_files pattern says.
    config.args = [*config.args, *(str(f) for f in suite_files())]


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
    if sess.enabled and sess.settings.layer_suite:
        _add_suite(config)


#: Fixtures that need the model or its results: tests using them share one xdist worker.
MODEL_FIXTURES = frozenset({"layerwise", "layerwise_model", "layerwise_results", "layer_lens", "early_exit_generations",
                            "exit_metrics", "layerwise_baseline", "logit_lens", "tuned_lens", "tuned_layer_lens",
                            "tuned_exit_generations", "tuned_exit_metrics"})
XDIST_GROUP = "layerwise"


def _group_folder(config: pytest.Config) -> str:
    """The folder (one per controller) where workers list their tests that use the model."""
    folder = config.stash.get(_GROUP_KEY, None)
    if folder is None:
        import tempfile

        folder = tempfile.mkdtemp(prefix="layerwise-xdist-")
        config.stash[_GROUP_KEY] = folder
    return folder


_GROUP_KEY = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: where this worker lists its tests that use the model."""
    if node.config.getvalue("dist") == "load":
        node.workerinput["layerwise_group_folder"] = _group_folder(node.config)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``pytest -n N`` (xdist's ``load``): the tests that use the model share one worker, so the model
    loads and the evaluation runs once per session (see :mod:`layerwise.xdist_group`)."""
    if config.getvalue("dist") != "load" or _GROUP_KEY not in config.stash:
        return None
    from .xdist_group import ModelGroupScheduling

    return ModelGroupScheduling(config, log, config.stash[_GROUP_KEY])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    folder = (getattr(config, "workerinput", None) or {}).get("layerwise_group_folder")
    if folder is None:
        return
    from .xdist_group import write_worker_ids

    grouped = [item.nodeid for item in items if MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))]
    write_worker_ids(folder, config.workerinput["workerid"], grouped)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_GROUP_KEY, None)
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: Any) -> Any:
    """The shipped suite collected from site-packages (outside the rootdir) gets readable node ids,
    ``layerwise/layer_tests/test_lens.py::…``, instead of pytest's empty path for such files."""
    if module_path.name == "__init__.py" or module_path.parent != suite_folder():
        return None
    try:
        module_path.relative_to(parent.config.rootpath)
        return None  # inside the project (this repository): pytest's own node id is right
    except ValueError:
        pass
    return pytest.Module.from_parent(parent, path=module_path, nodeid=f"layerwise/layer_tests/{module_path.name}")


def _session(config: pytest.Config) -> Any:
    return config.stash.get(_KEY, None)


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LayerwiseError as exc:
        pytest.exit(f"layerwise: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def layerwise(pytestconfig: pytest.Config) -> Any:
    """The run state (:class:`layerwise.session.LayerwiseSession`): settings, model, results, gate."""
    return _session(pytestconfig)


@pytest.fixture(scope="session")
def layerwise_model(layerwise: Any) -> Any:
    """The loaded :class:`layerwise.models.ModelBundle` (model, tokenizer, adapter, info)."""
    if layerwise.gating_a_file:
        pytest.skip(f"needs the model; this run gates the results file {layerwise.settings.results_file} (--results)")
    return _guard(layerwise.bundle)


@pytest.fixture(scope="session")
def layerwise_results(layerwise: Any) -> "Results":
    """The whole results dict (typed by :class:`layerwise.results.Results`; docs/results-schema.md),
    computed once per session."""
    return _guard(layerwise.results)


@pytest.fixture(scope="session")
def layer_lens(layerwise_results: dict[str, Any]) -> dict[str, Any]:
    """Per-layer logit-lens statistics: ``["first_token"|"teacher_forced"][stat]["mean"][layer]``;
    with ``--lens logit,tuned:PATH`` also ``["tuned"]``, the same through the tuned lens."""
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
def logit_lens(layerwise_model: Any) -> Any:
    """The logit lens on a prompt of your own (:class:`layerwise.probe.Probe`):
    ``lens = logit_lens("The capital of France is")``, then ``lens.top(layer)``,
    ``lens.prob(layer, " Paris")``, ``lens.rank(…)``, ``lens.entropy(layer)``,
    ``lens.first_layer(" Paris", rank=1)``. Needs only the model; cached per prompt."""
    from .probe import Probe

    return Probe(layerwise_model)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A test that passed ``logit_lens`` a bad token, layer or prompt fails with that one line."""
    outcome = yield
    if call.excinfo is not None and call.excinfo.errisinstance(ProbeError):
        outcome.get_result().longrepr = f"layerwise: {call.excinfo.value}"


@pytest.fixture(scope="session")
def tuned_lens(layerwise: Any) -> Any:
    """The run's :class:`layerwise.tuned.TunedLens` (``--lens logit,tuned:PATH``), loaded once and
    checked against the model; the test is skipped when the run has no tuned lens."""
    if layerwise.settings.run.tuned_lens is None or layerwise.gating_a_file:
        pytest.skip("no tuned lens in this run (pass --lens logit,tuned:PATH)")
    return _guard(layerwise.tuned_lens)


@pytest.fixture(scope="session")
def tuned_layer_lens(layer_lens: dict[str, Any]) -> dict[str, Any]:
    """The lens statistics through the tuned lens, same positions and shape as ``layer_lens``:
    ``["first_token"|"teacher_forced"][stat]["mean"][layer]``; skipped without a tuned lens."""
    if "tuned" not in layer_lens:
        pytest.skip("no tuned lens in this run (pass --lens logit,tuned:PATH)")
    return layer_lens["tuned"]


@pytest.fixture(scope="session")
def tuned_exit_generations(layerwise_results: dict[str, Any]) -> dict[int, list[str]]:
    """``{exit layer: [text per row]}`` of the exits decoded through the tuned lens (every exit below
    L; at L the tuned exit is the plain one); skipped without ``--tuned-exits``."""
    if not layerwise_results.get("tuned_exits"):
        pytest.skip("no tuned exits in this run (pass --lens logit,tuned:PATH --tuned-exits)")
    return {e["layer"]: [r["tuned"]["generations"][str(e["layer"])] for r in layerwise_results["rows"]]
            for e in layerwise_results["tuned_exits"]}


@pytest.fixture(scope="session")
def tuned_exit_metrics(layerwise_results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{exit layer: {"bleu", "rougeL", "bertscore_f1", …}}`` of the tuned exits, as ``exit_metrics``;
    skipped without ``--tuned-exits``."""
    if not layerwise_results.get("tuned_exits"):
        pytest.skip("no tuned exits in this run (pass --lens logit,tuned:PATH --tuned-exits)")
    return {e["layer"]: e for e in layerwise_results["tuned_exits"]}


@pytest.fixture(scope="session")
def layerwise_baseline(layerwise: Any) -> dict[str, Any] | None:
    """The baseline being compared with (None when there is none or it is being updated)."""
    return _guard(layerwise.baseline)


@pytest.fixture(scope="session")
def layerwise_settings(layerwise: Any) -> dict[str, Any]:
    """All option values (CLI over ini over default), keyed by option name; paths as strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in layerwise.opts.items()}


@pytest.fixture
def layerwise_check(record_property: Callable[[str, object], None]) -> Callable[[Any], None]:
    """Assert a :class:`layerwise.checks.Check`, attaching its numbers to the test's JUnit record."""

    def run(result: Any) -> None:
        for key, value in result.values.items():
            record_property(key, value)
        assert result.ok, result.message

    return run


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: take the results a worker computed (every worker computes the same)."""
    sess = _session(node.config)
    if sess is not None:
        sess.take_worker_payload(getattr(node, "workeroutput", {}) or {})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    sess = _session(session.config)
    if sess is None:
        return
    if hasattr(session.config, "workerinput"):  # xdist worker: hand results to the controller
        session.config.workeroutput.update(sess.worker_payload())
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
