"""Keeping the GGUF conversion cache healthy (``LAYERWISE_CACHE``; the conversion itself lives in
:mod:`layerwise.models`).

- A finished entry carries a marker that lists every file with its size and SHA-256.
  :func:`entry_problem` checks an entry cheaply on every use (sizes, and that each safetensors
  file is as long as its header says) or fully (hashes) after a load from it failed; a damaged
  entry is removed (:func:`drop_entry`) and converted again.
- A conversion works in a ``.converting-*`` folder that records its owner (pid, the process's
  start time, boot id, host). :func:`converting` removes that folder when SIGTERM arrives
  mid-conversion, and :func:`remove_dead_work` lets a later run remove the folders of owners that
  provably no longer run (and any ``.broken-*`` folder a removal left behind).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = "layerwise-cache.json"
OWNER = ".layerwise-owner.json"
CONVERTING = ".converting-"
BROKEN = ".broken-"
#: A ``.converting-*`` folder without an owner record (older layerwise) is removed after this long.
UNOWNED_STALE_S = 24 * 3600


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in ``folder`` (recursively, marker and owner excluded)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MARKER, OWNER):
            out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is as long as its header says (catches truncation cheaply)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated (its header needs {n + 8} bytes, the file has {size})"
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path.name} has an unreadable header ({type(exc).__name__})"
    if 8 + n + end != size:
        return f"{path.name} is {size} bytes but its header describes {8 + n + end}"
    return None


def entry_problem(entry: Path, full: bool = False) -> str | None:
    """None when the cache entry looks complete; else what is wrong with it, in a few words.

    Cheap by default (file sizes, safetensors headers); ``full`` also compares the SHA-256 of
    every file with the marker. Entries written before markers listed files are checked by their
    safetensors headers only (and count as damaged under ``full``: they cannot be verified).
    """
    try:
        marker = json.loads((entry / MARKER).read_text(encoding="utf-8"))
        files = marker.get("files") if isinstance(marker, dict) else None
    except (OSError, ValueError) as exc:
        return f"its marker {MARKER} is unreadable ({type(exc).__name__})"
    if files is not None and not isinstance(files, dict):
        return f"its marker {MARKER} is damaged"
    for name, rec in (files or {}).items():
        p = entry / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if not isinstance(rec, dict) or size != rec.get("size"):
            return f"{name} is {size} bytes, {rec.get('size') if isinstance(rec, dict) else '?'} were written"
    for p in sorted(entry.glob("*.safetensors")):
        problem = _safetensors_problem(p)
        if problem:
            return problem
    if full:
        if files is None:
            return "it was written by an older layerwise and cannot be verified"
        for name, rec in files.items():
            if _sha256(entry / name) != rec.get("sha256"):
                return f"{name} does not match the SHA-256 recorded when it was written"
    return None


def drop_entry(entry: Path) -> None:
    """Remove a cache entry: renamed away first (atomic: no reader sees half of it), then deleted."""
    grave = entry.parent / f"{BROKEN}{entry.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(entry, grave)
    except FileNotFoundError:  # another process removed it already
        return
    shutil.rmtree(grave, ignore_errors=True)


def notice(message: str) -> None:
    """One line on stderr for something layerwise fixed by itself (a damaged cache entry)."""
    print(f"layerwise: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Owners of .converting-* folders


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start_ticks": _start_ticks(pid), "boot_id": _boot_id(), "host": socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    except OSError:
        return True
    return True


def owner_is_dead(owner: Any) -> bool:
    """True only when the process that owned a folder provably no longer runs."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False  # another machine (a shared cache): cannot tell
    boot = _boot_id()
    if owner.get("boot_id") and boot and owner["boot_id"] != boot:
        return True  # the machine has restarted since
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if not _alive(pid):
        return True
    ticks = owner.get("start_ticks")
    now = _start_ticks(pid)
    return ticks is not None and now is not None and ticks != now  # the pid was reused


def remove_dead_work(root: Path) -> list[str]:
    """Remove the ``.converting-*`` folders of dead owners and any ``.broken-*`` folder; returns
    the names removed. A live conversion's folder is never touched."""
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return removed
    for name in names:
        p = root / name
        if name.startswith(BROKEN):
            dead = True
        elif name.startswith(CONVERTING):
            try:
                owner = json.loads((p / OWNER).read_text(encoding="utf-8"))
                dead = owner_is_dead(owner)
            except FileNotFoundError:
                try:
                    dead = time.time() - p.stat().st_mtime > UNOWNED_STALE_S
                except OSError:
                    dead = False
            except (OSError, ValueError):
                dead = False
        else:
            continue
        if dead and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
    return removed


class _Terminated(BaseException):
    """SIGTERM arrived during a conversion (a BaseException: ``except Exception`` lets it through)."""


@contextlib.contextmanager
def converting(root: Path) -> Iterator[Path]:
    """A fresh ``.converting-*`` folder in ``root`` with its owner recorded, removed again when the
    block fails, is interrupted, or receives SIGTERM (which is then delivered as before, so the
    process still ends). The block renames it into place on success."""
    tmp = Path(tempfile.mkdtemp(prefix=CONVERTING, dir=root))
    prev: Any = None
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        prev = signal.getsignal(signal.SIGTERM)
        if prev in (None, signal.SIG_IGN):
            on_main = False  # a handler from outside Python, or SIGTERM ignored: leave it alone

    def on_term(_signum: int, _frame: Any) -> None:
        raise _Terminated()

    if on_main:
        signal.signal(signal.SIGTERM, on_term)
    terminated = False
    try:
        (tmp / OWNER).write_text(json.dumps(owner_record()))
        yield tmp
    except _Terminated:
        terminated = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if on_main:
            signal.signal(signal.SIGTERM, prev)
    if terminated:
        signal.raise_signal(signal.SIGTERM)  # to the handler in place before: by default, the end
        raise SystemExit(128 + signal.SIGTERM)
