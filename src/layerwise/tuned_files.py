"""A tuned-lens folder on disk, read and checked without torch.

:mod:`layerwise.tuned` loads a lens (with torch); this room says what a folder holds and whether
it is whole, so that the preflight of a run (``--lens logit,tuned:PATH``) refuses a missing or
damaged lens in one line before any model loads — and ``pytest --collect-only`` still imports no
torch. Whether the lens belongs to the model is checked once the model is loaded
(:meth:`layerwise.tuned.TunedLens.check_model`), still before any compute.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from .errors import TunedLensError

FORMAT = "layerwise-tuned-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "params.safetensors"
TUNED_LENS_PARAMS = "params.pt"  # the tuned-lens package's checkpoint next to its config.json


def read_lens_config(p: Path) -> dict[str, Any]:
    """The parsed config.json of a lens folder, with one-line errors for what is not a lens."""
    from .io import read_json

    if not p.exists():
        raise TunedLensError(f"tuned lens {p} does not exist", "pass the folder written by layerwise train-lens")
    if not p.is_dir():
        raise TunedLensError(f"tuned lens {p} is a file, not a folder", "pass the folder written by layerwise train-lens")
    cfg = read_json(p / CONFIG_FILE, f"tuned lens {p}: config file", TunedLensError,
                    "pass a folder written by layerwise train-lens (config.json + params.safetensors)",
                    "train the lens again")
    if not isinstance(cfg, dict) or not (cfg.get("format") == FORMAT or {"d_model", "num_hidden_layers"} <= set(cfg)):
        raise TunedLensError(
            f"{p / CONFIG_FILE} is neither a layerwise tuned lens nor a tuned-lens checkpoint",
            "pass a folder written by layerwise train-lens",
        )
    return cfg


def _safetensors_shapes(blob: bytes) -> dict[str, list[int]] | None:
    """Tensor shapes from a safetensors header (8-byte length, then JSON), or None if unreadable."""
    if len(blob) < 8:
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        return None
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    return {k: v.get("shape") for k, v in header.items() if isinstance(v, dict)}


def read_lens_weights(p: Path, cfg: dict[str, Any]) -> tuple[bytes, str]:
    """The weights file of a layerwise lens folder and its SHA-256, checked against the config's
    format version and recorded SHA-256 (one-line :class:`TunedLensError` otherwise)."""
    if cfg.get("format_version") != FORMAT_VERSION:
        raise TunedLensError(f"tuned lens {p} has format version {cfg.get('format_version')!r}, this layerwise "
                             f"reads {FORMAT_VERSION}", "train the lens again with this version of layerwise")
    wfile = p / WEIGHTS_FILE
    try:
        blob = wfile.read_bytes()
    except OSError:
        raise TunedLensError(f"tuned lens {p} has no readable {WEIGHTS_FILE}", "train the lens again") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != (cfg.get("weights") or {}).get("sha256"):
        raise TunedLensError(f"{wfile} does not match {p / CONFIG_FILE} (files of two trainings, or damaged)",
                             "train the lens again with --force")
    return blob, digest


def check_lens_folder(folder: str | Path) -> dict[str, Any]:
    """What a tuned-lens folder holds, checked as far as it can be without torch and the model.

    Returns ``{"path", "format", "sha256" (of the weights file), "num_layers", "hidden_size",
    "model" (the identity it was trained for), "training" (steps, seed, … when recorded)}``;
    raises a one-line :class:`TunedLensError` for a missing folder, an unreadable config, weights
    that do not match their config (SHA-256 and shapes), or a missing tuned-lens ``params.pt``.
    """
    p = Path(folder)
    cfg = read_lens_config(p)
    if cfg.get("format") == FORMAT:
        blob, digest = read_lens_weights(p, cfg)
        wfile = p / WEIGHTS_FILE
        L, d = cfg.get("num_layers"), cfg.get("hidden_size")
        shapes = _safetensors_shapes(blob)
        if shapes is None or shapes.get("weight") != [L, d, d] or shapes.get("bias") != [L, d]:
            raise TunedLensError(f"{wfile} does not hold weight ({L}, {d}, {d}) and bias ({L}, {d})",
                                 "train the lens again")
        return {"path": str(p), "format": FORMAT, "sha256": digest, "num_layers": L, "hidden_size": d,
                "model": cfg.get("model") or {}, "training": cfg.get("training") or {}}
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise TunedLensError(f"tuned lens {p} is of type {lens_type!r}", "only linear_tuned_lens checkpoints can be read")
    L, d = cfg.get("num_hidden_layers"), cfg.get("d_model")
    if not (isinstance(L, int) and isinstance(d, int) and L > 0 and d > 0):
        raise TunedLensError(f"{p / CONFIG_FILE}: num_hidden_layers and d_model must be positive integers", "fix the config")
    pfile = p / TUNED_LENS_PARAMS
    try:
        digest = hashlib.sha256(pfile.read_bytes()).hexdigest()
    except OSError:
        raise TunedLensError(f"tuned lens {p} has no {TUNED_LENS_PARAMS} next to its config.json",
                             "copy the checkpoint's params.pt into the folder") from None
    return {"path": str(p), "format": "tuned-lens", "sha256": digest, "num_layers": L, "hidden_size": d,
            "model": {"name": cfg.get("base_model_name_or_path"), "revision": cfg.get("base_model_revision")},
            "training": {"source": "tuned-lens checkpoint"}}
