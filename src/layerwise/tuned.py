"""The tuned lens: one trained affine translator per layer before the final norm and the head.

The logit lens reads layer k through the final norm and the unembedding, which were trained
only for the output of the last block; the tuned lens (Belrose et al. 2023, "Eliciting Latent
Predictions from Transformers with the Tuned Lens") first maps layer k's hidden state with an
affine translator trained so that the result predicts what the model finally predicts:

    tuned_k(h) = unembed(h + W_k h + b_k)      for layers k = 0..L-1
    tuned_L(h) = the model's own logits         (layer L needs no translator)

``W_k`` and ``b_k`` start at zero, so an untrained lens *is* the logit lens, and weight decay
pulls the translator towards the identity rather than towards zero (the residual form of the
tuned-lens package). :mod:`layerwise.tuned_train` trains one with that package's recipe;
:meth:`TunedLens.translate` applies translator k (one call), :meth:`TunedLens.logits` adds the
final norm and head, and :func:`compare_lenses` gives the lens statistics of both lenses.

A trained lens is a folder: ``config.json`` (format, the identity of the model it was trained
for, the training settings) and ``params.safetensors`` (``weight`` (L, d, d), ``bias`` (L, d),
float32). A lens is refused for any other model (:meth:`TunedLens.check_model`). A folder in
the tuned-lens package's layout (``config.json`` with ``d_model`` / ``num_hidden_layers`` and a
``params.pt`` state dict of ``{k}.weight`` / ``{k}.bias`` translators) is read too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .archs import Adapter
from .errors import ConfigError, TunedLensError
from .lens import LayerStats, layer_stats
from .tuned_files import (CONFIG_FILE, FORMAT, FORMAT_VERSION, TUNED_LENS_PARAMS, WEIGHTS_FILE, check_lens_folder,
                          read_lens_config, read_lens_weights)

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "TUNED_LENS_PARAMS", "WEIGHTS_FILE", "TunedLens",
           "check_lens_folder", "compare_lenses", "model_identity", "read_lens_config"]



# --------------------------------------------------------------------------------------------
# Which model a lens belongs to


def head_sha256(adapter: Adapter) -> str | None:
    """SHA-256 of the unembedding matrix rounded to bfloat16 (so float32 and bfloat16 loads of
    one checkpoint agree); None when the head is quantized or not materialised."""
    w = getattr(adapter.head, "weight", None)
    if w is None or not torch.is_floating_point(w) or w.device.type == "meta":
        return None
    with torch.no_grad():
        raw = w.detach().to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def tuned_lens_unembed_hash(adapter: Adapter) -> str | None:
    """The tuned-lens package's ``unembed_hash``: SHA-256 of numpy's summarised text of the
    unembedding matrix at one decimal (``tuned_lens.utils.tensor_hash``), numpy's print options
    pinned to their defaults."""
    import numpy as np

    w = getattr(adapter.head, "weight", None)
    if w is None or not torch.is_floating_point(w) or w.device.type == "meta":
        return None
    arr = w.detach().to("cpu", torch.float32).numpy()
    with np.printoptions(precision=8, threshold=1000, edgeitems=3, linewidth=75, suppress=False,
                         nanstr="nan", infstr="inf", sign="-", floatmode="maxprec", legacy=False):
        text = np.array_str(arr, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(bundle: Any) -> dict[str, Any]:
    """What a lens records about the model it was trained for (and is checked against)."""
    info = bundle.info
    adapter: Adapter = bundle.adapter
    return {
        "spec": info.get("spec"),
        "name": info.get("name"),
        "source": info.get("source"),
        "file_sha256": info.get("file_sha256"),
        "revision": info.get("revision"),
        "model_type": adapter.model_type,
        "num_layers": adapter.num_layers,
        "hidden_size": info.get("hidden_size"),
        "vocab_size": info.get("vocab_size"),
        "head_sha256": head_sha256(adapter),
        "adapter": _adapter_id(info.get("adapter")),
        "dtype": info.get("dtype"),
        "quantization": info.get("quantization"),
    }


def _adapter_id(desc: Any) -> dict[str, Any] | None:
    """A PEFT adapter applied on top of the model (name and folder hash), or None."""
    if not isinstance(desc, dict):
        return None
    return {"name": desc.get("name"), "sha256": desc.get("sha256")}


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 16 and all(c in "0123456789abcdef" for c in s) else s


def identity_mismatch(saved: dict[str, Any], now: dict[str, Any], now_head_tl: str | None = None) -> str | None:
    """How the model ``now`` differs from the one a lens was trained for (``saved``), or None.

    Shapes must agree; the model file's SHA-256, the hub revision and the unembedding's hash
    must agree where both sides know them; and the names must agree unless the very same file
    was loaded under another spelling. ``now_head_tl``: the tuned-lens package's hash of the
    current head, checked against a tuned-lens checkpoint's ``unembed_hash``.
    """
    for key, what in (("num_layers", "layers"), ("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
        a, b = saved.get(key), now.get(key)
        if a is not None and b is not None and a != b:
            return f"{a} {what}, this model has {b}"
    if saved.get("format") == "tuned-lens":
        tl_hash = saved.get("unembed_hash")
        if tl_hash and now_head_tl and tl_hash != now_head_tl:
            return "another unembedding matrix (its config.json's unembed_hash differs)"
        name = saved.get("name")
        if name and now.get("source") == "hub" and name != now.get("name"):
            return f"model {name!r}"
        return None
    a_type, b_type = saved.get("model_type"), now.get("model_type")
    if a_type and b_type and a_type != b_type:
        return f"a {a_type} model, this is a {b_type} model"
    same_file = bool(saved.get("file_sha256")) and saved.get("file_sha256") == now.get("file_sha256")
    if saved.get("file_sha256") and now.get("file_sha256") and not same_file:
        return f"the model file with SHA-256 {_short(saved['file_sha256'])}, this one is {_short(now['file_sha256'])}"
    if saved.get("head_sha256") and now.get("head_sha256") and saved["head_sha256"] != now["head_sha256"]:
        return f"{saved.get('name')!r} (another unembedding matrix)"
    a_ad, b_ad = saved.get("adapter"), now.get("adapter")
    if (a_ad or {}).get("sha256") != (b_ad or {}).get("sha256"):
        return (f"{saved.get('name')!r} with adapter {a_ad.get('name')!r}" if a_ad else f"{saved.get('name')!r} without an adapter")
    if not same_file and saved.get("name") != now.get("name"):
        return f"model {saved.get('name')!r}"
    if saved.get("revision") and now.get("revision") and saved["revision"] != now["revision"]:
        return f"revision {_short(saved['revision'])}, this model is at {_short(now['revision'])}"
    return None


# --------------------------------------------------------------------------------------------
# The lens


class TunedLens(torch.nn.Module):
    """Affine translators for layers 0..L-1 in residual form: ``h ↦ h + h Wₖᵀ + bₖ``.

    ``weight`` is (L, d, d) laid out like ``torch.nn.Linear.weight`` (out × in), ``bias`` is
    (L, d); both float32. ``model`` is the identity of the model the lens belongs to
    (:func:`model_identity`); ``training`` what :func:`train_tuned_lens` recorded.
    """

    def __init__(self, num_layers: int, hidden_size: int, model: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError("a tuned lens needs at least one layer and a positive hidden size")
        self.weight = torch.nn.Parameter(torch.zeros(num_layers, hidden_size, hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.model: dict[str, Any] = dict(model or {})
        self.training_info: dict[str, Any] = {}
        #: where a loaded lens came from: {"path", "format", "sha256" of its weights file}
        self.source: dict[str, Any] = {}

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    # -- applying it --------------------------------------------------------------------------
    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Translator ``layer`` applied to hidden states ``(..., d)`` of that layer (layer L:
        unchanged). Computed in float32, returned in the input's dtype and device."""
        L = self.num_layers
        if not 0 <= layer <= L:
            raise IndexError(f"layer {layer} is outside 0..{L}")
        if layer == L:
            return hidden
        w, b = self.weight[layer], self.bias[layer]
        if w.device != hidden.device:
            w, b = w.to(hidden.device), b.to(hidden.device)
        x = hidden.to(torch.float32)
        return (x + torch.nn.functional.linear(x, w, b)).to(hidden.dtype)

    def translate_layers(self, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every layer of a ``{layer: (N, d)}`` dict as :func:`layerwise.lens.layer_stats` takes it."""
        return {k: self.translate(h, k) for k, h in hidden.items()}

    def logits(self, adapter: Adapter, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits (float32) of the tuned lens at ``layer``: translator, final norm, head.

        ``hidden`` of layer L is the base model's (already normed) last hidden state, as
        everywhere in layerwise, so layer L gives exactly the model's logits.
        """
        return adapter.unembed(self.translate(hidden, layer), norm=layer < self.num_layers)

    # -- which model --------------------------------------------------------------------------
    def check_model(self, bundle: Any, where: str | os.PathLike[str] = "the tuned lens") -> None:
        """Raise :class:`TunedLensError` unless this lens was trained for ``bundle``'s model."""
        now = model_identity(bundle)
        tl = tuned_lens_unembed_hash(bundle.adapter) if self.model.get("unembed_hash") else None
        diff = identity_mismatch(self.model, now, tl)
        if diff is None and (self.num_layers != bundle.adapter.num_layers
                             or (now.get("hidden_size") and self.hidden_size != now["hidden_size"])):
            diff = f"{self.num_layers} layers of width {self.hidden_size}"
        if diff is not None:
            raise TunedLensError(
                f"{where} was trained for {diff}, not for {now.get('spec') or now.get('name')!r}",
                f"train a tuned lens for this model: layerwise train-lens --model {now.get('spec') or 'MODEL'} -o NEW_FOLDER",
            )

    # -- files --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().to("cpu", torch.float32).contiguous(),
                "bias": self.bias.detach().to("cpu", torch.float32).contiguous()}

    def config(self, weights_sha256: str) -> dict[str, Any]:
        from importlib import metadata

        try:
            version = metadata.version("pytest-layerwise")
        except metadata.PackageNotFoundError:  # pragma: no cover - not installed as a distribution
            version = "unknown"
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "translator": "layer k < num_layers: h + h @ weight[k].T + bias[k], then the model's final "
                          "norm and head; layer num_layers: the model's own output",
            "model": self.model,
            "training": self.training_info,
            "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha256},
            "layerwise_version": version,
        }

    def save(self, folder: str | os.PathLike[str], *, replace: bool = False) -> Path:
        """Write the lens into ``folder`` (created; must be new or empty).

        ``replace=True`` also accepts a folder holding a tuned lens for the same model and
        replaces only its two files (each atomically; other files are left alone). Never
        overwrites anything else.
        """
        from safetensors.torch import save as st_save

        from .io import atomic_write_bytes, dumps_json

        target = Path(folder)
        check_output_folder(target, self.model, force=replace)
        blob = st_save(self.state_tensors(), metadata={"format": FORMAT})
        digest = hashlib.sha256(blob).hexdigest()
        text = dumps_json(self.config(digest)).encode("utf-8")
        if target.is_dir() and any(target.iterdir()):  # a lens for the same model, replace=True
            atomic_write_bytes(target / WEIGHTS_FILE, blob)
            atomic_write_bytes(target / CONFIG_FILE, text)
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}", "choose a folder you can write to") from None
        try:
            (tmp / WEIGHTS_FILE).write_bytes(blob)
            (tmp / CONFIG_FILE).write_bytes(text)
            os.chmod(tmp, 0o755)
            if target.is_dir():
                target.rmdir()  # empty (checked above): nothing is lost
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike[str], bundle: Any = None) -> "TunedLens":
        """Read a lens folder (layerwise's format, or the tuned-lens package's); with
        ``bundle``, refuse it unless it was trained for that model."""
        p = Path(folder)
        info = check_lens_folder(p)  # the files are whole (SHA-256, shapes) before torch reads them
        cfg = read_lens_config(p)
        if cfg.get("format") == FORMAT:
            lens = _load_layerwise(p, cfg)
        else:
            lens = _load_tuned_lens_package(p, cfg)
        lens.requires_grad_(False)  # for use; training starts from a fresh lens
        lens.source = {k: info[k] for k in ("path", "format", "sha256")}
        if bundle is not None:
            lens.check_model(bundle, f"tuned lens {p}")
        return lens


