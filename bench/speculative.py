"""Benchmark: the speculative-acceptance forecast against a real self-speculative run, in one run.

    python bench/speculative.py                        # default model, 10 rows, exits 8,15,23, γ = 4, 64 tokens
    python bench/speculative.py --rows 20 --exits 15,23 --gamma 2

For each exit k, transformers' own assisted decoding with ``assistant_early_exit=k`` (the draft is
the model's first k blocks, its final norm and its head; a constant draft of γ tokens, no
confidence cut-off) generates greedily for every row, one row at a time as transformers requires.
Counted from its candidate generator: tokens drafted and checked, tokens accepted, and full-model
forwards (one per draft). Printed beside layerwise's forecast (``layerwise.speculative``, teacher-
forced on the same rows' greedy text):

* ``α`` forecast vs measured (accepted / checked drafted tokens);
* ``E`` forecast, (1 − α^(γ+1)) / (1 − α), vs measured tokens per full-model forward.

It also checks what the comparison rests on: that the assisted output equals plain greedy
decoding, and that the draft is layerwise's early exit at k (the drafter's logits for its first
token against ``Adapter.unembed`` of layer k, and its first draft against ``generate_exits``).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Iterator


@contextlib.contextmanager
def counting(log: dict[str, Any]) -> Iterator[None]:
    """Count the candidate generator's drafts: ``drafted`` (tokens proposed), ``accepted``,
    ``checked`` (drafted tokens compared with the full model: accepted + the first rejected one),
    ``steps`` (full-model forwards), and keep the first draft's logits of each call."""
    from transformers.generation import candidate_generator as cg

    cls = cg.EarlyExitCandidateGenerator
    orig_get, orig_update = cls.get_candidates, cls.update_candidate_strategy

    def get_candidates(self: Any, input_ids: Any, **kw: Any) -> Any:
        ids, logits = orig_get(self, input_ids, **kw)
        self._lw_len = ids.shape[1] - input_ids.shape[1]
        if log.get("first_logits") is None and logits is not None:
            log["first_logits"] = logits[0, 0].float().clone()
            log["first_draft"] = ids[0, input_ids.shape[1]:].tolist()
        return ids, logits

    def update(self: Any, input_ids: Any, scores: Any, num_matches: int) -> Any:
        n = int(getattr(self, "_lw_len", 0))
        m = int(num_matches)
        log["steps"] += 1
        log["drafted"] += n
        log["accepted"] += min(m, n)
        log["checked"] += min(m + 1, n)
        return orig_update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update
    try:
        yield
    finally:
        cls.get_candidates, cls.update_candidate_strategy = orig_get, orig_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--exits", default="8,15,23")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from layerwise.config import Decoding, RunConfig
    from layerwise.data import default_prompts_path, load_examples
    from layerwise.decoding import generate_exits
    from layerwise.models import load_model
    from layerwise.runner import encode
    from layerwise.speculative import Rounds, acceptance, expected_tokens, simulate

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    model, tok, adapter = bundle.model, bundle.tokenizer, bundle.adapter
    L = adapter.num_layers
    exits = [int(x) for x in args.exits.split(",")]
    cfg = RunConfig(limit=args.rows, decoding=Decoding(max_new_tokens=args.tokens), bertscore_model=None)
    path = default_prompts_path()
    enc = encode(cfg, load_examples(path, args.rows), tok, model, path)
    prompts = enc.prompt_ids

    # The full model's greedy text, one row at a time, and each exit's own first tokens (for the draft check).
    t0 = time.perf_counter()
    greedy: list[list[int]] = []
    own: dict[int, list[list[int]]] = {k: [] for k in exits}
    for p in prompts:
        x = torch.tensor([p])
        g = generate_exits(bundle, x, torch.ones_like(x), sorted({*exits, L}), Decoding(max_new_tokens=args.tokens))
        greedy.append(g.tokens[L][0])
        for k in exits:
            own[k].append(g.tokens[k][0])
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    fc = acceptance(bundle, prompts, greedy, exits, gamma=args.gamma)
    t_fc = time.perf_counter() - t0
    print(f"{args.model}: {L} blocks, {len(prompts)} rows, {args.tokens} new tokens, γ = {args.gamma}; "
          f"forecast over {fc.positions} positions in {t_fc:.1f} s (multi-exit greedy decode {t_plain:.1f} s)")

    gc = model.generation_config
    saved = {k: getattr(gc, k, None) for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                                "assistant_confidence_threshold")}
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = args.gamma, "constant", 0.0
    rows = []
    try:
        for k in exits:
            log: dict[str, Any] = {"steps": 0, "drafted": 0, "accepted": 0, "checked": 0}
            sim = Rounds()
            rows_exact = 0
            same = 0
            new_tokens = 0
            draft_diff = None
            first_draft_ok = 0
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                x = torch.tensor([p])
                log["first_logits"] = None
                before = (log["steps"], log["checked"], log["accepted"])
                with counting(log), torch.inference_mode():
                    out = model.generate(x, attention_mask=torch.ones_like(x), assistant_early_exit=k, do_sample=False,
                                         max_new_tokens=args.tokens, pad_token_id=tok.pad_token_id)
                gen = out[0, len(p):].tolist()
                r = simulate(fc.flags[k][i], args.gamma, args.tokens)
                sim += r
                rows_exact += (r.steps, r.checked, r.accepted) == tuple(
                    a - b for a, b in zip((log["steps"], log["checked"], log["accepted"]), before))
                new_tokens += len(gen)
                same += gen == greedy[i]
                # the draft is layerwise's early exit at k: its first logits, and its first draft
                with torch.inference_mode():
                    h = adapter.forward(x, torch.ones_like(x), select=slice(-1, None))[k][:, 0]
                    ours = adapter.unembed(h, norm=True)[0]
                if log["first_logits"] is not None:
                    d = float((log["first_logits"] - ours).abs().max())
                    draft_diff = d if draft_diff is None else max(draft_diff, d)
                    first_draft_ok += log["first_draft"] == own[k][i][: len(log["first_draft"])]
            secs = time.perf_counter() - t0
            a_meas = log["accepted"] / log["checked"] if log["checked"] else float("nan")
            e_meas = new_tokens / log["steps"] if log["steps"] else float("nan")
            rows.append((k, fc.alpha[k], a_meas, fc.expected(k), expected_tokens(a_meas, args.gamma), e_meas,
                         same, draft_diff, first_draft_ok, log, secs, sim, rows_exact))
    finally:
        for key, v in saved.items():
            setattr(gc, key, v)

    n = len(prompts)
    print("\nexit | α forecast | α measured | E forecast | tokens per forward, measured | simulated from the forecast's "
          "positions | forwards measured / simulated | checked measured / simulated | accepted measured / simulated | "
          "rows counted exactly | s")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for k, af, am, ef, _eam, em, _same, _dd, _fd, log, secs, sim, exact in rows:
        e_sim = sim.tokens / sim.steps if sim.steps else float("nan")
        print(f"{k} | {af:.3f} | {am:.3f} | {ef:.3f} | {em:.3f} | {e_sim:.3f} | {log['steps']} / {sim.steps} | "
              f"{log['checked']} / {sim.checked} | {log['accepted']} / {sim.accepted} | {exact}/{n} | {secs:.1f}")
    print("\nexit | assisted output = plain greedy | first draft = layerwise's exit k | max abs(draft logits − lens at k)")
    print("--- | --- | --- | ---")
    for k, *_r in rows:
        same, dd, fd = _r[5], _r[6], _r[7]
        print(f"{k} | {same}/{n} rows | {fd}/{n} rows | {dd:.2g}")


if __name__ == "__main__":
    main()
