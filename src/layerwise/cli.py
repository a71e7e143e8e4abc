"""The ``layerwise`` command: ``run``, ``report``, ``compare`` and ``check``.

Imports stay lazy: ``layerwise --help`` loads neither torch, matplotlib nor jinja2. Each
subcommand is one ``add_*`` function in :data:`SUBCOMMANDS` that builds its subparser and sets
``func`` (a callable taking the parsed namespace and returning an exit status).
A :class:`~layerwise.errors.LayerwiseError` prints ``layerwise: error: <message>`` on stderr and
exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

PROG = "layerwise"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pytest-layerwise")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _load_baseline(path: str) -> dict[str, Any]:
    """A baseline JSON: any object with an ``exits`` list (a results JSON qualifies)."""
    from .errors import BaselineError
    from .io import read_json

    p = path
    data = read_json(path, "baseline file", BaselineError, "pass the path of a baseline or results JSON",
                     "write it again with layerwise")
    if not isinstance(data, dict) or not isinstance(data.get("exits"), list):
        raise BaselineError(f"baseline file {p} has no \"exits\" list", "pass a baseline or results JSON written by layerwise")
    return data


# --------------------------------------------------------------------------- report

def _check_paths(inputs: dict[str, str | None], output: str) -> None:
    """Before any work: the output is writable without destroying anything, and no input."""
    from .io import check_distinct, check_output

    check_output(output, "-o/--output")
    check_distinct(inputs, {"-o/--output": output})


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .results import load_results

    _check_paths({"RESULTS": args.results, "--baseline": args.baseline}, args.output)
    results = load_results(args.results)
    baseline = _load_baseline(args.baseline) if args.baseline else None
    out = write_report(results, args.output, baseline=baseline)
    print(f"layerwise: wrote {out}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render the HTML report from a results JSON",
                       description="Render a self-contained HTML report from a results JSON (no model needed).")
    p.add_argument("results", metavar="RESULTS", help="results JSON written by --results-json or `layerwise run`")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="HTML file to write (atomically)")
    p.add_argument("--baseline", metavar="BASELINE_JSON",
                   help="baseline (or older results) JSON: show per-exit-layer deltas against it")
    p.set_defaults(func=_cmd_report)


# --------------------------------------------------------------------------- compare

def _cmd_compare(args: argparse.Namespace) -> int:
    from .report import write_compare
    from .results import load_results

    _check_paths({"OLD": args.old, "NEW": args.new}, args.output)
    old = load_results(args.old)
    new = load_results(args.new)
    out = write_compare(old, new, args.output, labels=tuple(args.labels))
    print(f"layerwise: wrote {out}")
    return 0


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare two results JSON files in one HTML page",
                       description="Render an HTML page comparing two runs (deltas are NEW − OLD).")
    p.add_argument("old", metavar="OLD", help="results JSON of the reference run")
    p.add_argument("new", metavar="NEW", help="results JSON of the candidate run")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="HTML file to write (atomically)")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), default=["old", "new"],
                   help="names for the two runs (default: old new)")
    p.set_defaults(func=_cmd_compare)


# --------------------------------------------------------------------------- check

def _cmd_check(args: argparse.Namespace) -> int:
    from .runid import pair_mismatch, report_run_id

    problem = pair_mismatch(args.results, args.report)
    if problem is not None:
        print(f"{PROG}: mismatch: {problem}", file=sys.stderr)
        return 1
    print(f"{PROG}: {args.results} and {args.report} are from the same run ({report_run_id(args.report)[1]})")
    return 0


def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check that a results JSON and an HTML report are from the same run",
                       description="Exit 0 when RESULTS and REPORT carry the same run id, 1 (with the reason) "
                                   "when they come from different runs or carry no id.")
    p.add_argument("results", metavar="RESULTS", help="results JSON")
    p.add_argument("report", metavar="REPORT", help="HTML report")
    p.set_defaults(func=_cmd_check)


# --------------------------------------------------------------------------- run

_RUN_SKIP = {"report", "results-json", "baseline", "update-baseline", "tolerance"}


def _cmd_run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .io import atomic_write_json
    from .options import OPTIONS, _convert
    from .report import write_report
    from .runner import evaluate
    from .session import _check_writable, build_run_config

    opts = {o.name: (_convert(o, getattr(args, o.dest)) if getattr(args, o.dest, None) is not None else o.default)
            for o in OPTIONS}
    out, report = Path(args.output), Path(args.report) if args.report else None
    _check_writable(out, "--output")
    if report is not None:
        _check_writable(report, "--report")
    t0 = time.perf_counter()
    results = evaluate(build_run_config(opts), log=lambda m: print(f"layerwise: {m}", file=sys.stderr, flush=True))
    atomic_write_json(out, results)
    print(f"layerwise: wrote {out}")
    if report is not None:
        write_report(results, report)
        print(f"layerwise: wrote {report}")
    from .terminal import table_lines

    for line in table_lines(results):
        print(line)
    print(f"layerwise: done in {time.perf_counter() - t0:.1f} s")
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    from .options import OPTIONS

    p = sub.add_parser("run", help="run the lens and early-exit evaluation on a model, write results (and report)",
                       description="Evaluate a model without pytest: per-layer lens statistics, early-exit "
                                   "generations for each exit layer and their scores, written as a results JSON.")
    p.add_argument("-o", "--output", default="reports/results.json", metavar="RESULTS",
                   help="results JSON to write (default: reports/results.json)")
    p.add_argument("--report", metavar="HTML", help="also render the HTML report here")
    for o in OPTIONS:
        if o.name in _RUN_SKIP or o.name.endswith(("-max", "-min", "-gain")) or o.name == "check-bertscore":
            continue
        kwargs: dict[str, Any] = {"dest": o.dest, "default": None,
                                  "help": o.help + ("" if o.default is None else f" (default: {o.default})")}
        if o.kind != "bool":
            kwargs["metavar"] = o.name.split("-")[-1].upper()
        if o.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        p.add_argument(f"--{o.name}", **kwargs)
    p.set_defaults(func=_cmd_run)


# --------------------------------------------------------------------------- parser

#: One function per subcommand; a new subcommand appends its ``add_*`` here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_run, add_report, add_compare, add_check]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-layer (logit lens) and early-exit reports for causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script does ``sys.exit(main())``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    from .errors import LayerwiseError

    try:
        return int(func(args) or 0)
    except LayerwiseError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m layerwise.cli
    sys.exit(main())
