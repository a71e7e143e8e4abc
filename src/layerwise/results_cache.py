"""An opt-in cache of whole evaluations (``--cache-results``): rerunning pytest after editing one of
your own tests does not recompute the sweep.

An entry is keyed by everything that changes the numbers: the model's identity (a GGUF file's
SHA-256; a local folder's config and the names, sizes and modification times of its files; a hub
id with the revision you pinned — an unpinned hub id is keyed by its name, so pin a revision to
cache a moving branch safely), the adapter, how it is loaded (dtype, device, quantization, device
map, attention implementation), the data's SHA-256 and every run setting, and the versions of the
libraries that compute them. Entries live in ``$LAYERWISE_CACHE/results`` and are written
atomically; a damaged entry is ignored and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT = 1
VERSIONED = ("pytest-layerwise", "torch", "transformers", "sacrebleu", "rouge-score", "bert-score", "bitsandbytes",
             "peft", "accelerate")


def _files_identity(folder: Path) -> list[list[Any]]:
    out = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        out.append([str(f.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return out


def model_identity(spec: str, revision: str | None) -> dict[str, Any]:
    """What identifies the model's weights without loading them."""
    from .models import file_sha256, resolve_spec

    src = resolve_spec(spec)
    if src.kind == "gguf":
        return {"gguf_sha256": file_sha256(Path(src.location) / str(src.gguf_file))}
    if src.kind == "folder":
        folder = Path(src.location)
        return {"config": (folder / "config.json").read_text(encoding="utf-8"), "files": _files_identity(folder)}
    return {"hub": spec, "revision": revision}


def _adapter_identity(adapter: str | None) -> Any:
    if not adapter:
        return None
    p = Path(adapter).expanduser()
    return {"files": _files_identity(p)} if p.is_dir() else {"hub": adapter}


def _versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def cache_key(config: Any, data_sha256: str) -> str:
    """The entry's name: SHA-256 over everything that changes a run's numbers."""
    settings = dataclasses.asdict(config)
    settings.pop("token", None)  # a secret, and it changes no number
    settings.pop("cache_dir", None)
    settings["prompts"] = None  # the data is identified by its hash, not its path
    ident = {
        "format": FORMAT,
        "model": model_identity(config.model, config.revision),
        "adapter": _adapter_identity(config.adapter),
        "drift": model_identity(config.drift_against, config.drift_revision) if config.drift_against else None,
        # --lens logit,tuned:PATH: the lens's files (retrained in place, it is another lens)
        "tuned_lens": _files_identity(Path(config.tuned_lens)) if getattr(config, "tuned_lens", None) else None,
        "data_sha256": data_sha256,
        "settings": settings,
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_path(key: str) -> Path:
    from .models import cache_root

    return cache_root() / "results" / f"{key}.json"


def load(key: str) -> dict[str, Any] | None:
    """The cached results for ``key``, or None (absent or damaged)."""
    from .errors import ResultsError
    from .results import load_results

    p = entry_path(key)
    if not p.is_file():
        return None
    try:
        return dict(load_results(p))
    except ResultsError:
        return None


def store(key: str, results: dict[str, Any]) -> Path:
    from .io import atomic_write_json

    clean = {k: v for k, v in results.items() if k not in ("tests", "gate")}
    clean["tests"] = []
    return atomic_write_json(entry_path(key), clean, "the results cache")
