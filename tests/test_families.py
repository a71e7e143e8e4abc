"""Every model type transformers maps to ``AutoModelForCausalLM``, on a tiny random model of it.

For each family (tests/tiny_families.py builds the model):

1. the load-time proof (:func:`layerwise.proof.proven_adapter`, through ``bundle_from_model``)
   proves or refuses the lens;
2. the lens at every layer k < L equals the logits of a copy of the model cut to its first k
   blocks (``truncated_copy``), and ``run_lens`` runs on a left-padded batch;
3. early exit at every layer equals the cut copy's own ``generate`` (greedy, the library's
   generation defaults cleared), token for token — once for two left-padded prompts decoded
   together and once for each prompt alone; a token that ends one row early makes the decode
   drop finished rows, so that path is covered too. Where ``generate`` cannot run a cut copy
   (a hybrid stack cut to state-space blocks only), the reference is the copy's own forward
   without a cache, token by token.

What it sees must match the data in :mod:`layerwise.families` (and ``NO_TINY_MODEL`` here), and
the table it writes must match docs/architectures.md: regenerate the page with
``python tests/test_families.py`` (from the repository root).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_families import LAYERS, NO_TINY_MODEL, VOCAB, build  # noqa: E402
from tiny_models import TinyTokenizer, truncated_copy  # noqa: E402

from layerwise import families  # noqa: E402
from layerwise.archs import ARCHITECTURES  # noqa: E402
from layerwise.errors import UnsupportedArchitectureError  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
N_NEW = 6
PROMPT_LENGTHS = (5, 11)  # both longer than the tiny sliding windows (4 tokens)
LENS_TOL = 1e-4
EOS = 2
EXACT, UNPADDED, REFUSED, NONE = "exact", "exact, one prompt at a time", "refused", "—"
PROVEN, PROVEN_AT_L = "proven", "proven at L"


def all_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@dataclass(frozen=True)
class Row:
    family: str
    cls: str
    parts: str
    lens: str
    early_exit: str
    why: str

    def markdown(self) -> str:
        cells = (f"`{self.family}`", self.cls, self.parts, self.lens, self.early_exit, self.why or "")
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


@dataclass
class Seen:
    """One family as the test saw it: the table row, plus what the data must say about it."""

    row: Row
    detail: str = ""  # the observed error or mismatch, for failure messages
    lens_refused: bool = False
    early_exit: str = NONE  # EXACT | UNPADDED | REFUSED | NONE


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _reference(ref, prompt: list[int], eos: list[int]) -> list[int]:
    """Greedy tokens of the cut copy: its ``generate`` with the library's generation defaults
    cleared (no forced EOS, no suppressed tokens); where generate cannot run the copy, its forward
    without a cache, one token at a time."""
    from transformers import GenerationConfig

    x = torch.tensor([prompt])
    ref.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=eos)
    try:
        with torch.no_grad():
            out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_NEW)
        return out[0, len(prompt):].tolist()
    except Exception:  # noqa: BLE001 - e.g. a hybrid stack cut to its state-space blocks only
        toks: list[int] = []
        with torch.no_grad():
            while len(toks) < N_NEW and not (toks and toks[-1] in eos):
                y = torch.tensor([prompt + toks])
                toks.append(int(ref(input_ids=y, attention_mask=torch.ones_like(y), use_cache=False).logits[0, -1].argmax()))
        return toks


def _lens_at(bundle, prompt: list[int], k: int) -> torch.Tensor:
    """Layer k of the lens for one unpadded prompt, read the way the lens reads it."""
    from layerwise.compat import accepts, position_ids_from_mask
    from layerwise.lens import capture_hidden

    ad = bundle.adapter
    x = torch.tensor([prompt])
    m = torch.ones_like(x)
    extra = {"position_ids": position_ids_from_mask(m)} if accepts(ad.decoder, "position_ids") else {}
    with torch.no_grad(), capture_hidden(ad) as store:
        ad.decoder(input_ids=x, attention_mask=m, use_cache=False, **extra)
        return ad.unembed(store[k], norm=True)[0]


def survey(family: str) -> Seen:
    from layerwise.decoding import Decoding, generate_exits
    from layerwise.lens import run_lens
    from layerwise.models import bundle_from_model

    if family in NO_TINY_MODEL:
        try:
            build(family)
        except Exception:  # noqa: BLE001 - expected: the config cannot be made offline
            return Seen(Row(family, NONE, NONE, NONE, NONE, f"no tiny model: {NO_TINY_MODEL[family]}"))
        return Seen(Row(family, "?", "?", "?", "?", "builds now"), detail="it builds now: take it out of NO_TINY_MODEL")
    try:
        model = build(family)
    except Exception as exc:  # noqa: BLE001 - reported as a mismatch with NO_TINY_MODEL
        return Seen(Row(family, "?", "?", "?", "?", "cannot be built"), detail=f"building it fails: {_line(exc)}")
    cls = type(model).__name__
    try:
        bundle = bundle_from_model(model, TinyTokenizer(), name=f"tiny-{family}")
    except UnsupportedArchitectureError as exc:
        why = families.LENS_REFUSED.get(family, "")
        return Seen(Row(family, cls, NONE, REFUSED, NONE, why), detail=str(exc), lens_refused=True)
    proof = bundle.info["lens_proof"]
    parts = proof["parts"]
    spec = bundle.adapter.spec
    L = bundle.num_layers
    prompts = _prompts()

    # 2. The lens against copies cut to k blocks.
    cut: dict[int, object] = {}
    for k in range(1, L + 1):
        try:
            cut[k] = truncated_copy(model, k, spec)
        except Exception as exc:  # noqa: BLE001
            return Seen(Row(family, cls, parts, "?", "?", "cut copy fails"), detail=f"truncated_copy at {k}: {_line(exc)}")
    lens_note = ""
    for k in range(1, L):
        for p in prompts:
            x = torch.tensor([p])
            try:
                with torch.no_grad():
                    want = cut[k](input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float()
            except Exception as exc:  # noqa: BLE001 - the cut copy itself cannot run
                lens_note = f"a copy cut to fewer blocks cannot run ({_line(exc)[:60]}…): layers below L rest on the load proof"
                break
            got = _lens_at(bundle, p, k)
            tol = LENS_TOL * max(1.0, float(want.abs().max()))
            d = float((got - want).abs().max())
            if not d <= tol:
                return Seen(Row(family, cls, parts, "WRONG", "?", f"layer {k} differs from the {k}-block copy"),
                            detail=f"lens at layer {k} differs from the {k}-block copy by {d:.3g} (tolerance {tol:.2g})")
        if lens_note:
            break
    ids, mask = _left_pad(prompts)
    try:
        run_lens(bundle, ids, mask, top_k=2)
    except Exception as exc:  # noqa: BLE001
        return Seen(Row(family, cls, parts, "FAILS", "?", "run_lens fails"), detail=f"run_lens on a padded batch: {_line(exc)}")

    # 3. Early exit against the cut copies' generate.
    if lens_note:
        why = families.EARLY_EXIT_REFUSED.get(family, "")
        return Seen(Row(family, cls, parts, PROVEN_AT_L, REFUSED, why), detail=lens_note, early_exit=REFUSED)
    eos = [EOS]
    try:
        first = _reference(cut[1], prompts[0], eos)
        if len(first) >= 3 and first[2] != EOS:
            eos = [EOS, first[2]]  # exit 1 on prompt 0 ends at its third token: finished rows get dropped
        want = {k: [_reference(cut[k], p, eos) for p in prompts] for k in range(1, L + 1)}
    except Exception as exc:  # noqa: BLE001 - no reference to prove early exit against
        why = families.EARLY_EXIT_REFUSED.get(family, "")
        return Seen(Row(family, cls, parts, PROVEN, REFUSED, why), detail=f"the cut copy cannot generate: {_line(exc)}",
                    early_exit=REFUSED)
    model.generation_config.eos_token_id = eos
    exits = list(range(1, L + 1))
    dec = Decoding(max_new_tokens=N_NEW)

    def mismatch(tokens: dict, rows: list[int]) -> str:
        for k in exits:
            for j, i in enumerate(rows):
                if tokens[k][j] != want[k][i]:
                    return f"exit {k}, prompt {i}: {tokens[k][j]} != the {k}-block copy's {want[k][i]}"
        return ""

    problems = {}
    try:
        g = generate_exits(bundle, ids, mask, exits, dec, verify_family=False)
        problems["batched"] = mismatch(g.tokens, [0, 1])
    except Exception as exc:  # noqa: BLE001
        problems["batched"] = f"decoding raises {_line(exc)}"
    single = ""
    for i, p in enumerate(prompts):
        x = torch.tensor([p])
        try:
            g = generate_exits(bundle, x, torch.ones_like(x), exits, dec, verify_family=False)
            single = single or mismatch(g.tokens, [i])
        except Exception as exc:  # noqa: BLE001
            single = single or f"decoding raises {_line(exc)}"
    problems["alone"] = single
    if not problems["batched"] and not problems["alone"]:
        status, why = EXACT, ""
    elif not problems["alone"]:
        status, why = UNPADDED, families.EARLY_EXIT_UNPADDED.get(family, "")
    else:
        status, why = REFUSED, families.EARLY_EXIT_REFUSED.get(family, "")
    detail = "; ".join(f"{k}: {v}" for k, v in problems.items() if v)
    return Seen(Row(family, cls, parts, PROVEN, status, why), detail=detail, early_exit=status)


# ----------------------------------------------------------------------------------------------
# The page


HEADER = """# Architectures

