"""Atomic file output: a report, results file or baseline is either complete or absent."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError, LayerwiseError


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never a mix.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {target}: {exc.strerror or exc}",
            "choose a path in a folder you can write to",
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """The one JSON encoding layerwise writes: sorted keys, stable floats, trailing newline."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def read_json(path: str | os.PathLike[str], what: str, error: type[LayerwiseError], missing_fix: str,
              corrupt_fix: str) -> Any:
    """Read a JSON file layerwise wrote, or raise ``error`` with one line saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist", missing_fix)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not UTF-8 text", corrupt_fix) from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} {p} is not valid JSON (line {exc.lineno}: {exc.msg})", corrupt_fix) from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply to be a file layerwise wrote", corrupt_fix) from None
