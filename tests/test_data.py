"""Tests of layerwise.data: the prompts loader, its error messages and the prompt formats."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise.data import (
    DEFAULT_LIMIT,
    DEFAULT_PROMPTS,
    PROMPT_FORMATS,
    Example,
    default_prompts_path,
    file_sha256,
    format_prompt,
    load_examples,
)
from layerwise.errors import ConfigError, DataError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alpaca_cleaned_sample.jsonl"
FIXTURE_SHA256 = "5e7c7097c4486c7757a54798f15ebbd89a3ea8e8a224ae3db293a4d557666c73"

ALPACA_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
STANFORD_NO_INPUT_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def jl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def assert_one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ------------------------------------------------------------------ the packaged fixture


def test_default_prompts_is_the_repo_fixture():
    path = default_prompts_path()
    assert path.is_file() and path.name == "alpaca_cleaned_sample.jsonl"
    assert path.read_bytes() == FIXTURE.read_bytes()
    assert DEFAULT_PROMPTS.read_bytes() == FIXTURE.read_bytes()  # importlib.resources view
    assert DEFAULT_LIMIT == 20


def test_fixture_loads_all_62_rows_in_order():
    rows = load_examples(default_prompts_path())
    assert len(rows) == 62
    assert [r.index for r in rows] == list(range(62))
    first = rows[0]
    assert first == Example(
        index=0,
        instruction="Give three tips for staying healthy.",
        input="",
        reference=json.loads(FIXTURE.read_text(encoding="utf-8").splitlines()[0])["output"],
    )
    assert rows[5].input == "Oak tree, copper ore, elephant"
    assert sum(1 for r in rows if r.input) == 32
    # Same content as a plain json parse of every line.
    raw = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    assert [(r.instruction, r.input, r.reference) for r in rows] == [(d["instruction"], d["input"], d["output"]) for d in raw]


def test_limit_keeps_the_first_rows_in_file_order():
    all_rows = load_examples(FIXTURE)
    first20 = load_examples(FIXTURE, limit=DEFAULT_LIMIT)
    assert first20 == all_rows[:20]
    assert [r.index for r in first20] == list(range(20))
    assert load_examples(FIXTURE, limit=1) == all_rows[:1]
    assert load_examples(FIXTURE, limit=1000) == all_rows  # more than the rows: all of them


@pytest.mark.parametrize("limit", [0, -1, -20])
def test_non_positive_limit_is_a_config_error(limit):
    with pytest.raises(ConfigError) as exc:
        load_examples(FIXTURE, limit=limit)
    msg = assert_one_line(exc.value)
    assert str(limit) in msg and "positive" in msg


@pytest.mark.parametrize("limit", [1.5, "20", True])
def test_non_integer_limit_is_a_config_error(limit):
    with pytest.raises(ConfigError):
        load_examples(FIXTURE, limit=limit)


def test_file_sha256_matches_hashlib_and_the_documented_hash(tmp_path):
    assert file_sha256(FIXTURE) == hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == FIXTURE_SHA256
    readme = (FIXTURE.parent / "README.md").read_text(encoding="utf-8")
    assert FIXTURE_SHA256 in readme
    with pytest.raises(DataError) as exc:
        file_sha256(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in assert_one_line(exc.value)


def test_importing_data_does_not_import_torch():
    code = "import sys, layerwise.data; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------ other shapes of input


def test_prompt_reference_rows_and_blank_lines(tmp_path):
    p = write(tmp_path, "p.jsonl", "\n" + jl({"prompt": "Say hi.", "reference": "Hi!"}) + "   \n\n"
              + jl({"prompt": "Add", "input": "2+2", "reference": "4", "extra": 7}) + "\n")
    rows = load_examples(p)
    assert rows == [
        Example(0, "Say hi.", "", "Hi!"),
        Example(1, "Add", "2+2", "4"),
    ]


def test_crlf_and_bom_are_accepted(tmp_path):
    data = "\ufeff" + jl({"instruction": "a", "output": "b"}).replace("\n", "\r\n")
    p = write(tmp_path, "p.jsonl", data.encode("utf-8"))
    assert load_examples(p) == [Example(0, "a", "", "b")]


def test_json_suffix_lines_and_array(tmp_path):
    lines = write(tmp_path, "lines.json", jl({"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}))
    assert [r.instruction for r in load_examples(lines)] == ["a", "c"]
    array = write(tmp_path, "array.json", json.dumps([{"instruction": "a", "output": "b"}, {"prompt": "c", "reference": "d"}], indent=2))
    assert load_examples(array) == [Example(0, "a", "", "b"), Example(1, "c", "", "d")]


def test_csv_instruction_columns(tmp_path):
    p = write(tmp_path, "p.csv",
              'instruction,input,output\n'
              'Name a color.,,Red.\n'
              '"Sum, please",1 2,"3\nthree"\n'
              '\n')
    assert load_examples(p) == [
        Example(0, "Name a color.", "", "Red."),
        Example(1, "Sum, please", "1 2", "3\nthree"),
    ]


def test_csv_prompt_columns_without_input(tmp_path):
    p = write(tmp_path, "p.csv", "reference,prompt\nHi!,Say hi.\n")
    assert load_examples(p, limit=5) == [Example(0, "Say hi.", "", "Hi!")]


# ------------------------------------------------------------------ errors


def data_error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as exc:
        load_examples(path, **kw)
    msg = assert_one_line(exc.value)
    assert str(path) in msg  # every message names the file
    return msg


def test_missing_file(tmp_path):
    msg = data_error(tmp_path / "missing.jsonl")
    assert "does not exist" in msg


def test_folder(tmp_path):
    d = tmp_path / "adir.jsonl"
    d.mkdir()
    assert "folder" in data_error(d)


@pytest.mark.parametrize("content", ["", "\n\n   \n", "\ufeff"])
def test_empty_file(tmp_path, content):
    assert "empty" in data_error(write(tmp_path, "e.jsonl", content))


def test_unsupported_suffix(tmp_path):
    msg = data_error(write(tmp_path, "p.txt", "hello\n"))
    assert "'.txt'" in msg and ".jsonl" in msg


def test_invalid_json_names_line_and_json_error(tmp_path):
    p = write(tmp_path, "p.jsonl", jl({"instruction": "a", "output": "b"}) + "\n" + '{"instruction": "x", "output": \n')
    msg = data_error(p)
    assert "line 3" in msg and "not valid JSON" in msg and "Expecting value" in msg


def test_truncated_json_line(tmp_path):
    p = write(tmp_path, "p.jsonl", '{"instruction": "a", "output": "b"\n')
    msg = data_error(p)
    assert "line 1" in msg and "not valid JSON" in msg and "delimiter" in msg


@pytest.mark.parametrize("row,kind", [([1, 2], "an array"), ("text", "a string"), (3, "a number"), (None, "null")])
def test_row_not_an_object(tmp_path, row, kind):
    p = write(tmp_path, "p.jsonl", jl({"instruction": "a", "output": "b"}, row))
    msg = data_error(p)
    assert "line 2" in msg and kind in msg and "not a JSON object" in msg


def test_missing_output_names_the_field(tmp_path):
    p = write(tmp_path, "p.jsonl", jl({"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}))
    msg = data_error(p)
    assert "line 2" in msg and "'output'" in msg and "missing" in msg and "reference" in msg


def test_missing_reference_names_the_field(tmp_path):
    p = write(tmp_path, "p.jsonl", jl({"prompt": "a"}))
    msg = data_error(p)
    assert "line 1" in msg and "'reference'" in msg and "missing" in msg


def test_neither_instruction_nor_prompt(tmp_path):
    p = write(tmp_path, "p.jsonl", jl({"question": "a", "output": "b"}))
    msg = data_error(p)
    assert "line 1" in msg and "'instruction'" in msg and "'prompt'" in msg


@pytest.mark.parametrize("field,value,typename", [
    ("output", 4, "int"), ("output", None, "NoneType"), ("instruction", ["a"], "list"), ("input", None, "NoneType"),
    ("input", 2.5, "float"),
])
def test_non_string_field(tmp_path, field, value, typename):
    row = {"instruction": "a", "input": "", "output": "b"}
    row[field] = value
    p = write(tmp_path, "p.jsonl", jl({"instruction": "ok", "output": "ok"}, {"instruction": "ok", "output": "ok"}, row))
    msg = data_error(p)
    assert "line 3" in msg and f"'{field}'" in msg and typename in msg and "not a string" in msg


def test_empty_reference_and_instruction(tmp_path):
    msg = data_error(write(tmp_path, "a.jsonl", jl({"instruction": "a", "output": "  "})))
    assert "line 1" in msg and "empty" in msg
    msg = data_error(write(tmp_path, "b.jsonl", jl({"instruction": "", "output": "x"})))
    assert "line 1" in msg and "'instruction'" in msg and "empty" in msg


def test_non_utf8_names_the_line(tmp_path):
    good = jl({"instruction": "a", "output": "b"}).encode()
    bad = '{"instruction": "caf'.encode() + b"\xe9" + b'", "output": "x"}\n'
    p = write(tmp_path, "p.jsonl", good + good + bad + good)
    msg = data_error(p)
    assert "line 3" in msg and "UTF-8" in msg and "0xe9" in msg


def test_non_utf8_csv(tmp_path):
    p = write(tmp_path, "p.csv", b"instruction,output\n" + b"caf\xe9,x\n")
    msg = data_error(p)
    assert "line 2" in msg and "UTF-8" in msg


def test_csv_missing_columns(tmp_path):
    msg = data_error(write(tmp_path, "p.csv", "instruction,answer\nq,a\n"))
    assert "columns" in msg and "'answer'" in msg and "output" in msg
    msg = data_error(write(tmp_path, "q.csv", "question,output\nq,a\n"))
    assert "columns" in msg and "instruction" in msg


def test_csv_row_with_wrong_field_count(tmp_path):
    p = write(tmp_path, "p.csv", "instruction,input,output\na,,b\nc,d\n")
    msg = data_error(p)
    assert "line 3" in msg and "2 fields" in msg and "header has 3" in msg


def test_csv_line_numbers_count_multiline_fields(tmp_path):
    p = write(tmp_path, "p.csv", 'instruction,output\n"a\nb\nc",x\nq,\n')
    msg = data_error(p)
    assert "line 5" in msg and "empty" in msg


def test_csv_header_only(tmp_path):
    msg = data_error(write(tmp_path, "p.csv", "instruction,output\n"))
    assert "no rows" in msg


def test_errors_are_raised_even_beyond_the_limit(tmp_path):
    p = write(tmp_path, "p.jsonl", jl({"instruction": "a", "output": "b"}) + "{oops}\n")
    assert "line 2" in data_error(p, limit=1)


# ------------------------------------------------------------------ prompt formats

EX_NO_INPUT = Example(0, "Give three tips for staying healthy.", "", "ref")
EX_INPUT = Example(1, "Classify the following.", "Oak tree, copper ore", "ref")


def test_alpaca_format_always_has_the_input_section():
    assert format_prompt(EX_NO_INPUT, "alpaca") == (
        ALPACA_HEAD
        + "### Instruction:\nGive three tips for staying healthy.\n\n"
        + "### Input:\n\n\n"
        + "### Response:\n"
    )
    assert format_prompt(EX_INPUT, "alpaca") == (
        ALPACA_HEAD
        + "### Instruction:\nClassify the following.\n\n"
        + "### Input:\nOak tree, copper ore\n\n"
        + "### Response:\n"
    )


def test_alpaca_format_matches_the_data_readme_template():
    """The template as shown in the data README (its first paragraph wrapped over two lines
    there), line by line, with {instruction} and {input} filled in and a final newline."""
    readme_lines = [
        "Below is an instruction that describes a task, paired with an input that provides",
        "further context. Write a response that appropriately completes the request.",
        "",
        "### Instruction:",
        "{instruction}",
        "",
        "### Input:",
        "{input}",
        "",
        "### Response:",
    ]
    template = "\n".join([readme_lines[0] + " " + readme_lines[1]] + readme_lines[2:]) + "\n"
    for ex in (EX_INPUT, EX_NO_INPUT):
        assert format_prompt(ex, "alpaca") == template.format(instruction=ex.instruction, input=ex.input)
    assert format_prompt(EX_INPUT, "alpaca").count("\n") == 9


def test_alpaca_stanford_drops_the_input_section_only_when_empty():
    assert format_prompt(EX_NO_INPUT, "alpaca-stanford") == (
        STANFORD_NO_INPUT_HEAD
        + "### Instruction:\nGive three tips for staying healthy.\n\n"
        + "### Response:\n"
    )
    assert format_prompt(EX_INPUT, "alpaca-stanford") == format_prompt(EX_INPUT, "alpaca")


def test_raw_format():
    assert format_prompt(EX_NO_INPUT, "raw") == "Give three tips for staying healthy.\n"
    assert format_prompt(EX_INPUT, "raw") == "Classify the following.\n\nOak tree, copper ore\n"


def test_braces_in_text_are_kept_literally():
    ex = Example(0, "Print {x} and {}", "{input}", "r")
    assert "### Instruction:\nPrint {x} and {}\n\n### Input:\n{input}\n\n" in format_prompt(ex, "alpaca")


class FakeChatTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


def test_chat_format_calls_the_template_with_one_user_turn():
    tok = FakeChatTokenizer()
    assert format_prompt(EX_INPUT, "chat", tok) == "<user>Classify the following.\n\nOak tree, copper ore<assistant>"
    assert tok.calls == [([{"role": "user", "content": "Classify the following.\n\nOak tree, copper ore"}], False, True)]
    assert format_prompt(EX_NO_INPUT, "chat", tok) == "<user>Give three tips for staying healthy.<assistant>"


def test_chat_format_with_a_real_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    from layerwise.metrics import default_bertscore_path

    tok = transformers.AutoTokenizer.from_pretrained(str(default_bertscore_path()))
    with pytest.raises(ConfigError) as exc:  # a BERT tokenizer has no chat template
        format_prompt(EX_INPUT, "chat", tok)
    assert "chat template" in assert_one_line(exc.value)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    assert format_prompt(EX_INPUT, "chat", tok) == "<|user|>\nClassify the following.\n\nOak tree, copper ore\n<|assistant|>\n"


def test_chat_format_without_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError) as exc:
        format_prompt(EX_INPUT, "chat")
    assert "tokenizer" in assert_one_line(exc.value)

    class NoTemplate:
        chat_template = None

        def apply_chat_template(self, *a, **k):  # pragma: no cover - must not be called
            raise AssertionError

    with pytest.raises(ConfigError):
        format_prompt(EX_INPUT, "chat", NoTemplate())


def test_unknown_format_lists_the_formats():
    with pytest.raises(ConfigError) as exc:
        format_prompt(EX_INPUT, "vicuna")
    msg = assert_one_line(exc.value)
    assert "'vicuna'" in msg and all(f in msg for f in PROMPT_FORMATS)
    assert PROMPT_FORMATS == ("alpaca", "alpaca-stanford", "chat", "raw")