<!-- Generated by tests/test_families.py — do not edit. Regenerate: python tests/test_families.py -->

Every model type transformers {version} maps to `AutoModelForCausalLM`, each tried on a tiny
random model ({layers} blocks; tests/tiny_families.py): the load-time proof of the lens, the lens
at every layer against a copy of the model cut to that many blocks, and early exit at every layer
against that copy's own `generate`, token for token, with two prompts decoded together (left
padded) and each alone.

- **parts**: where the blocks, final norm and head came from — a row of `layerwise.archs`
  (*table*) or the model's own structure (*discovered*, `layerwise.discover`).
- **lens**: *proven* — the proof at load passed and every layer equalled the cut copy;
  *proven at L* — the proof passed, but no cut copy can run to check the layers below;
  *refused* — the proof refuses it, so layerwise refuses the model (before loading weights).
- **early exit**: *exact*; *exact, one prompt at a time* — left padding changes the model's
  outputs, so layerwise decodes its prompts one by one; *refused* — refused before any compute,
  with the reason below (the lens still works).

{counts}

| model type | class | parts | lens | early exit | why not |
| --- | --- | --- | --- | --- | --- |
"""


def counts(rows: list[Row]) -> str:
    n = len(rows)
    tried = [r for r in rows if r.lens != NONE]
    proven = [r for r in rows if r.lens in (PROVEN, PROVEN_AT_L)]
    table = sum(r.parts == "table" for r in proven)
    exact = sum(r.early_exit == EXACT for r in rows)
    unpadded = sum(r.early_exit == UNPADDED for r in rows)
    return (f"**{n} model types; {len(tried)} with a tiny model; lens proven for {len(proven)} "
            f"({table} from the table, {len(proven) - table} discovered; {sum(r.lens == PROVEN_AT_L for r in rows)} "
            f"of them checked at layer L only), refused for "
            f"{sum(r.lens == REFUSED for r in rows)}; early exit exact for {exact + unpadded} "
            f"({unpadded} of them one prompt at a time), refused for {sum(r.early_exit == REFUSED for r in rows)} "
            f"with a reason; no tiny model for {n - len(tried)}.**")


def render(rows: list[Row]) -> str:
    head = HEADER.format(version=transformers.__version__, layers=LAYERS, counts=counts(rows))
    return head + "".join(r.markdown() + "\n" for r in rows)


def committed_rows() -> dict[str, str]:
    if not DOC.is_file():
        return {}
    return {m.group(1): line for line in DOC.read_text(encoding="utf-8").splitlines()
            if (m := re.match(r"\| `([^`]+)` \|", line))}


def _doc_version() -> str | None:
    m = re.search(r"Every model type transformers (\S+) maps", DOC.read_text(encoding="utf-8")) if DOC.is_file() else None
    return m.group(1) if m else None


REGENERATE = "regenerate it: python tests/test_families.py (from the repository root)"


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: threads only contend (several workers share the cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", all_families())
def test_family(family):
    seen = survey(family)
    row, detail = seen.row, seen.detail
    assert "?" not in (row.lens, row.early_exit) and row.lens not in ("WRONG", "FAILS"), f"{family}: {detail}"
    # The data in layerwise.families says what the test sees.
    assert seen.lens_refused == (family in families.LENS_REFUSED), (
        f"{family}: the proof {'refuses' if seen.lens_refused else 'proves'} its lens ({detail or 'ok'}); "
        f"{'add it to' if seen.lens_refused else 'take it out of'} layerwise.families.LENS_REFUSED")
    expected = (EXACT if family in families.EARLY_EXIT_EXACT else UNPADDED if family in families.EARLY_EXIT_UNPADDED
                else REFUSED if family in families.EARLY_EXIT_REFUSED else NONE)
    assert seen.early_exit == expected, (
        f"{family}: early exit is {seen.early_exit!r} ({detail or 'no mismatch'}) but layerwise.families says "
        f"{expected!r}; move it to the matching table there")
    if seen.early_exit == REFUSED:
        assert families.early_exit_refusal(family), f"{family}: early exit must be refused"
    if family in ARCHITECTURES:  # today's table rows: lens proven, early exit exact
        assert row.parts == "table" and row.lens == PROVEN and row.early_exit == EXACT, f"{family}: {row} {detail}"
    # The committed page says the same.
    if _doc_version() != transformers.__version__:
        pytest.skip(f"docs/architectures.md was made with transformers {_doc_version()}, this is {transformers.__version__}")
    committed = committed_rows().get(family)
    assert committed == row.markdown(), (
        f"docs/architectures.md is stale for {family}:\n  committed: {committed}\n  now:       {row.markdown()}\n{REGENERATE}")


def test_the_page_lists_every_family_and_its_counts():
    if _doc_version() != transformers.__version__:
        pytest.skip(f"docs/architectures.md was made with transformers {_doc_version()}, this is {transformers.__version__}")
    rows = committed_rows()
    assert sorted(rows) == all_families(), f"docs/architectures.md lists other families; {REGENERATE}"
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in rows.values()]
    parsed = [Row(c[0].strip("`"), *c[1:5], c[5] if len(c) > 5 else "") for c in cells]
    assert counts(parsed) in DOC.read_text(encoding="utf-8"), f"the counts on docs/architectures.md are stale; {REGENERATE}"


def test_data_tables_do_not_overlap():
    tables = {"LENS_REFUSED": set(families.LENS_REFUSED), "EARLY_EXIT_EXACT": set(families.EARLY_EXIT_EXACT),
              "EARLY_EXIT_UNPADDED": set(families.EARLY_EXIT_UNPADDED), "EARLY_EXIT_REFUSED": set(families.EARLY_EXIT_REFUSED)}
    names = list(tables)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not tables[a] & tables[b], f"{sorted(tables[a] & tables[b])} in both {a} and {b}"
    for name in ("LENS_REFUSED", "EARLY_EXIT_UNPADDED", "EARLY_EXIT_REFUSED"):
        assert all(isinstance(v, str) and v and "\n" not in v for v in getattr(families, name).values()), name


def main() -> None:
    """Survey every family and write docs/architectures.md (prints what disagrees with the data)."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    rows = []
    for family in all_families():
        seen = survey(family)
        rows.append(seen.row)
        print(f"{family:28s} {seen.row.lens:8s} {seen.row.early_exit:28s} {seen.detail[:150]}", flush=True)
    DOC.write_text(render(rows), encoding="utf-8")
    print(f"wrote {DOC}: {counts(rows)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
