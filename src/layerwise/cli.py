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
from pathlib import Path
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
    out = write_report(results, args.output, baseline=baseline, baseline_name=args.baseline)
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
    from .compare import write_compare
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

#: The option scopes ``layerwise run`` takes: what to load, what to compute, where to write.
RUN_SCOPES = ("model", "run", "output")


def _cmd_run(args: argparse.Namespace) -> int:
    from . import distributed
    from .config import from_options
    from .options import read_namespace
    from .preflight import preflight

    settings = from_options(read_namespace(args), Path.cwd(), environ={})
    out = settings.output
    checked = preflight(settings, outputs={"--results-json": out.results, "--report": out.report})
    shard = distributed.from_env()  # under torchrun: rows shared between the ranks, written once by rank 0
    if shard is not None:
        settings.run.device = shard.device(settings.run.device)
        try:
            return _run(settings, checked, shard)
        finally:
            shard.close()
    return _run(settings, checked, None)


def _run(settings: Any, checked: Any, shard: Any) -> int:
    import time

    from . import results_cache
    from .io import dumps_json, write_set
    from .progress import Progress
    from .report import render_report
    from .runid import stamp_run_id
    from .runner import evaluate
    from .terminal import table_lines

    out = settings.output
    key = results_cache.cache_key(settings.run, checked.examples.sha256) if settings.cache_results and shard is None else None
    results = results_cache.load(key) if key else None
    t0 = time.perf_counter()
    if results is not None:
        print(f"layerwise: results from the cache ({results_cache.entry_path(key)})", file=sys.stderr)
    else:
        quiet = shard is not None and shard.rank != 0
        results = evaluate(settings.run, examples=checked.examples, shard=shard,
                           progress=Progress("off" if quiet else "auto", stream=sys.stderr))
        if results is None:
            return 0  # another rank: rank 0 writes the results
        if key:
            results_cache.store(key, results)
    stamp_run_id(results)
    files = [(out.results, dumps_json(results).encode())]
    if out.report is not None:
        files.append((out.report, render_report(results).encode("utf-8")))
    write_set(files, what=["--results-json", "--report"][: len(files)])
    for path, _ in files:
        print(f"layerwise: wrote {path}")
    for line in table_lines(results):
        print(line)
    print(f"layerwise: done in {time.perf_counter() - t0:.1f} s")
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    from .options import declare

    p = sub.add_parser("run", help="run the lens and early-exit evaluation on a model, write results and report",
                       description="Evaluate a model without pytest: per-layer lens statistics, early-exit "
                                   "generations for each exit layer and their scores, written as a results JSON "
                                   "and an HTML report (the same options as the pytest plugin).")
    p.add_argument("-o", "--output", dest="layerwise_results_json", metavar="RESULTS",
                   help="results JSON to write (same as --results-json; default: reports/results.json)")
    declare(p.add_argument, RUN_SCOPES, skip=("summary-md",))  # the digest reports a gate: pytest's
    p.set_defaults(func=_cmd_run)


# --------------------------------------------------------------------------- calibrate

