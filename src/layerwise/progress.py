"""Progress of a run's phases (load, lens batches, decode steps, scoring), for a person watching.

On a terminal each phase is a tqdm bar; in a CI log (no terminal) each phase is one line with
its time when it ends, so logs stay short; quiet mode prints nothing. The engine calls
``progress.phase(name, total)`` and ``bar.update()``; it never prints by itself.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

MODES = ("auto", "bar", "lines", "off")


class Phase:
    """One running phase: ``update(n)`` advances it; ``note(text)`` adds a detail to its end line."""

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar
        self.done = 0
        self.detail = ""
        self.seconds: float | None = None  # set when phases interleave: the time spent in this one

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        self.detail = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)


class Progress:
    """``mode``: ``bar`` (tqdm), ``lines`` (one line per phase), ``off``, or ``auto`` (a bar when
    ``stream`` is a terminal, else lines). ``write`` prints a line (default: to ``stream``)."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None, write: Callable[[str], None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode = mode
        self._write = write or (lambda line: print(line, file=self.stream, flush=True))
        self.times: dict[str, float] = {}

    def say(self, line: str) -> None:
        """A line that is not a phase (e.g. what was loaded); silent when off."""
        if self.mode != "off":
            self._write(f"layerwise: {line}")

    @contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "it") -> Iterator[Phase]:
        bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"layerwise: {name}", unit=unit, file=self.stream, leave=False,
                       dynamic_ncols=True)
        ph = Phase(bar)
        t0 = time.perf_counter()
        try:
            yield ph
        finally:
            took = time.perf_counter() - t0 if ph.seconds is None else ph.seconds
            self.times[name] = self.times.get(name, 0.0) + took
            if bar is not None:
                bar.close()
            if self.mode != "off":
                extra = f" ({ph.detail})" if ph.detail else ""
                self._write(f"layerwise: {name} {took:.1f} s{extra}")


#: A progress that prints nothing (the engine's default).
SILENT = Progress("off")
