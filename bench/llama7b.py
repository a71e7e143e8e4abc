"""The headline command's shape without a hub: a Llama-2-7B-shaped model with random weights.

Builds (once) a folder with a Llama-2-7B-shaped checkpoint — 32 blocks, hidden 4096, MLP 11008,
32 heads, random bfloat16 weights in one safetensors file per block — and the default model's
tokenizer (so its vocabulary, 49,152, is the head's width). Then runs the real command line on it,
each configuration in its own process, as a user would::

    layerwise run --model=FOLDER [--load-in-4bit | --dtype bfloat16] --limit 2 --max-new-tokens 8 \
        --exit-layers 8,16,24,32

and prints, per configuration, the time of every phase (from the results JSON) and the process's
memory sampled every 20 ms from ``/proc/PID/status``: the anonymous peak (``RssAnon``: what the
process itself holds) against the weights' size in memory (``weight_bytes`` of the results), and
the file-backed peak (``RssFile``: pages of the mapped safetensors, which the kernel drops under
pressure and which need no swap).

Run (after ``scripts/setup.sh``; ~14 GB of disk for the folder, ~25 min on 2 CPU cores)::

    .venv/bin/python bench/llama7b.py                         # builds into ~/.cache/layerwise/bench/
    .venv/bin/python bench/llama7b.py --configs 4bit          # one configuration
    .venv/bin/python bench/llama7b.py --device cuda           # on a GPU machine: also the decode floor
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 1 << 30
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
CONFIGS = {
    "bf16": ["--dtype", "bfloat16"],
    "4bit": ["--load-in-4bit"],
}


def default_folder() -> Path:
    root = Path(os.environ.get("LAYERWISE_CACHE") or Path.home() / ".cache" / "layerwise")
    return root / "bench" / "llama2-7b-shape"


def build(folder: Path, seed: int = 0) -> None:
    """Write the random checkpoint into a temporary folder beside ``folder``, then rename it."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from layerwise.models import load_model

    tok = load_model("smollm2-135m", device="cpu").tokenizer  # the default model's tokenizer
    vocab = len(tok)
    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="bfloat16", **SHAPE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    gen = torch.Generator().manual_seed(seed)
    h, m, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    weight_map: dict[str, str] = {}
    total = 0

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    t0 = time.perf_counter()
    write("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                "lm_head.weight": rand(vocab, h)})
    out_std = 0.02 / (2 * L) ** 0.5  # residual branches scaled as GPT-2 does, so the stream stays bounded
    for i in range(L):
        p = f"model.layers.{i}."
        write(f"block-{i:02d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
            p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h, std=out_std),
            p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
            p + "mlp.down_proj.weight": rand(h, m, std=out_std),
        })
        print(f"  wrote block {i + 1}/{L} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    print(f"built {folder}: {total / GiB:.2f} GiB of bfloat16 safetensors in {time.perf_counter() - t0:.0f} s", flush=True)


class Sampler(threading.Thread):
    """Polls /proc/PID/status; keeps the peaks of RssAnon and RssFile, and when the anon peak was."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_anon = self.peak_file = self.peak_rss = self.peak_rss_run = 0
        self.loaded = False  # set once the load's line is printed: the run's own peak starts there
        self.peak_anon_at = 0.0
        self.t0 = time.perf_counter()
        self.stop = threading.Event()

    def read(self) -> tuple[int, int] | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        kb = {k: int(v) for k, v in re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", text, re.M)}
        return kb.get("RssAnon", 0) * 1024, kb.get("RssFile", 0) * 1024

    def run(self) -> None:
        while not self.stop.is_set():
            got = self.read()
            if got:
                anon, file = got
                if anon > self.peak_anon:
                    self.peak_anon, self.peak_anon_at = anon, time.perf_counter() - self.t0
                self.peak_file = max(self.peak_file, file)
                self.peak_rss = max(self.peak_rss, anon + file)
                if self.loaded:
                    self.peak_rss_run = max(self.peak_rss_run, anon + file)
            time.sleep(self.every)


def run_config(name: str, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    exe = Path(sys.executable).with_name("layerwise")
    cmd = [str(exe), "run", f"--model={folder}", *CONFIGS[name], "--limit", str(args.limit),
           "--max-new-tokens", str(args.tokens), "--exit-layers", args.exits, "--device", args.device,
           f"--results-json={out / (name + '.json')}", f"--report={out / (name + '.html')}"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    marks: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        marks.append((time.perf_counter() - sampler.t0, line.rstrip()))
        sampler.loaded = sampler.loaded or line.startswith("layerwise: load ")
        if line.strip() and "Loading weights" not in line:  # transformers' loading bar: one line per tensor
            print("   " + line.rstrip(), flush=True)
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{name}: layerwise run exited {rc}")
    res = json.loads((out / (name + ".json")).read_text())
    # The phase whose end line comes first after the anon peak is where the peak was.
    phase = next((ln.split()[1] for t, ln in marks if t >= sampler.peak_anon_at and re.match(r"layerwise: \w+ [\d.]+ s", ln)), "?")
    return {"config": name, "wall_s": wall, "timing": res["timing"], "weight_bytes": res["run"]["model"]["weight_bytes"],
            "dtype": res["run"]["model"]["dtype"], "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file, "peak_rss": sampler.peak_rss, "peak_rss_run": sampler.peak_rss_run,
            "peak_phase": phase}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=default_folder(), help="where the random checkpoint is (built if absent)")
    ap.add_argument("--rebuild", action="store_true", help="build the checkpoint again")
    ap.add_argument("--configs", default="bf16,4bit", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--exits", default="8,16,24,32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs' results and reports (default: a temporary one)")
    args = ap.parse_args()
    if args.rebuild or not (args.folder / "model.safetensors.index.json").exists():
        build(args.folder)
    out = args.out or Path(tempfile.mkdtemp(prefix="llama7b-"))
    out.mkdir(parents=True, exist_ok=True)
    mem_total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    disk = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    print(f"model: {args.folder} ({disk / GiB:.2f} GiB of safetensors); machine: {os.cpu_count()} CPUs, {mem_total / GiB:.1f} GiB")
    rows = [run_config(c, args.folder, out, args) for c in args.configs.split(",")]
    print()
    print("| config | dtype in memory | load | lens | generate | forecast | metrics | total | weights | anon peak | file-backed peak | resident peak | resident − weights | anon peak in |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = r["timing"]
        print(f"| {r['config']} | {r['dtype']} | {t['load_s']:.1f} s | {t['lens_s']:.1f} s | {t['generate_s']:.1f} s | "
              f"{t.get('forecast_s', 0):.1f} s | {t['metrics_s']:.1f} s | {t['total_s']:.1f} s | {r['weight_bytes'] / GiB:.2f} GiB | "
              f"{r['peak_anon'] / GiB:.2f} GiB | {r['peak_file'] / GiB:.2f} GiB | {r['peak_rss'] / GiB:.2f} GiB | "
              f"{(r['peak_rss'] - r['weight_bytes']) / GiB:+.2f} GiB | {r['peak_phase']} |")
    print("(weights quantized or cast at load live in anonymous memory; weights read in their file's dtype stay mapped "
          "from the safetensors: file-backed, reclaimable, read again from disk when evicted)")
    for r in rows:
        print(f"anon_over_weights_{r['config']} = {(r['peak_anon'] - r['weight_bytes']) / GiB:.2f}  (target <= 1 GiB where the weights are anonymous)")
        print(f"resident_after_load_{r['config']} = {r['peak_rss_run'] / GiB:.2f} GiB  (what lens and generation keep resident; "
              "the load also maps the whole file once, which the kernel may evict)")
        print(f"fits_16GB_{r['config']} = {r['peak_rss_run'] + GiB <= 16 * 10**9 and r['peak_anon'] + GiB <= 16 * 10**9}  "
              "(anon peak, and resident peak after the load, + 1 GiB for the OS, against 16 GB)")


if __name__ == "__main__":
    main()