def _load_layerwise(p: Path, cfg: dict[str, Any]) -> TunedLens:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    blob, _ = read_lens_weights(p, cfg)
    wfile = p / WEIGHTS_FILE
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise TunedLensError(f"{wfile} is not a safetensors file ({exc})", "train the lens again") from None
    L, d = cfg.get("num_layers"), cfg.get("hidden_size")
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is None or b is None or tuple(w.shape) != (L, d, d) or tuple(b.shape) != (L, d):
        raise TunedLensError(f"{wfile} does not hold weight ({L}, {d}, {d}) and bias ({L}, {d})", "train the lens again")
    lens = TunedLens(int(L), int(d), model=cfg.get("model") or {})
    with torch.no_grad():
        lens.weight.copy_(w)
        lens.bias.copy_(b)
    lens.training_info = cfg.get("training") or {}
    return lens


def _load_tuned_lens_package(p: Path, cfg: dict[str, Any]) -> TunedLens:
    """A checkpoint in the layout of tuned-lens (``TunedLens.save``): its ``layer_translators``
    state dict, keys ``{k}.weight`` (d, d) and ``{k}.bias`` (d,) for k = 0..num_hidden_layers-1,
    applied as ``h + translator_k(h)`` to the model's ``hidden_states[k]`` — layerwise's layer k."""
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise TunedLensError(f"tuned lens {p} is of type {lens_type!r}", "only linear_tuned_lens checkpoints can be read")
    L, d = cfg["num_hidden_layers"], cfg["d_model"]
    if not (isinstance(L, int) and isinstance(d, int) and L > 0 and d > 0):
        raise TunedLensError(f"{p / CONFIG_FILE}: num_hidden_layers and d_model must be positive integers", "fix the config")
    pfile = p / TUNED_LENS_PARAMS
    if not pfile.is_file():
        raise TunedLensError(f"tuned lens {p} has no {TUNED_LENS_PARAMS} next to its config.json",
                             "copy the checkpoint's params.pt into the folder")
    try:
        state = torch.load(pfile, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or unsafe pickle: one line
        raise TunedLensError(f"cannot read {pfile}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}",
                             "pass a params.pt written by tuned-lens (a state dict of tensors)") from None
    if not isinstance(state, dict):
        raise TunedLensError(f"{pfile} holds no state dict", "pass a params.pt written by tuned-lens")
    bias = cfg.get("bias", True)
    lens = TunedLens(L, d, model={
        "format": "tuned-lens",
        "name": cfg.get("base_model_name_or_path"),
        "revision": cfg.get("base_model_revision"),
        "unembed_hash": cfg.get("unembed_hash"),
        "num_layers": L,
        "hidden_size": d,
    })
    expected = {f"{k}.weight" for k in range(L)} | ({f"{k}.bias" for k in range(L)} if bias else set())
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected)[:3], sorted(expected - set(state))[:3]
        raise TunedLensError(f"{pfile} does not match its config ({L} translators of width {d}): "
                             f"missing {missing}, unexpected {extra}", "pass the config.json that belongs to it")
    with torch.no_grad():
        for k in range(L):
            w = state[f"{k}.weight"]
            if tuple(w.shape) != (d, d) or (bias and tuple(state[f"{k}.bias"].shape) != (d,)):
                raise TunedLensError(f"{pfile}: translator {k} is not {d} × {d}", "pass the config.json that belongs to it")
            lens.weight[k].copy_(w.float())
            if bias:
                lens.bias[k].copy_(state[f"{k}.bias"].float())
    lens.training_info = {"source": "tuned-lens checkpoint", "path": str(p)}
    return lens


