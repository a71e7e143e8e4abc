"""Benchmark: the tuned lens against the logit lens on held-out rows, and its CPU training time.

    python bench/tuned_lens.py                           # default model, train rows 20..61, measure rows 0..19
    python bench/tuned_lens.py --steps 100,250 --positions-per-step 32
    python bench/tuned_lens.py --states /tmp/states.pt   # keep the captured training states between runs
    python bench/tuned_lens.py --eval-at 25,50,100       # also the held-out KL on the way

Training data: for every training row, ``prompt | reference`` and ``prompt | the model's own
greedy continuation`` (--max-new-tokens), the default of ``layerwise train-lens``. Measurement:
the teacher-forced positions of a run (last prompt position and the reference's first
--teacher-forced-tokens tokens) of the held-out rows, every statistic computed by
``layerwise.lens.layer_stats`` on the raw hidden states (logit lens) and on the translated ones
(tuned lens). Prints per layer the mean KL to the final layer, top-1 agreement with the final
layer and the cross-entropy of the true next token, for both lenses, and every time measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _rows(text: str) -> slice:
    a, _, b = text.partition(":")
    return slice(int(a) if a else None, int(b) if b else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-rows", default="20:", help="rows to train on, START:STOP (default 20: = 20..61)")
    ap.add_argument("--eval-rows", default=":20", help="held-out rows to measure on (default :20 = 0..19)")
    ap.add_argument("--prompt-format", default="alpaca")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens generated per training row")
    ap.add_argument("--teacher-forced-tokens", type=int, default=32)
    ap.add_argument("--steps", default="250", help="comma-separated: one training per value")
    ap.add_argument("--positions-per-step", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    ap.add_argument("--eval-at", default="", help="comma-separated step counts: also print the held-out mean KL "
                    "after these steps (training time excludes these evaluations)")
    ap.add_argument("--states", help="a .pt file: load the captured training states from it, or save them there")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--save", help="write the (last) trained lens to this new folder")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from layerwise.data import default_prompts_path, format_prompt, load_examples
    from layerwise.lens import layer_stats
    from layerwise.models import load_model
    from layerwise.tuned import model_identity
    from layerwise.tuned_train import (fit_tuned_lens, hidden_states_at, teacher_forced_states, training_sequences,
                                       unique_positions)

    t = time.perf_counter()
    bundle = load_model(args.model)
    tok, adapter = bundle.tokenizer, bundle.adapter
    L = adapter.num_layers
    print(f"model {args.model}: {L} blocks, hidden {bundle.info['hidden_size']}, vocab {bundle.info['vocab_size']}; "
          f"loaded in {time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()}")
    examples = load_examples(default_prompts_path())
    train, held = examples[_rows(args.train_rows)], examples[_rows(args.eval_rows)]
    assert not {e.index for e in train} & {e.index for e in held}, "training and held-out rows overlap"
    print(f"train rows {train[0].index}..{train[-1].index} ({len(train)}), held-out rows {held[0].index}.."
          f"{held[-1].index} ({len(held)}), prompt format {args.prompt_format}")

    states_file = Path(args.states) if args.states else None
    if states_file is not None and states_file.is_file():
        hidden = torch.load(states_file)
        print(f"training states loaded from {states_file}: {tuple(hidden.shape)}")
    else:
        t = time.perf_counter()
        texts = [format_prompt(e, args.prompt_format, tok) for e in train]
        seqs = training_sequences(bundle, texts, [e.reference for e in train], max_new_tokens=args.max_new_tokens)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        keep = unique_positions(seqs)
        hidden = hidden_states_at(bundle, seqs, keep)
        cap_s = time.perf_counter() - t
        print(f"training data: {len(seqs)} sequences, {sum(map(len, seqs))} tokens, {hidden.shape[1]} distinct "
              f"positions; greedy generation {gen_s:.1f} s, capture of {L + 1} layers {cap_s:.1f} s")
        if states_file is not None:
            torch.save(hidden, states_file)

    fmt_ids = [tok.encode(format_prompt(e, args.prompt_format, tok)) for e in held]
    ref_ids = [tok.encode(e.reference, add_special_tokens=False)[: args.teacher_forced_tokens] for e in held]
    h_eval, targets = teacher_forced_states(bundle, fmt_ids, ref_ids)
    logit = layer_stats(adapter, h_eval, targets)
    print(f"held-out positions: {targets.numel()}")

    eval_at = {int(s) for s in args.eval_at.split(",") if s}
    eval_s = [0.0]

    def probe(done: int, lens: object) -> None:
        if done not in eval_at:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            st = layer_stats(adapter, lens.translate_layers(h_eval), targets)
        kl = st.kl_to_final[:L].mean(1)
        print(f"  after {done} steps: held-out KL mean over layers 0..{L - 1} {kl.mean():.3f} (logit lens "
              f"{logit.kl_to_final[:L].mean():.3f}); layers {L // 2}..{L - 1}: {kl[L // 2:].mean():.3f}", flush=True)
        eval_s[0] += time.perf_counter() - t0

    results = []
    for steps in [int(s) for s in args.steps.split(",")]:
        eval_s[0] = 0.0
        t_fit = time.perf_counter()
        lens = fit_tuned_lens(adapter, hidden, steps, args.seed, lr=args.lr, optimizer=args.optimizer,
                              positions_per_step=args.positions_per_step, model=model_identity(bundle),
                              after_step=probe)
        lens.training_info["train_s"] = round(time.perf_counter() - t_fit - eval_s[0], 3)
        tuned = layer_stats(adapter, lens.translate_layers(h_eval), targets)
        info = lens.training_info
        results.append((steps, lens, tuned))
        print(f"\n## {steps} steps × {info['positions_per_step']} positions, {args.optimizer}, lr {args.lr}, seed "
              f"{args.seed}: trained in {info['train_s']:.1f} s ({info['train_s'] / steps:.2f} s/step, "
              f"{info['threads']} threads)")
        print("| layer | KL logit | KL tuned | top-1 agree logit | top-1 agree tuned | xent logit | xent tuned "
              "| train KL first step | train KL last 10% |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in range(L + 1):
            first = info["kl_first_step"][k] if k < L else 0.0
            last = info["kl_last_steps"][k] if k < L else 0.0
            print(f"| {k} | {logit.kl_to_final[k].mean():.3f} | {tuned.kl_to_final[k].mean():.3f} | "
                  f"{logit.top1_agree[k].mean():.2f} | {tuned.top1_agree[k].mean():.2f} | "
                  f"{logit.xent[k].nanmean():.2f} | {tuned.xent[k].nanmean():.2f} | {first:.3f} | {last:.3f} |")
        lo, tu = logit.kl_to_final[:L].mean(), tuned.kl_to_final[:L].mean()
        print(f"mean over layers 0..{L - 1}: KL logit {lo:.3f}, tuned {tu:.3f} (ratio {tu / lo:.3f}); "
              f"layers {L // 2}..{L - 1}: logit {logit.kl_to_final[L // 2:L].mean():.3f}, "
              f"tuned {tuned.kl_to_final[L // 2:L].mean():.3f}")
    if args.save:
        out = results[-1][1].save(args.save)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
