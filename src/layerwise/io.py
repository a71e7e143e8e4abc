"""File output that never destroys anything, and JSON reading.

- Every output is written through a temp file in the target's folder and ``os.replace``: a
  crash or Ctrl-C leaves the old file or the new one, never a mix.
- Only a regular file (or nothing) is ever replaced. A device node, FIFO, socket or folder at an
  output path is refused before anything is written (:func:`check_output`); a symlink is kept
  and the file it points to is written instead, atomically, in that file's own folder.
- An output that is the same file as an input or as another output is refused
  (:func:`check_distinct`): files are compared, not spellings (symlinks resolved, hard links
  count as the same file).
- A write error (full disk, read-only file system, …) is one :class:`OutputError` line naming
  the path; the old file stays as it was.
- :func:`write_set` writes several files as one set (a results JSON and its report): all temp
  files first, then the renames, under a lock per file (two runs on the same paths take turns)
  with SIGINT/SIGTERM held back until the last rename is done.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LayerwiseError, OutputError

PathLike = str | os.PathLike[str]

#: How long :func:`write_set` waits for another run that is writing the same files.
LOCK_TIMEOUT_S = 120.0

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)

_FOLDER_FIX = "choose a path in a folder you can write to"


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check_output(path: PathLike, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written without destroying anything.

    Returns the file that will really be written: ``path`` itself, or the file a symlink at
    ``path`` points to (the link is kept). Raises :class:`OutputError` when that file is a folder,
    a device, FIFO or socket, a symlink loop, not writable, or in a folder that cannot be made
    or written. Missing folders are fine (they are created on writing).
    """
    p = Path(path)
    target = p
    if p.is_symlink():
        try:
            os.stat(p)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{what} {p} is a symlink loop", "point the link at a file, or choose another path") from None
        target = Path(os.path.realpath(p))
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # the folder part is checked below
        st = None
    except OSError as exc:
        raise OutputError(f"{what} {p} cannot be written ({exc.strerror or exc})", _FOLDER_FIX) from None
    shown = p if target == p else f"{p} (a symlink to {target})"
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {shown} is a folder", "pass a file path")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {shown} is {_kind(st.st_mode)}, not a regular file",
                              "layerwise only ever replaces regular files; pass the path of a regular (or new) file")
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link in the middle of the folder path
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {shown} cannot be written ({probe} is a file, not a folder)", _FOLDER_FIX)
    if not os.access(probe, os.W_OK | os.X_OK) or (st is not None and not os.access(target, os.W_OK)):
        raise OutputError(f"{what} {shown} cannot be written (no write permission in {probe})", _FOLDER_FIX)
    return target


def _file_key(path: PathLike) -> tuple[Any, ...]:
    """What identifies the file ``path`` names: device + inode when it exists, else the
    fully resolved path (symlinks in every part followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(os.path.abspath(path)))
    return ("inode", st.st_dev, st.st_ino)


def check_distinct(inputs: Mapping[str, PathLike | None], outputs: Mapping[str, PathLike | None]) -> None:
    """Refuse an output that is the same file as an input or as another output.

    ``inputs`` / ``outputs`` map an option's name (as the user typed it, e.g. ``"--prompts"``)
    to its path; ``None`` entries are skipped. Paths are compared by the files they point to:
    ``r.json``, ``./r.json``, a symlink to it and a hard link of it are all the same file.
    """
    seen: dict[tuple[Any, ...], tuple[str, PathLike]] = {}
    for name, path in inputs.items():
        if path is not None:
            seen.setdefault(_file_key(path), (name, path))
    for name, path in outputs.items():
        if path is None:
            continue
        key = _file_key(path)
        if key in seen:
            other, other_path = seen[key]
            if other in inputs:
                raise OutputError(f"{name} {path} is the same file as {other} {other_path}",
                                  f"writing it would destroy {other}; choose another path for {name}")
            raise OutputError(f"{other} {other_path} and {name} {path} are the same file",
                              f"give {other} and {name} different paths (the second would overwrite the first)")
        seen[key] = (name, path)


def _write_error(path: PathLike, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or -1)
    if code:
        reason = f"{reason} ({code})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there or choose another path; the old file is unchanged"
    elif exc.errno == errno.EROFS:
        fix = "the file system is read-only; choose another path (the old file is unchanged)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = _FOLDER_FIX + " (the old file is unchanged)"
    else:
        fix = "check the path and the disk; the old file is unchanged"
    return OutputError(f"cannot write {path}: {reason}", fix)


def _write_temp(target: Path, data: bytes, shown: PathLike) -> Path:
    """``data`` in a new temp file beside ``target``, flushed to disk; removed again on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _write_error(shown, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fh.fileno(), view):]
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(shown, exc) from None
        raise
    return Path(tmp)