def check_output_folder(folder: str | os.PathLike[str], model: dict[str, Any] | None, *, force: bool) -> None:
    """Refuse an output folder that holds anything but a tuned lens for the same model (that one
    only with ``force``). ``model=None``: the model is not loaded yet; check what can be checked."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"output {p} is a file", "pass a folder for the tuned lens (-o lens/)")
    if not p.is_dir() or not any(p.iterdir()):
        return
    cfg_file = p / CONFIG_FILE
    is_lens = False
    saved: dict[str, Any] = {}
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            is_lens = isinstance(cfg, dict) and cfg.get("format") == FORMAT
            saved = (cfg.get("model") or {}) if is_lens else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            is_lens = False
    if not is_lens:
        raise ConfigError(f"output folder {p} is not empty and holds no layerwise tuned lens",
                          "pass a new or empty folder (-o); nothing in it is overwritten")
    if not force:
        raise ConfigError(f"output folder {p} already holds a tuned lens",
                          "pass --force to replace it (only its config.json and params.safetensors), or another folder")
    if model is not None:
        diff = identity_mismatch(saved, model)
        if diff is not None:
            raise ConfigError(f"output folder {p} holds a tuned lens trained for {diff}, not for this model",
                              "pass another folder; --force replaces only a lens of the same model")


def compare_lenses(adapter: Adapter, lens: TunedLens, hidden: dict[int, torch.Tensor],
                   targets: torch.Tensor | None = None) -> dict[str, LayerStats]:
    """Lens statistics of the same positions through the logit lens and the tuned lens."""
    with torch.inference_mode():
        translated = lens.translate_layers(hidden)
    return {"logit": layer_stats(adapter, hidden, targets), "tuned": layer_stats(adapter, translated, targets)}
