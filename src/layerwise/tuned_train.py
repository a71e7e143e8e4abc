"""Training a tuned lens (:mod:`layerwise.tuned`) for a loaded model, and ``layerwise train-lens``.

The recipe is the tuned-lens package's (tuned_lens/scripts/train_loop.py, ingredients.py):
loss Σ_k KL(final ‖ tuned_k) at every position (the current token's distribution, no shift),
summed over layers; SGD with Nesterov momentum 0.9 and learning rate ``lr × (1 − momentum)``
(their ``lr_scale`` convention, default 1), weight decay 1e-3, gradient norm clipped to 1,
the learning rate decaying linearly to zero, no warm-up; or their Adam option (AMSGrad,
lr 1e-3 × ``lr``, warm-up over the first fifth of the steps).

Efficiency: the model is frozen, so the hidden states of every layer are captured once, in one
forward per batch of sequences (positions whose whole prefix was seen already are kept once);
each step then samples ``positions_per_step`` positions (a fresh permutation every epoch) and
pays only the translators and the head. The head (hidden × vocabulary, 576 × 49,152 for the
default model) is the cost: forward and backward through it for every layer and sampled
position, several layers' rows per matmul.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .archs import Adapter
from .errors import ConfigError
from .tuned import TunedLens, check_output_folder, model_identity

OPTIMIZERS = ("sgd", "adam")
#: The tuned-lens package's defaults (ingredients.Optimizer): weight decay, momentum / Adam β1.
WEIGHT_DECAY = 1e-3
MOMENTUM = 0.9
CLIP_NORM = 1.0

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Data: token sequences and their hidden states


def training_sequences(
    bundle: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    add_special_tokens: bool = True,
    max_new_tokens: int = 64,
    max_reference_tokens: int = 256,
    batch_size: int = 16,
    log: Log | None = None,
) -> list[list[int]]:
    """Token sequences to train on: each ``prompt | reference`` and, with ``max_new_tokens``,
    each ``prompt | the model's own greedy continuation`` (up to its end-of-sequence token)."""
    from transformers import GenerationConfig

    tok, model = bundle.tokenizer, bundle.model
    prompt_ids = [tok.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    seqs = [p + tok.encode(r, add_special_tokens=False)[:max_reference_tokens] for p, r in zip(prompt_ids, references)]
    if max_new_tokens <= 0:
        return seqs
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else tok.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=sorted(eos_set) or None)
    dev = bundle.device
    for b0 in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[b0 : b0 + batch_size]
        if log:
            log(f"generating continuations: rows {b0 + 1}–{b0 + len(rows)} of {len(prompt_ids)} …")
        S = max(map(len, rows))
        ids = torch.full((len(rows), S), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(rows):
            ids[j, S - len(p):] = torch.tensor(p)
            mask[j, S - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
        for j, p in enumerate(rows):
            new: list[int] = []
            for t in out[j, S:].tolist():
                if t in eos_set:
                    break
                new.append(t)
            if new:
                seqs.append(p + new)
    return seqs


def unique_positions(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """For each sequence, the positions whose whole prefix (tokens 0..t) no earlier sequence
    had: identical prefixes have identical hidden states, so they are kept once."""
    seen: set[int] = set()
    keep: list[list[int]] = []
    for seq in sequences:
        h = 0
        kept = []
        for t, tok in enumerate(seq):
            h = hash((h, int(tok)))
            if h not in seen:
                seen.add(h)
                kept.append(t)
        keep.append(kept)
    return keep


def hidden_states_at(
    bundle: Any,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: bool | None = None,
) -> torch.Tensor:
    """Hidden states of layers 0..L at the given positions of each sequence: ``(L+1, N, d)``
    float32 on the CPU, positions in sequence order. Layer L is the base model's (normed)
    ``last_hidden_state``. Sequences run right-padded (causal attention: padding after a
    position does not change it)."""
    from tqdm import tqdm

    adapter: Adapter = bundle.adapter
    L = adapter.num_layers
    tok = bundle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    counts = [len(p) for p in positions]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    n = offsets[-1]
    out: torch.Tensor | None = None
    dev = bundle.device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding per batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc="capturing hidden states", unit="batch", disable=_bar_off(progress), file=sys.stderr):
        rows = [i for i in rows if counts[i]]
        if not rows:
            continue
        T = max(len(sequences[i]) for i in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(rows):
            ids[j, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
            mask[j, : len(sequences[i])] = 1
        store = adapter.forward(ids.to(dev), mask.to(dev))
        if out is None:
            out = torch.empty(L + 1, n, store[L].shape[-1], dtype=torch.float32)
        for j, i in enumerate(rows):
            pos = torch.tensor(positions[i], dtype=torch.long)
            for k in range(L + 1):
                out[k, offsets[i] : offsets[i + 1]] = store[k][j, pos.to(store[k].device)].float().cpu()
        del store
    if out is None:
        raise ConfigError("no positions to capture hidden states at", "pass non-empty token sequences")
    return out


def teacher_forced_states(
    bundle: Any, prompt_ids: Sequence[Sequence[int]], ref_ids: Sequence[Sequence[int]], *, batch_size: int = 8,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The positions of a run's teacher-forced lens: for ``prompt | reference`` the last prompt
    position and every reference position but the last, each predicting the next reference
    token. Returns ``({layer: (N, d)}, targets (N,))``."""
    seqs, pos, targets = [], [], []
    for p, r in zip(prompt_ids, ref_ids):
        if not r:
            continue
        seqs.append(list(p) + list(r))
        pos.append(list(range(len(p) - 1, len(p) - 1 + len(r))))
        targets.extend(r)
    h = hidden_states_at(bundle, seqs, pos, batch_size=batch_size, progress=False)
    return {k: h[k] for k in range(h.shape[0])}, torch.tensor(targets, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Training


class _KLFromLogits(torch.autograd.Function):
    """KL(p ‖ softmax(z)) per row from logits ``z`` (G, B, V) and the target's ``p`` (B, V) and
    ``Σ p log p`` (B,), without materialising log-softmax twice; gradient ``softmax(z) − p``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
        lse = z.logsumexp(-1)
        cross = torch.stack([(zg * p).sum(-1) for zg in z])
        ctx.save_for_backward(z, p, lse)
        return neg_entropy - cross + lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        z, p, lse = ctx.saved_tensors
        g = z.sub(lse.unsqueeze(-1)).exp_().sub_(p).mul_(grad.unsqueeze(-1))
        return g, None, None


def kl_from_logits(z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
    return _KLFromLogits.apply(z, p, neg_entropy)


@contextlib.contextmanager
def _frozen(module: Any) -> Iterator[None]:
    """No gradients for the model's own weights (the head's would cost as much as the lens)."""
    params = list(module.parameters())
    flags = [q.requires_grad for q in params]
    try:
        for q in params:
            q.requires_grad_(False)
        yield
    finally:
        for q, f in zip(params, flags):
            q.requires_grad_(f)


def _bar_off(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None = a bar only on a terminal."""
    return None if progress is None else not progress


class _Sampler:
    """``B`` positions per step from a fresh seeded permutation every epoch."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.n, self.gen = n, gen
        self.order = torch.randperm(n, generator=gen)
        self.at = 0

    def take(self, b: int) -> torch.Tensor:
        parts = []
        while b > 0:
            if self.at == self.n:
                self.order, self.at = torch.randperm(self.n, generator=self.gen), 0
            k = min(b, self.n - self.at)
            parts.append(self.order[self.at : self.at + k])
            self.at += k
            b -= k
        return torch.cat(parts)


def _model_dtype(adapter: Adapter) -> torch.dtype:
    w = getattr(adapter.head, "weight", None)
    return w.dtype if w is not None and torch.is_floating_point(w) else torch.float32


def lens_loss(adapter: Adapter, lens: TunedLens, hidden: torch.Tensor, *, rows_per_matmul: int = 1024,
              backward: bool = True) -> torch.Tensor:
    """Mean KL(final ‖ tuned_k) per layer k over the positions of ``hidden`` ((L+1, B, d),
    layer L the model's last hidden state); with ``backward``, gradients accumulate into the
    lens layer group by layer group (the head's activations for all layers never coexist)."""
    L, B, d = lens.num_layers, hidden.shape[1], hidden.shape[2]
    dev, dtype = lens.weight.device, _model_dtype(adapter)
    with torch.no_grad():
        zf = adapter.logits(adapter.prepare(hidden[L].to(dev, dtype), norm=False))
        logp_f = zf.sub_(zf.logsumexp(-1, keepdim=True))
        p_f = logp_f.exp()
        neg_ent = (p_f * logp_f).sum(-1)
        del zf, logp_f
    per_group = max(1, rows_per_matmul // B)
    losses = torch.zeros(L)
    for g0 in range(0, L, per_group):
        g1 = min(L, g0 + per_group)
        h = hidden[g0:g1].to(dev, torch.float32)
        with torch.set_grad_enabled(backward):
            t = h + torch.baddbmm(lens.bias[g0:g1].unsqueeze(1), h, lens.weight[g0:g1].transpose(1, 2))
            z = adapter.logits(adapter.prepare(t.reshape(-1, d).to(dtype))).view(g1 - g0, B, -1)
            loss = kl_from_logits(z, p_f, neg_ent).mean(1)
            if backward:
                loss.sum().backward()
        losses[g0:g1] = loss.detach().cpu()
        del z, t, loss
    return losses


def _optimizer(params: list[torch.nn.Parameter], name: str, lr: float, steps: int) -> tuple[Any, Any]:
    if name == "sgd":
        # tuned-lens: PyTorch's SGD effectively scales the step by 1 / (1 − β); undo that.
        opt = torch.optim.SGD(params, lr=lr * (1 - MOMENTUM), momentum=MOMENTUM, nesterov=True,
                              weight_decay=WEIGHT_DECAY)
        warmup = 0
    elif name == "adam":
        opt = torch.optim.Adam(params, lr=lr * 1e-3, betas=(MOMENTUM, 0.999), amsgrad=True, weight_decay=WEIGHT_DECAY)
        warmup = min(1000, steps // 5)
    else:
        raise ConfigError(f"unknown optimizer {name!r}", "use " + " or ".join(OPTIMIZERS))

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _check_training_args(steps: int, positions_per_step: int, lr: float, optimizer: str, **ints: int) -> None:
    for name, value in (("steps", steps), ("positions_per_step", positions_per_step), *ints.items()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            flag = name.replace("_", "-")
            raise ConfigError(f"{flag} must be a whole number >= 1, not {value!r}", f"pass --{flag} 1 or more")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the learning rate must be a positive number, not {lr!r}", "pass e.g. --lr 1.0")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}", "use " + " or ".join(OPTIMIZERS))


def fit_tuned_lens(
    adapter: Adapter,
    hidden: torch.Tensor,
    steps: int = 250,
    seed: int = 0,
    *,
    lr: float = 1.0,
    optimizer: str = "sgd",
    positions_per_step: int = 32,
    rows_per_matmul: int = 1024,
    model: dict[str, Any] | None = None,
    progress: bool | None = None,
    after_step: Callable[[int, TunedLens], None] | None = None,
) -> TunedLens:
    """Train translators on captured hidden states ``(L+1, N, d)`` (layer L: the model's last
    hidden state), as :func:`hidden_states_at` returns them. The model's weights get no
    gradients; only the head, final norm and logit post-processing of ``adapter`` are used.
    ``after_step(steps_done, lens)`` is called after every step (e.g. to evaluate on the way)."""
    from tqdm import tqdm

    _check_training_args(steps, positions_per_step, lr, optimizer, rows_per_matmul=rows_per_matmul)
    L = adapter.num_layers
    if hidden.dim() != 3 or hidden.shape[0] != L + 1 or hidden.shape[1] < 1:
        raise ValueError(f"hidden must be (L+1={L + 1}, N, d), got {tuple(hidden.shape)}")
    n, d = hidden.shape[1], hidden.shape[2]
    dev = next(iter(adapter.head.parameters())).device
    lens = TunedLens(L, d, model=model).to(dev)
    opt, sched = _optimizer([lens.weight, lens.bias], optimizer, float(lr), steps)
    sampler = _Sampler(n, torch.Generator().manual_seed(int(seed)))
    B = min(positions_per_step, n)
    tail = max(1, steps // 10)
    first = torch.zeros(L)
    last = torch.zeros(L)
    t1 = time.perf_counter()
    with _frozen(adapter.model):
        bar = tqdm(range(steps), desc="training tuned lens", unit="step", disable=_bar_off(progress), file=sys.stderr)
        for step in bar:
            idx = sampler.take(B)
            opt.zero_grad(set_to_none=False)
            losses = lens_loss(adapter, lens, hidden[:, idx], rows_per_matmul=rows_per_matmul)
            if not torch.isfinite(losses).all():
                raise ConfigError(f"training diverged at step {step + 1}: the KL is not finite",
                                  "lower --lr (or use --optimizer adam)")
            torch.nn.utils.clip_grad_norm_([lens.weight, lens.bias], CLIP_NORM)
            opt.step()
            sched.step()
            if step == 0:
                first = losses.clone()
            if step >= steps - tail:
                last += losses / tail
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(kl=f"{float(losses.mean()):.3f}")
            if after_step is not None:
                after_step(step + 1, lens)
    train_s = time.perf_counter() - t1
    lens = lens.cpu()
    lens.training_info = {
        "steps": steps,
        "seed": int(seed),
        "optimizer": optimizer,
        "lr": float(lr),
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "clip_grad_norm": CLIP_NORM,
        "schedule": "linear decay to 0" + (", warm-up over the first fifth" if optimizer == "adam" else ""),
        "loss": "sum over layers of mean KL(final ‖ tuned_k), current-token distribution",
        "positions_per_step": B,
        "positions": n,
        "kl_first_step": [round(float(v), 6) for v in first],
        "kl_last_steps": [round(float(v), 6) for v in last],
        "train_s": round(train_s, 3),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return lens


def train_tuned_lens(
    bundle: Any,
    sequences: Sequence[Sequence[int]],
    steps: int = 250,
    seed: int = 0,
    *,
    lr: float = 1.0,
    optimizer: str = "sgd",
    positions_per_step: int = 32,
    batch_size: int = 8,
    rows_per_matmul: int = 1024,
    progress: bool | None = None,
    log: Log | None = None,
) -> TunedLens:
    """Train a tuned lens for ``bundle``'s model on ``sequences`` (lists of token ids): capture
    the hidden states of every layer once (each distinct prefix once), then
    :func:`fit_tuned_lens`.

    Deterministic for a seed (the positions sampled; the weights start at zero): on the CPU the
    same seed, data and thread count give byte-identical weights. ``progress``: tqdm bars on
    stderr (None: only on a terminal). Timings and per-layer training KL land in
    ``lens.training_info``.
    """
    _check_training_args(steps, positions_per_step, lr, optimizer, batch_size=batch_size,
                         rows_per_matmul=rows_per_matmul)
    say = log or (lambda _m: None)
    L = bundle.adapter.num_layers
    seqs = [list(s) for s in sequences if len(s)]
    if not seqs:
        raise ConfigError("no token sequences to train the tuned lens on", "pass prompts with text")
    t0 = time.perf_counter()
    keep = unique_positions(seqs)
    n_all = sum(map(len, seqs))
    n = sum(map(len, keep))
    say(f"capturing hidden states: {len(seqs)} sequences, {n} distinct positions ({n_all - n} repeated prefixes "
        f"skipped), {L + 1} layers …")
    hidden = hidden_states_at(bundle, seqs, keep, batch_size=batch_size, progress=progress)
    capture_s = time.perf_counter() - t0
    say(f"training {L} translators ({hidden.shape[-1]}×{hidden.shape[-1]}): {steps} steps × "
        f"{min(positions_per_step, n)} positions …")
    lens = fit_tuned_lens(bundle.adapter, hidden, steps, seed, lr=lr, optimizer=optimizer,
                          positions_per_step=positions_per_step, rows_per_matmul=rows_per_matmul,
                          model=model_identity(bundle), progress=progress)
    lens.training_info.update(sequences=len(seqs), repeated_prefix_positions=n_all - n, capture_s=round(capture_s, 3))
    return lens


# --------------------------------------------------------------------------------------------
# The ``layerwise train-lens`` command


def train_lens_command(
    *,
    load: Any = None,
    output: str,
    prompts: str | None = None,
    limit: int | None = None,
    skip: int = 0,
    prompt_format: str = "alpaca",
    max_new_tokens: int = 64,
    steps: int = 250,
    seed: int = 0,
    lr: float = 1.0,
    optimizer: str = "sgd",
    positions_per_step: int = 32,
    force: bool = False,
    log: Log | None = None,
) -> Path:
    """Everything ``layerwise train-lens`` does: check the inputs and the output folder before
    loading the model (``load``: a :class:`layerwise.config.LoadConfig`, default the default
    model), build the sequences, train, write. Returns the folder written."""
    from .compat import context_length
    from .config import LoadConfig
    from .data import PROMPT_FORMATS, default_prompts_path, format_prompt, load_examples
    from .models import load_model

    say = log or (lambda _m: None)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ConfigError(f"--skip must be a whole number >= 0, not {skip!r}", "pass --skip 0 or more")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be a whole number >= 0, not {max_new_tokens!r}",
                          "pass 0 (no generations) or more")
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"unknown prompt format {prompt_format!r}", "use one of: " + ", ".join(PROMPT_FORMATS))
    for name, value in (("steps", steps), ("positions-per-step", positions_per_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a whole number >= 1, not {value!r}", f"pass --{name} 1 or more")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr must be a positive number, not {lr!r}", "pass e.g. --lr 1.0")
    load = load if load is not None else LoadConfig()
    load.validate()
    data_path = Path(prompts) if prompts else default_prompts_path()
    examples = load_examples(data_path)
    data_sha256 = examples.sha256
    if skip >= len(examples):
        raise ConfigError(f"--skip {skip} leaves no rows: {data_path} has {len(examples)}",
                          f"pass --skip below {len(examples)}")
    examples = examples[skip:]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"--limit must be a positive number of rows, not {limit!r}", "pass --limit 1 or more")
        examples = examples[:limit]
    check_output_folder(output, None, force=force)

    say(f"loading model {load.model} …")
    bundle = load_model(load.model, **load.kwargs())
    check_output_folder(output, model_identity(bundle), force=force)
    tok = bundle.tokenizer
    texts = [format_prompt(ex, prompt_format, tok) for ex in examples]
    special = prompt_format != "chat"
    ctx = context_length(bundle.model)
    if ctx is not None:
        for ex, text in zip(examples, texts):
            n = len(tok.encode(text, add_special_tokens=special))
            if n + max_new_tokens > ctx:
                raise ConfigError(f"row {ex.index} of {data_path}: its prompt is {n} tokens; with {max_new_tokens} more "
                                  f"it exceeds the model's context of {ctx} tokens",
                                  "shorten or drop that row, or lower --max-new-tokens")
    seqs = training_sequences(bundle, texts, [ex.reference for ex in examples], add_special_tokens=special,
                              max_new_tokens=max_new_tokens, max_reference_tokens=min(256, ctx or 256), log=say)
    if ctx is not None:
        seqs = [s[:ctx] for s in seqs]
    lens = train_tuned_lens(bundle, seqs, steps, seed, lr=lr, optimizer=optimizer,
                            positions_per_step=positions_per_step, log=say)
    lens.training_info["data"] = {
        "path": str(data_path) if prompts else "layerwise.fixtures/alpaca_cleaned_sample.jsonl",
        "sha256": data_sha256,
        "first_row": examples[0].index,
        "rows": len(examples),
        "prompt_format": prompt_format,
        "max_new_tokens": max_new_tokens,
        "sequences": "prompt | reference, and prompt | greedy continuation" if max_new_tokens else "prompt | reference",
    }
    replace = Path(output).is_dir() and any(Path(output).iterdir())
    out = lens.save(output, replace=replace)
    info = lens.training_info
    say(f"trained in {info['train_s']:.1f} s (+{info['capture_s']:.1f} s capturing {info['positions']} positions); "
        f"mean training KL {sum(info['kl_first_step']) / len(info['kl_first_step']):.3f} → "
        f"{sum(info['kl_last_steps']) / len(info['kl_last_steps']):.3f} nats")
    return out