def _unlink(p: PathLike) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes, what: str = "output") -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never a mix; a
    write error leaves the old file and raises :class:`OutputError`. ``path`` must be a regular
    file or absent (see :func:`check_output`); a symlink's target is written, the link kept.
    Returns ``path``.
    """
    target = check_output(path, what)
    tmp = _write_temp(target, data, path)
    try:
        os.replace(tmp, target)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    _sync_folder(target.parent)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, what: str = "output") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what)


def dumps_json(obj: Any, flat_lists: bool = False) -> str:
    """The one JSON encoding layerwise writes: sorted keys, stable floats, trailing newline.

    ``flat_lists``: lists of numbers and strings on one line each (baselines: their per-row records
    stay small and their diffs readable, one line per record)."""
    if not flat_lists:
        return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    return _flat(obj, 0) + "\n"


def _flat(obj: Any, depth: int) -> str:
    def enc(x: Any) -> str:
        return json.dumps(x, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{enc(k)}: {_flat(obj[k], depth + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return enc(obj)
        return "[\n" + ",\n".join(inner + _flat(x, depth + 1) for x in obj) + "\n" + pad + "]"
    return enc(obj)


def atomic_write_json(path: PathLike, obj: Any, what: str = "output") -> Path:
    return atomic_write_text(path, dumps_json(obj), what)


# ----------------------------------------------------------------------------------------------
# Several files as one set


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM back inside the block and deliver them, to the handlers that were in
    place, when it ends. Only the main thread can install handlers; elsewhere this does nothing
    (Python runs every handler on the main thread, so such a thread is not interrupted anyway).

    Handlers, not a signal mask: a mask is per thread, and a process-directed SIGTERM would go to
    one of torch's worker threads, which do not block it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old: dict[int, Any] = {}

    def hold(signum: int, _frame: Any) -> None:
        pending.append(signum)

    for s in signums:
        prev = signal.getsignal(s)
        if prev is None:  # a handler installed outside Python: cannot be restored, leave it
            continue
        old[s] = signal.signal(s, hold)
    try:
        yield
    finally:
        for s, prev in old.items():
            signal.signal(s, prev)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _lock_path(target: Path) -> Path:
    """One lock file per output file, outside the user's folders (no litter beside their files);
    ``LAYERWISE_LOCK_DIR`` chooses the folder (default: ``<tmp>/layerwise-locks-<uid>``)."""
    base = os.environ.get("LAYERWISE_LOCK_DIR") or os.path.join(tempfile.gettempdir(), f"layerwise-locks-{getattr(os, 'getuid', lambda: 'user')()}")
    digest = hashlib.sha256(os.fsencode(os.path.realpath(target))).hexdigest()[:32]
    return Path(base) / f"{digest}.lock"


@contextlib.contextmanager
def _locked(targets: Sequence[Path], shown: Sequence[PathLike], timeout: float) -> Iterator[None]:
    import filelock

    with contextlib.ExitStack() as stack:
        # A fixed order (by lock file) so that two runs locking overlapping sets cannot deadlock.
        for lock_file, path in sorted({_lock_path(t): s for t, s in zip(targets, shown)}.items()):
            try:
                lock_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise _write_error(lock_file.parent, exc) from None
            lock = filelock.FileLock(str(lock_file), timeout=timeout)
            try:
                stack.enter_context(lock)
            except filelock.Timeout:
                raise OutputError(f"another process has been writing {path} for {timeout:.0f} s (lock {lock_file})",
                                  "wait for the other layerwise run to finish, then run again") from None
            except OSError as exc:
                raise _write_error(lock_file, exc) from None
        yield


def write_set(files: Sequence[tuple[PathLike, bytes]], *, what: Sequence[str] | None = None,
              lock_timeout: float = LOCK_TIMEOUT_S) -> list[Path]:
    """Write several files as one set, e.g. ``write_set([(results_path, json_bytes), (report_path,
    html_bytes)])``.

    Each path is checked as by :func:`check_output` (``what[i]`` names it in messages, e.g.
    ``"--report"``) and no two may be the same file. All temp files are written first, so a
    full disk or any write error leaves every old file untouched. Then, holding a lock per file
    (another run writing any of them waits for this one) and with SIGINT/SIGTERM deferred until
    the end, the temp files are renamed into place: an interrupt never leaves half a set.
    Returns the paths, as given.
    """
    names = list(what) if what is not None else ["output"] * len(files)
    if len(names) != len(files):
        raise ValueError("write_set: give one name in `what` per file")
    paths = [Path(p) for p, _data in files]
    targets = [check_output(p, n) for p, n in zip(paths, names)]
    check_distinct({}, {(f"{n} #{i + 1}" if names.count(n) > 1 else n): p for i, (n, p) in enumerate(zip(names, paths))})
    temps: list[Path] = []
    try:
        for (path, data), target in zip(files, targets):
            temps.append(_write_temp(target, data, path))
        with _locked(targets, paths, lock_timeout), deferred_signals():
            done = 0
            try:
                for tmp, target in zip(temps, targets):
                    os.replace(tmp, target)
                    done += 1
            except OSError as exc:
                raise _write_error(paths[done], exc) from None
    finally:
        for tmp in temps:
            if tmp.exists():
                _unlink(tmp)
    for folder in dict.fromkeys(t.parent for t in targets):
        _sync_folder(folder)
    return paths


# ----------------------------------------------------------------------------------------------
# Reading


def read_json(path: PathLike, what: str, error: type[LayerwiseError], missing_fix: str,
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
