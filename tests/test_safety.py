"""Issue 12, the engine side: outputs never destroy a file, the results JSON and the report are
one set, write errors are one line, the GGUF cache heals, and inputs that pass the checks never
crash after the model has loaded. Each case of docs/errors.md added for it has a test here."""

from __future__ import annotations

import copy
import csv
import errno
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from layerwise import io as lw_io
from layerwise.cli import main
from layerwise.errors import ConfigError, DataError, LayerwiseError, ModelLoadError, OutputError
from layerwise.io import atomic_write_bytes, check_distinct, check_output, write_set

DATA = Path(__file__).parent / "data"
TINY = DATA / "results_tiny.json"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def one_line(err: LayerwiseError) -> str:
    msg = str(err)
    assert "\n" not in msg and err.problem and err.fix and msg == f"{err.problem} — {err.fix}", msg
    return msg


def cli_error(capsys) -> str:
    _out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerwise: error: ") and "Traceback" not in err, err
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(autouse=True)
def private_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_LOCK_DIR", str(tmp_path / "_locks"))


# ----------------------------------------------------------------------------------------------
# Outputs: only regular files are replaced


def test_a_device_node_is_never_replaced(tmp_path):
    # /dev/null itself: only checked (nothing is written by check_output) ...
    with pytest.raises(OutputError) as exc:
        check_output("/dev/null", "--report")
    assert one_line(exc.value) == ("--report /dev/null is a character device, not a regular file — layerwise only "
                                   "ever replaces regular files; pass the path of a regular (or new) file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # ... and written to: a device node of our own (needs CAP_MKNOD), left as it was.
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    with pytest.raises(OutputError, match="is a character device"):
        atomic_write_bytes(node, b"new")
    assert stat.S_ISCHR(os.lstat(node).st_mode) and listing(tmp_path) == ["null"]


def test_a_fifo_is_never_replaced_nor_opened(tmp_path, capsys):
    fifo = tmp_path / "out.html"
    os.mkfifo(fifo)
    with pytest.raises(OutputError) as exc:
        atomic_write_bytes(fifo, b"new")  # would hang if it opened the FIFO
    assert "is a named pipe (FIFO), not a regular file" in one_line(exc.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert main(["report", str(TINY), "-o", str(fifo)]) == 2
    assert "-o/--output" in cli_error(capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and listing(tmp_path) == ["out.html"]


def test_a_socket_is_never_replaced(tmp_path):
    path = tmp_path / "s.json"
    srv = socket.socket(socket.AF_UNIX)
    try:
        srv.bind(str(path))
        with pytest.raises(OutputError, match="is a socket, not a regular file"):
            atomic_write_bytes(path, b"x")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        srv.close()


def test_a_symlink_is_kept_and_its_target_written_in_its_own_folder(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir(), link_dir.mkdir()
    target = real_dir / "baseline.json"
    target.write_text("old")
    link = link_dir / "baseline.json"
    link.symlink_to(target)
    seen: list[str] = []
    orig = os.replace

    def spy(src, dst):
        seen.append(str(Path(src).parent))
        return orig(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", spy)
        atomic_write_bytes(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert seen == [str(real_dir)]  # the temp file lived beside the target: a same-disk rename
    assert listing(real_dir) == ["baseline.json"] and listing(link_dir) == ["baseline.json"]
    # a dangling link: its target is created
    dangling = link_dir / "new.json"
    dangling.symlink_to(real_dir / "new.json")
    atomic_write_bytes(dangling, b"fresh")
    assert dangling.is_symlink() and (real_dir / "new.json").read_text() == "fresh"


def test_a_symlink_loop_and_a_folder_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OutputError) as exc:
        check_output(a, "--results-json")
    assert one_line(exc.value).startswith(f"--results-json {a} is a symlink loop")
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, "--report")
    folder_link = tmp_path / "to-folder"
    folder_link.symlink_to(tmp_path)
    with pytest.raises(OutputError, match="a symlink to .* is a folder"):
        check_output(folder_link, "--report")


def test_check_output_returns_the_file_that_will_be_written(tmp_path):
    assert check_output(tmp_path / "new" / "deeper" / "r.json") == tmp_path / "new" / "deeper" / "r.json"
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match=r"cannot be written \(.*f is a file, not a folder\)"):
        check_output(tmp_path / "f" / "r.json", "--report")


# ----------------------------------------------------------------------------------------------
# Outputs: never the same file as an input or another output


def test_same_file_by_any_spelling_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "p.jsonl"
    data.write_text("{}\n")
    (tmp_path / "sub").mkdir()
    os.link(data, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(data)
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub")
    for spelling in ("p.jsonl", "./p.jsonl", "sub/../p.jsonl", str(data), "hard.jsonl", "soft.jsonl"):
        with pytest.raises(OutputError) as exc:
            check_distinct({"--prompts": "p.jsonl"}, {"--results-json": spelling})
        assert one_line(exc.value) == (f"--results-json {spelling} is the same file as --prompts p.jsonl — writing it "
                                       "would destroy --prompts; choose another path for --results-json")
    # two outputs that do not exist yet, one through a symlinked folder
    with pytest.raises(OutputError) as exc:
        check_distinct({}, {"--report": "sub/x.html", "--results-json": "dirlink/x.html"})
    assert one_line(exc.value) == ("--report sub/x.html and --results-json dirlink/x.html are the same file — give "
                                   "--report and --results-json different paths (the second would overwrite the first)")
    check_distinct({"--prompts": "p.jsonl", "--baseline": None}, {"--report": "r.html", "--results-json": "r.json"})


def test_report_and_compare_refuse_an_output_equal_to_an_input(tmp_path, capsys):
    res = tmp_path / "r.json"
    res.write_bytes(TINY.read_bytes())
    before = res.read_bytes()
    assert main(["report", str(res), "-o", str(res)]) == 2
    assert cli_error(capsys) == (f"layerwise: error: -o/--output {res} is the same file as RESULTS {res} — "
                                 "writing it would destroy RESULTS; choose another path for -o/--output")
    os.link(res, tmp_path / "same.json")
    assert main(["report", str(TINY), "--baseline", str(res), "-o", str(tmp_path / "same.json")]) == 2
    assert "same file as --baseline" in cli_error(capsys)
    assert main(["compare", str(TINY), str(res), "-o", str(tmp_path / "same.json")]) == 2
    assert "same file as NEW" in cli_error(capsys)
    assert res.read_bytes() == before and listing(tmp_path) == ["r.json", "same.json"]


# ----------------------------------------------------------------------------------------------
# Write errors: one line naming the path, old file intact


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch, where):
    out = tmp_path / "r.json"
    out.write_text("old")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, full)
    with pytest.raises(OutputError) as exc:  # a LayerwiseError: one line under the CLI and pytest
        atomic_write_bytes(out, b"new" * 1000)
    assert one_line(exc.value) == (f"cannot write {out}: No space left on device (ENOSPC) — free some space there "
                                   "or choose another path; the old file is unchanged")
    monkeypatch.undo()
    assert out.read_text() == "old" and listing(tmp_path) == ["r.json"]


def test_a_read_only_folder_under_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.html"
    out.write_text("old")

    def ro(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", ro)
    assert main(["report", str(TINY), "-o", str(out)]) == 2
    assert cli_error(capsys) == (f"layerwise: error: cannot write {out}: Read-only file system (EROFS) — the file "
                                 "system is read-only; choose another path (the old file is unchanged)")
    assert out.read_text() == "old" and listing(tmp_path) == ["r.html"]


# ----------------------------------------------------------------------------------------------
# write_set: temp files first, then the renames, locked, with signals deferred


def test_write_set_writes_all_or_nothing_on_a_write_error(tmp_path, monkeypatch):
    a, b = tmp_path / "r.json", tmp_path / "r.html"
    a.write_text("old a")
    b.write_text("old b")
    write_set([(a, b"new a"), (b, b"new b")])
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    calls = []
    real = os.write

    def second_fails(fd, data):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", second_fails)
    with pytest.raises(OutputError, match=f"cannot write {b}: No space left"):
        write_set([(a, b"newer a"), (b, b"newer b")], what=["--results-json", "--report"])
    monkeypatch.undo()
    assert (a.read_text(), b.read_text()) == ("new a", "new b")  # the first temp was not renamed
    assert listing(tmp_path) == ["_locks", "r.html", "r.json"]


def test_write_set_refuses_two_paths_to_one_file(tmp_path):
    with pytest.raises(OutputError, match="--report .* and --results-json .* are the same file"):
        write_set([(tmp_path / "x", b"1"), (tmp_path / "." / "x", b"2")], what=["--report", "--results-json"])
    assert not (tmp_path / "x").exists()


def test_sigint_during_the_renames_is_deferred_until_the_set_is_complete(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old")
    b.write_text("old")
    real = os.replace
    done: list[str] = []

    def replace_then_interrupt(src, dst):
        real(src, dst)
        done.append(Path(dst).name)
        if len(done) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the first file is replaced
            time.sleep(0.05)

    # Ctrl-C's own handler for the test's span: something earlier in the session may have left
    # SIGINT ignored (deferral then rightly delivers it to "ignore", and nothing is raised).
    ambient = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        handler = signal.getsignal(signal.SIGINT)
        monkeypatch.setattr(os, "replace", replace_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            write_set([(a, b"new"), (b, b"new")])
        assert done == ["a", "b"] and a.read_text() == b.read_text() == "new"
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, ambient)


def test_sigterm_during_the_renames_still_completes_the_set(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {SRC!r})
        from layerwise import io
        real = os.replace
        n = []
        def replace(src, dst):
            real(src, dst); n.append(dst)
            if len(n) == 1:
                os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)
        os.replace = replace
        io.write_set([({str(tmp_path / 'a')!r}, b"new"), ({str(tmp_path / 'b')!r}, b"new")])
        print("NOT REACHED")
    """)
    (tmp_path / "a").write_text("old")
    (tmp_path / "b").write_text("old")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LAYERWISE_LOCK_DIR=str(tmp_path / "_locks")))
    assert proc.returncode == -signal.SIGTERM, proc.stderr  # SIGTERM still ends the process ...
    assert "NOT REACHED" not in proc.stdout
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "new"  # ... after the last rename


def test_two_runs_on_the_same_paths_take_turns(tmp_path):
    import filelock

    a, b = tmp_path / "a", tmp_path / "b"
    held = filelock.FileLock(str(lw_io._lock_path(b)))
    held.acquire()
    finished = threading.Event()
    worker = threading.Thread(target=lambda: (write_set([(a, b"1"), (b, b"1")]), finished.set()))
    worker.start()
    time.sleep(0.5)
    assert not finished.is_set() and not a.exists() and not b.exists()  # waits for the other run
    held.release()
    worker.join(10)
    assert finished.is_set() and a.read_text() == b.read_text() == "1"
    held.acquire()
    try:
        with pytest.raises(OutputError) as exc:
            write_set([(a, b"2"), (b, b"2")], what=["--results-json", "--report"], lock_timeout=0.2)
        assert "another process has been writing" in one_line(exc.value)
    finally:
        held.release()
    assert a.read_text() == b.read_text() == "1" and listing(tmp_path) == ["_locks", "a", "b"]


# ----------------------------------------------------------------------------------------------
# Results + report: one run id, and a reader that says when they do not match


def test_results_and_report_carry_one_run_id(tmp_path, capsys):
    from layerwise.io import dumps_json
    from layerwise.report import render_report
    from layerwise.runid import pair_mismatch, stamp_run_id

    res = json.loads(TINY.read_text())
    plain = render_report(res)
    assert "layerwise-run-id" not in plain  # results without an id: the report is as before
    rid = stamp_run_id(res)
    page = render_report(res)
    assert f'<meta name="layerwise-run-id" content="{rid}">' in page
    assert page.replace(f'<meta name="layerwise-run-id" content="{rid}">\n', "") == plain
    rp, hp = tmp_path / "r.json", tmp_path / "r.html"
    write_set([(rp, dumps_json(res).encode()), (hp, page.encode())])
    assert pair_mismatch(rp, hp) is None
    assert main(["check", str(rp), str(hp)]) == 0
    assert f"same run ({rid})" in capsys.readouterr().out

    # An interrupted or concurrent run: new results beside the old report.
    old = rid
    new = stamp_run_id(res)
    rp.write_text(dumps_json(res))
    msg = pair_mismatch(rp, hp)
    assert msg == (f"results {rp} are from run {new} but report {hp} is from run {old} (an interrupted or concurrent "
                   f"run, or a file copied from elsewhere) — render the report again from the results: "
                   f"layerwise report {rp} -o {hp}")
    assert main(["check", str(rp), str(hp)]) == 1
    assert capsys.readouterr().err.strip() == f"layerwise: mismatch: {msg}"
    # `layerwise report` makes a matching report
    assert main(["report", str(rp), "-o", str(hp)]) == 0
    assert pair_mismatch(rp, hp) is None
    hp.write_text(plain)
    assert "report" in pair_mismatch(rp, hp) and "carries no run id" in pair_mismatch(rp, hp)
    hp.write_text("<html>something else</html>")
    assert pair_mismatch(rp, hp).startswith(f"{hp} is not a layerwise report")


# ----------------------------------------------------------------------------------------------
# Prompts data


def test_a_lone_surrogate_is_refused_naming_line_and_field(tmp_path):
    from layerwise.data import load_examples

    p = tmp_path / "s.jsonl"
    p.write_text('{"instruction": "ok", "output": "fine"}\n{"instruction": "bad \\ud800 here", "output": "x"}\n')
    with pytest.raises(DataError) as exc:
        load_examples(p)
    assert one_line(exc.value) == (f"prompts file {p}, line 2: field 'instruction' holds a lone surrogate (\\ud800 at "
                                   "character 4), which is not text — write the character itself, or both halves "
                                   "of its \\uXXXX\\uXXXX surrogate pair")
    p.write_text('{"instruction": "a pair \\ud83d\\ude00 is fine", "output": "x"}\n')
    assert load_examples(p)[0].instruction == "a pair \U0001F600 is fine"


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    from layerwise.data import load_examples

    p = tmp_path / "big.csv"
    long = "word " * 60_000  # 300 kB in one field
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "output"])
        w.writerow([long, "ref"])
    limit = csv.field_size_limit()
    rows = load_examples(p)
    assert rows[0].instruction == long and csv.field_size_limit() == limit


def test_a_fifo_is_read_once_and_hashed_as_read(tmp_path):
    from layerwise.data import Examples, load_examples

    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    payload = "".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("yes", "no", "maybe"))

    def feed():
        with open(fifo, "w", encoding="utf-8") as fh:
            fh.write(payload)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    first = load_examples(fifo, limit=2)
    t.join(5)
    box: dict = {}
    second = threading.Thread(target=lambda: box.update(rows=load_examples(fifo)), daemon=True)
    second.start()  # no writer any more: it would block forever if it opened the FIFO again
    second.join(10)
    assert "rows" in box, "the second load reopened the FIFO"
    again = box["rows"]
    assert isinstance(first, Examples) and [e.reference for e in first] == ["yes", "no"]
    assert [e.reference for e in again] == ["yes", "no", "maybe"]
    assert first.sha256 == again.sha256 == hashlib.sha256(payload.encode()).hexdigest()
    assert first.size == len(payload.encode())


def test_a_run_on_a_fifo_finishes_and_records_what_was_read(tmp_path):
    """The runner hashes the bytes it read, never reopening the file (a FIFO hung here before)."""
    from tiny_models import TinyTokenizer, tiny_model

    from layerwise.decoding import Decoding
    from layerwise.models import bundle_from_model
    from layerwise.runner import RunConfig, evaluate

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    payload = "".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}) + "\n"
                      for i in (2, 3))
    t = threading.Thread(target=lambda: fifo.write_text(payload), daemon=True)
    t.start()
    bundle = bundle_from_model(copy.deepcopy(tiny_model("llama")), TinyTokenizer(), name="tiny-llama")
    cfg = RunConfig(prompts=str(fifo), limit=None, prompt_format="raw", decoding=Decoding(max_new_tokens=3),
                    teacher_forced_tokens=4, bertscore_model=None, exit_layers=[2, 4])
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(res=evaluate(cfg, bundle=bundle)), daemon=True)
    runner.start()
    runner.join(120)
    assert "res" in box, "the run did not finish: it reopened the FIFO"
    assert box["res"]["run"]["data"]["sha256"] == hashlib.sha256(payload.encode()).hexdigest()
    assert box["res"]["run"]["data"]["rows"] == 2


def test_a_device_as_prompts_is_refused(tmp_path):
    from layerwise.data import load_examples

    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")  # would never end
    with pytest.raises(DataError) as exc:
        load_examples(link)
    assert one_line(exc.value) == (f"prompts file {link} is a device — pass a .jsonl or .csv file (a named pipe "
                                   "works too: it is read once)")


@pytest.mark.parametrize("template, kind", [
    ("{{ cycler.__init__.__globals__ }}", "SecurityError"),
    ("{{ raise_exception('no user turns allowed') }}", "TemplateError"),
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "TypeError"),
])
def test_a_failing_chat_template_is_one_line_naming_the_row(template, kind):
    transformers = pytest.importorskip("transformers")
    from layerwise.data import Example, format_prompt
    from layerwise.metrics import default_bertscore_path

    tok = transformers.AutoTokenizer.from_pretrained(str(default_bertscore_path()))
    tok.chat_template = template
    with pytest.raises(ConfigError) as exc:
        format_prompt(Example(index=7, instruction="hi", input="", reference="x"), "chat", tok)
    msg = one_line(exc.value)
    assert msg.startswith(f"the tokenizer's chat template fails on row 7: {kind}"), msg
    assert msg.endswith("— fix the chat_template in the model's tokenizer_config.json, or use --prompt-format "
                        "alpaca (or raw)")


# ----------------------------------------------------------------------------------------------
# Decoding: a temperature near 0 samples the top token, never crashes


def test_a_tiny_temperature_samples_the_top_token():
    import torch

    from layerwise.decoding import Decoding, _pick

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(1)) * 4
    logits[5] = -logits[5].abs() - 50  # all negative: logits / T is -inf everywhere
    for t in (1e-40, 1e-300, 5e-324):
        for extra in ({}, {"top_k": 5}, {"top_p": 0.9}):
            got = _pick(logits, Decoding(do_sample=True, temperature=t, **extra), gen)
            assert torch.equal(got, logits.argmax(-1)), (t, extra)
    # ordinary temperatures take the unchanged path: same draws as plain torch
    ref = torch.multinomial((logits / 0.7).softmax(-1), 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert torch.equal(_pick(logits, Decoding(do_sample=True, temperature=0.7), torch.Generator().manual_seed(3)), ref)
    with pytest.raises(ConfigError) as exc:
        _pick(torch.full((2, 5), float("nan")), Decoding(do_sample=True), gen)
    assert "NaN or infinities" in one_line(exc.value)
    with pytest.raises(ConfigError, match="--temperature must be a finite number > 0"):
        Decoding(do_sample=True, temperature=float("inf")).validate()


def test_generation_at_a_tiny_temperature_equals_greedy():
    import torch
    from tiny_models import tiny_bundle

    from layerwise.decoding import Decoding, generate_exits

    bundle = tiny_bundle("llama")
    ids = torch.tensor([[1, 5, 9, 13, 17], [0, 1, 7, 7, 30]])
    mask = (ids != 0).long()
    greedy = generate_exits(bundle, ids, mask, [2, 4], Decoding(max_new_tokens=6))
    cold = generate_exits(bundle, ids, mask, [2, 4], Decoding(max_new_tokens=6, do_sample=True, temperature=1e-40))
    assert cold.tokens == greedy.tokens


# ----------------------------------------------------------------------------------------------
# BERTScore weights that are a hostile pickle: refused before the run


@pytest.fixture(scope="module")
def hostile_bert(tmp_path_factory):
    import shutil

    import torch
    import transformers

    from layerwise.metrics import default_bertscore_path

    folder = tmp_path_factory.mktemp("hostile-bert")
    src = default_bertscore_path()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens", "config.json")):
            shutil.copy(f, folder / f.name)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    (folder / "config.json").write_text(cfg.to_json_string())
    state = transformers.BertModel(cfg).state_dict()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'PWNED'}",))

    state["payload"] = Payload()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_a_hostile_pickle_bertscore_model_fails_before_the_run(hostile_bert, monkeypatch):
    from tiny_models import tiny_bundle

    from layerwise import runner
    from layerwise.decoding import Decoding
    from layerwise.runner import RunConfig, evaluate

    def no_sweep(*_a, **_k):
        raise AssertionError("the run started")

    monkeypatch.setattr(runner, "run_sweep", no_sweep)
    cfg = RunConfig(prompts=None, limit=2, prompt_format="raw", decoding=Decoding(max_new_tokens=2),
                    bertscore_model=str(hostile_bert))
    with pytest.raises(ConfigError) as exc:
        evaluate(cfg, bundle=tiny_bundle("llama"))
    assert one_line(exc.value) == (f"BERTScore model '{hostile_bert}' has pickle weights that hold more than tensors "
                                   "(e.g. code to run); they were not loaded — use a model folder with safetensors "
                                   "weights, or pass --bertscore-model none to disable BERTScore, or a local model folder")
    assert not (hostile_bert / "PWNED").exists()


# ----------------------------------------------------------------------------------------------
# Model options checked before any weight is read


@pytest.mark.parametrize("value, words", [
    ("[1,2]", "--device-map '[1,2]' is not a device map"),
    ("gpu", "--device-map 'gpu' is not a device map"),
    ({"model.layers.0": "gpu7"}, "'model.layers.0' is mapped to 'gpu7', which is not a device"),
    ({"": True}, "'' is mapped to True"),
    ({1: 0}, "module name 1 is not a string"),
    ({}, "empty object"),
    ([1, 2], "is not a device map (a list)"),
])
def test_a_bad_device_map_is_refused_before_loading(tmp_path, value, words, monkeypatch):
    from layerwise import models

    monkeypatch.setattr(models, "_pick_device", lambda d: (_ for _ in ()).throw(AssertionError("went on")))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as exc:
        models.load_model(str(folder), device_map=value)
    msg = one_line(exc.value)
    assert words in msg and "corrupt" not in msg
    assert msg.endswith("— pass auto, balanced, balanced_low_0 or sequential, a device such as cpu or cuda:0, "
                        "or a JSON object of module name → device, e.g. '{\"\": 0}'")


def test_good_device_maps_pass():
    from layerwise.models import check_device_map

    for ok in (None, "auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda:1", 0,
               {"": 0}, {"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cuda:0"}):
        check_device_map(ok)


def test_revision_with_a_local_model_is_refused(tmp_path):
    from layerwise.models import load_model, resolve_spec

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as exc:
        load_model(str(gguf), revision="v2")
    assert one_line(exc.value) == (f"--revision 'v2' applies to Hugging Face Hub ids, but '{gguf}' is a local GGUF "
                                   "file — leave --revision out (a local model has no revisions), or pass a hub id")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a local folder"):
        load_model(str(tmp_path / "f"), revision="main")
    assert resolve_spec("org/model").kind == "hub"


# ----------------------------------------------------------------------------------------------
# The GGUF cache heals (a fake GGUF whose "conversion" is a tiny llama; the real one: test_default_model)


def _tiny_hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(28)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf file whose reading yields a tiny llama; counts the conversions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerwise import models

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    tok = _tiny_hf_tokenizer()
    reads: list[int] = []

    def read(src, path):
        reads.append(1)
        return copy.deepcopy(model), tok

    monkeypatch.setattr(models, "_read_gguf", read)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF fake " + os.urandom(32))
    return path, model, reads


def _entry(tmp_path: Path) -> Path:
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def _same_logits(a, b) -> bool:
    import torch

    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


def test_cache_entry_lists_its_files_and_is_reused(fake_gguf, tmp_path):
    from layerwise.models import load_model

    gguf, ref, reads = fake_gguf
    load_model(str(gguf))
    entry = _entry(tmp_path)
    marker = json.loads((entry / "layerwise-cache.json").read_text())
    st = marker["files"]["model.safetensors"]
    assert st["size"] == (entry / "model.safetensors").stat().st_size
    assert st["sha256"] == hashlib.sha256((entry / "model.safetensors").read_bytes()).hexdigest()
    assert ".layerwise-owner.json" not in marker["files"] and not (entry / ".layerwise-owner.json").exists()
    again = load_model(str(gguf))
    assert reads == [1] and _same_logits(again.model, ref)


@pytest.mark.parametrize("legacy_marker", [False, True])
def test_a_truncated_cache_entry_is_converted_again(fake_gguf, tmp_path, capsys, legacy_marker):
    from layerwise.models import load_model

    gguf, ref, reads = fake_gguf
    load_model(str(gguf))
    entry = _entry(tmp_path)
    if legacy_marker:  # written by a layerwise that did not list the files
        m = json.loads((entry / "layerwise-cache.json").read_text())
        del m["files"]
        (entry / "layerwise-cache.json").write_text(json.dumps(m))
    weights = entry / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    capsys.readouterr()
    healed = load_model(str(gguf))
    err = capsys.readouterr().err
    assert f"layerwise: the converted model in the cache {entry} is damaged (" in err
    assert "truncated" in err or "bytes" in err
    assert f"converting {gguf} again" in err
    assert reads == [1, 1] and _same_logits(healed.model, ref)
    assert _entry(tmp_path) == entry and listing(tmp_path / "cache") == [entry.name]


def test_same_size_damage_is_found_after_the_load_fails(fake_gguf, tmp_path, capsys):
    from layerwise.models import load_model

    gguf, ref, reads = fake_gguf
    load_model(str(gguf))
    entry = _entry(tmp_path)
    cfg = entry / "config.json"
    cfg.write_text(" " * cfg.stat().st_size)  # same size, not JSON: sizes and headers cannot tell
    healed = load_model(str(gguf))
    assert "cannot be loaded (config.json does not match the SHA-256" in capsys.readouterr().err
    assert reads == [1, 1] and _same_logits(healed.model, ref)


def test_an_intact_entry_that_fails_to_load_names_the_cache(fake_gguf, tmp_path, monkeypatch):
    import transformers

    from layerwise.models import load_model

    gguf, _ref, reads = fake_gguf
    load_model(str(gguf))
    entry = _entry(tmp_path)

    def broken(*_a, **_k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(gguf))
    msg = one_line(exc.value)
    assert msg == (f"cannot load the model in {entry}: RuntimeError: out of memory — delete the cache entry {entry}; "
                   f"it is converted again from tiny.gguf on the next run")
    assert "save_pretrained" not in msg and reads == [1]  # intact: not converted again for nothing


def test_a_full_cache_disk_is_one_line(fake_gguf, tmp_path, monkeypatch):
    from layerwise import models
    from layerwise.models import load_model

    gguf, _ref, _reads = fake_gguf

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(models.model_cache, "file_manifest", full)
    with pytest.raises(ConfigError) as exc:
        load_model(str(gguf))
    assert one_line(exc.value) == (f"cannot write the model cache {tmp_path / 'cache'}: No space left on device — free "
                                   "some space there, or set LAYERWISE_CACHE to a writable folder with room for the "
                                   "converted model")
    assert listing(tmp_path / "cache") == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_folders_of_dead_conversions_are_removed(tmp_path):
    from layerwise import model_cache as mc

    root = tmp_path / "cache"
    root.mkdir()
    me = mc.owner_record()

    def make(name, owner=None, age_s=0.0):
        d = root / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
        if owner is not None:
            (d / mc.OWNER).write_text(json.dumps(owner))
        if age_s:
            t = time.time() - age_s
            os.utime(d, (t, t))

    make(".converting-dead", dict(me, pid=_dead_pid()))
    make(".converting-rebooted", dict(me, boot_id="another-boot"))
    make(".converting-reused-pid", dict(me, start_ticks=(me["start_ticks"] or 0) + 1))
    make(".converting-alive", me)
    make(".converting-elsewhere", dict(me, pid=_dead_pid(), host="another-host"))
    make(".converting-old-unowned", None, age_s=2 * 24 * 3600)
    make(".converting-new-unowned", None)
    make(".broken-abc")
    make("an-entry")
    removed = mc.remove_dead_work(root)
    expect_removed = [".broken-abc", ".converting-dead", ".converting-old-unowned", ".converting-rebooted"]
    if me["start_ticks"] is not None:
        expect_removed.append(".converting-reused-pid")
    assert sorted(removed) == sorted(expect_removed)
    assert listing(root) == sorted({".converting-alive", ".converting-elsewhere", ".converting-new-unowned",
                                    ".converting-reused-pid", "an-entry"} - set(expect_removed))


def test_sigterm_mid_conversion_removes_the_folder(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from layerwise import models
        def slow(src, path):
            print("READING", flush=True)
            time.sleep(120)
        models._read_gguf = slow
        models.load_model({str(tmp_path / 'x.gguf')!r})
    """)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, LAYERWISE_CACHE=str(root)))
    assert proc.stdout.readline().strip() == "READING"
    (folder,) = [p for p in root.iterdir() if p.name.startswith(".converting-")]
    assert json.loads((folder / ".layerwise-owner.json").read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err
    assert listing(root) == []