def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .baseline import dumps_baseline
    from .calibrate import calibrate
    from .config import from_options
    from .io import atomic_write_text
    from .options import read_namespace
    from .preflight import check_not_in_package, preflight

    if args.runs < 2:
        from .errors import ConfigError

        raise ConfigError(f"--runs must be at least 2, got {args.runs}", "pass --runs 3 (or more)")
    settings = from_options(read_namespace(args), Path.cwd(), environ={})
    out = Path(args.output).expanduser()
    check_not_in_package(out, "-o/--output")
    checked = preflight(settings, outputs={"-o/--output": out})
    base = calibrate(settings.run, args.runs, examples=checked.examples,
                     log=lambda m: print(f"layerwise: {m}", file=sys.stderr, flush=True))
    atomic_write_text(out, dumps_baseline(base), "-o/--output")
    widest = sorted(((max((v for v in vals if v is not None), default=0.0), name) for name, vals in base["spread"].items()),
                    reverse=True)[:3]
    print(f"layerwise: wrote calibrated baseline {out} ({args.runs} runs; largest spreads: "
          + ", ".join(f"{n} {v:.3g}" for v, n in widest) + ")")
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    from .options import declare

    p = sub.add_parser("calibrate", help="write a baseline whose tolerances include the run-to-run spread",
                       description="Run the evaluation N times on one loaded model, varying what should not matter "
                                   "(batch size, row order; the seed when sampling), and write a baseline that records "
                                   "each tracked number's observed spread: the gate then allows max(tolerance, 3 × spread).")
    p.add_argument("-o", "--output", required=True, metavar="BASELINE", help="baseline JSON to write (atomically)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="evaluations to run (default 3)")
    declare(p.add_argument, ("model", "run"))
    p.set_defaults(func=_cmd_calibrate)


# --------------------------------------------------------------------------- train-lens

def add_train_lens(sub: argparse._SubParsersAction) -> None:
    from .config import PROMPT_FORMATS
    from .options import declare

    p = sub.add_parser(
        "train-lens", help="train a tuned lens (one affine translator per layer) for a model",
        description="Train a tuned lens (Belrose et al. 2023): per layer an affine translator, initialised to the "
                    "identity, trained so that translated hidden states through the final norm and head match the "
                    "model's final distribution (KL). Text: each row's prompt | reference and the model's own "
                    "greedy continuation of the prompt. Writes config.json + params.safetensors into OUTPUT.")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="new or empty folder for the lens")
    p.add_argument("--prompts", help="prompts file, JSONL or CSV (default: the shipped 62-row Alpaca-cleaned sample)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the first N rows (--skip 20 keeps the rows of a default run out of training)")
    p.add_argument("--limit", type=int, metavar="N", help="use N rows after the skipped ones (default: all)")
    p.add_argument("--prompt-format", default="alpaca", choices=PROMPT_FORMATS,
                   help="how a row becomes a prompt (default: alpaca)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="greedy tokens the model generates per row as extra text; 0: none (default: 64)")
    p.add_argument("--steps", type=int, default=250, metavar="N", help="optimizer steps (default: 250)")
    p.add_argument("--positions-per-step", type=int, default=32, metavar="N",
                   help="token positions per step, each through every layer (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the position sampling (default: 0)")
    p.add_argument("--lr", type=float, default=1.0,
                   help="learning-rate scale as in tuned-lens: SGD lr = LR × (1 − momentum), Adam lr = LR × 1e-3 "
                        "(default: 1.0)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                   help="SGD with Nesterov momentum (the tuned-lens default) or AMSGrad Adam (default: sgd)")
    p.add_argument("--force", action="store_true",
                   help="replace a tuned lens of the same model in OUTPUT (nothing else is ever overwritten)")
    declare(p.add_argument, ("model",))  # --model, --dtype, --device, --revision, quantization, … as for a run

    def run(args: argparse.Namespace) -> int:
        from .config import from_options
        from .options import read_namespace
        from .tuned_train import train_lens_command

        load = from_options(read_namespace(args), Path.cwd(), environ={}).run.load_config()
        out = train_lens_command(
            load=load, output=args.output, prompts=args.prompts, limit=args.limit, skip=args.skip,
            prompt_format=args.prompt_format, max_new_tokens=args.max_new_tokens, steps=args.steps, seed=args.seed,
            lr=args.lr, optimizer=args.optimizer, positions_per_step=args.positions_per_step, force=args.force,
            log=lambda m: print(f"layerwise: {m}", file=sys.stderr, flush=True))
        print(f"layerwise: wrote {out}")
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- parser

#: One function per subcommand; a new subcommand appends its ``add_*`` here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_run, add_report, add_compare, add_check,
                                                                   add_calibrate, add_train_lens]


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
