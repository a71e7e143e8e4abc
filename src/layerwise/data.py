"""Prompt data: loading instruction/reference rows and turning them into prompts.

Kept light on purpose (standard library only at import time): the CLI and the pytest plugin
import this module to validate options before any model or torch is loaded.

A prompts file is either

- JSON Lines (``.jsonl``, or ``.json`` with one object a line; a ``.json`` file holding one
  JSON array of objects is accepted too), blank lines skipped, or
- CSV (``.csv``, a header row, read with the :mod:`csv` module),

and every row has either ``instruction`` (+ optional ``input``) and ``output`` (the reference
answer, as in Alpaca), or ``prompt`` (+ optional ``input``) and ``reference``. Other keys are
ignored. The whole file is validated even when ``limit`` keeps only its first rows.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_LIMIT, PROMPT_FORMATS
from .errors import ConfigError, DataError

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_PROMPTS",
    "PROMPT_FORMATS",
    "Example",
    "Examples",
    "default_prompts_path",
    "file_sha256",
    "format_prompt",
    "load_examples",
]


@dataclass(frozen=True)
class Example:
    """One prompt row. ``index`` is the 0-based number of the row among the file's rows
    (blank JSONL lines and the CSV header are not rows)."""

    index: int
    instruction: str
    input: str
    reference: str


class Examples(list):  # list[Example]
    """The rows of a prompts file (a list of :class:`Example`), with the SHA-256 and size of
    exactly the bytes that were read to make them: record these, never re-read the file (it may
    have changed since, or be a named pipe that can be read only once)."""

    def __init__(self, rows: Any = (), sha256: str = "", size: int = 0) -> None:
        super().__init__(rows)
        self.sha256 = sha256
        self.size = size


#: The packaged default prompts: 62 rows from the start of Alpaca-cleaned (see fixtures/README.md).
DEFAULT_PROMPTS = importlib.resources.files("layerwise.fixtures") / "alpaca_cleaned_sample.jsonl"

_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)


def default_prompts_path() -> Path:
    """The packaged default prompts file as a filesystem path."""
    path = Path(str(DEFAULT_PROMPTS))
    if not path.is_file():
        raise DataError(
            f"the packaged prompts file {path} is missing",
            "reinstall pytest-layerwise, or pass your own prompts file",
        )
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    p = Path(path)
    digest = hashlib.sha256()
    try:
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"file {p} does not exist", "check the path") from None
    except IsADirectoryError:
        raise DataError(f"{p} is a folder, not a file", "pass the path of a file") from None
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}", "check the path and its permissions") from None
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ConfigError(f"the row limit must be a whole number, not {limit!r}", "pass a positive integer, or no limit for all rows")
    if limit <= 0:
        raise ConfigError(f"the row limit must be positive, not {limit}", "pass a positive integer, or no limit for all rows")


#: The bytes of each named pipe (or other stream) read so far, by (device, inode): a stream can
#: be read only once, and the options check and the run both load the prompts.
_STREAMS: dict[tuple[int, int], bytes] = {}


def _read_bytes(p: Path) -> bytes:
    """The file's bytes; a named pipe is read once per process and remembered."""
    if not p.exists():
        raise DataError(f"prompts file {p} does not exist", "check the path, or leave it out to use the packaged Alpaca sample")
    try:
        st = os.stat(p)
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"prompts path {p} is a folder, not a file", "pass a .jsonl or .csv file")
        if stat.S_ISREG(st.st_mode):
            return p.read_bytes()
        if not stat.S_ISFIFO(st.st_mode):
            kind = "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
            raise DataError(f"prompts file {p} is {kind}", "pass a .jsonl or .csv file (a named pipe works too: it is read once)")
        key = (st.st_dev, st.st_ino)
        if key not in _STREAMS:
            _STREAMS[key] = p.read_bytes()
        return _STREAMS[key]
    except OSError as exc:
        raise DataError(f"cannot read prompts file {p}: {exc.strerror or exc}", "check the path and its permissions") from None


def _read_text(p: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"prompts file {p}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            "save the file as UTF-8",
        ) from None
    if text.startswith("\ufeff"):  # a byte-order mark, as some editors write
        text = text[1:]
    if not text.strip():
        raise DataError(f"prompts file {p} is empty", "add one row per line with instruction/output (or prompt/reference) fields")
    return text


def _where(p: Path, line: int | None, row: int | None = None) -> str:
    if line is not None:
        return f"prompts file {p}, line {line}"
    return f"prompts file {p}, row {row}"


def _field(obj: dict[str, Any], name: str, where: str) -> str | None:
    """The string value of ``name`` (None when absent); DataError when it is not a string."""
    if name not in obj:
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {name!r} is {type(value).__name__}, not a string",
            f"make {name!r} a JSON string (quote it; use \"\" for nothing)",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # "\ud800": a JSON escape of half a surrogate pair
        raise DataError(
            f"{where}: field {name!r} holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character {exc.start}), which is not text",
            "write the character itself, or both halves of its \\uXXXX\\uXXXX surrogate pair",
        ) from None
    return value


def _row_to_example(obj: Any, index: int, where: str) -> Example:
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(type(obj), "null")
        raise DataError(f"{where}: the row is {kind}, not a JSON object", 'write one object a line, e.g. {"instruction": "...", "input": "", "output": "..."}')
    if "instruction" in obj:
        text_key, ref_keys = "instruction", ("output", "reference")
    elif "prompt" in obj:
        text_key, ref_keys = "prompt", ("reference", "output")
    else:
        raise DataError(
            f"{where}: the row has neither an 'instruction' nor a 'prompt' field",
            "give every row 'instruction' (+ optional 'input') and 'output', or 'prompt' and 'reference'",
        )
    text = _field(obj, text_key, where)
    inp = _field(obj, "input", where)
    reference = None
    for key in ref_keys:
        reference = _field(obj, key, where)
        if reference is not None:
            break
    if reference is None:
        raise DataError(
            f"{where}: the row has no reference answer: field {ref_keys[0]!r} is missing",
            f"add {ref_keys[0]!r} with the expected answer to every row",
        )
    assert text is not None
    if not text.strip():
        raise DataError(f"{where}: field {text_key!r} is empty", f"give every row a non-empty {text_key!r}")
    if not reference.strip():
        raise DataError(
            f"{where}: the reference answer ({ref_keys[0]!r}) is empty",
            "give every row a non-empty reference answer, or remove the row",
        )
    return Example(index=index, instruction=text, input=inp or "", reference=reference)


def _load_jsonl(p: Path, text: str) -> list[Example]:
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"prompts file {p}, line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})", "fix the JSON array, or write one object a line (.jsonl)") from None
        if isinstance(rows, list):
            if not rows:
                raise DataError(f"prompts file {p} is an empty JSON array", "add rows with instruction/output (or prompt/reference) fields")
            return [_row_to_example(obj, i, _where(p, None, i + 1)) for i, obj in enumerate(rows)]
    examples: list[Example] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = _where(p, lineno)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg}, column {exc.colno})",
                "write one complete JSON object per line",
            ) from None
        examples.append(_row_to_example(obj, len(examples), where))
    return examples


def _load_csv(p: Path, text: str) -> list[Example]:
    # The csv module refuses fields over 128 KiB by default; the whole file is in memory already,
    # so no field can be longer than the text.
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, len(text) + 1))
    try:
        return _parse_csv(p, text)
    finally:
        csv.field_size_limit(old_limit)


def _parse_csv(p: Path, text: str) -> list[Example]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataError(f"prompts file {p}, line 1: not valid CSV ({exc})", "fix the header row") from None
    header = [h.strip() for h in header]
    columns = set(header)
    if "instruction" in columns:
        text_key, ref_key = "instruction", "output" if "output" in columns else "reference"
    elif "prompt" in columns:
        text_key, ref_key = "prompt", "reference" if "reference" in columns else "output"
    else:
        text_key, ref_key = None, None
    if text_key is None or ref_key not in columns:
        shown = ", ".join(repr(h) for h in header) or "none"
        raise DataError(
            f"prompts file {p}: the CSV header lacks the needed columns (it has {shown})",
            "name the columns instruction,input,output (input optional) or prompt,reference",
        )
    examples: list[Example] = []
    last_line = reader.line_num
    while True:
        start = last_line + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"prompts file {p}, line {start}: not valid CSV ({exc})", "check the quoting of that line") from None
        last_line = reader.line_num
        if not record or all(not cell.strip() for cell in record):
            continue
        where = _where(p, start)
        if len(record) != len(header):
            raise DataError(
                f"{where}: the row has {len(record)} fields but the header has {len(header)}",
                "quote fields that contain commas, and give every row one field per column",
            )
        row = dict(zip(header, record))
        examples.append(_row_to_example(row, len(examples), where))
    return examples


def load_examples(path: str | os.PathLike[str], limit: int | None = None) -> Examples:
    """Read a prompts file (JSONL or CSV) into :class:`Example` rows, in file order.

    The file is read once; the result's ``sha256`` / ``size`` describe exactly the bytes read
    (a named pipe can be passed: it is read once per process, a second load reuses the bytes).

    ``limit``: None keeps all rows; a positive int keeps the first ``limit`` rows (all of them
    when the file has fewer); zero or negative raises :class:`ConfigError`.
    Any problem with the file raises a one-line :class:`DataError` naming the file, the
    1-based line and what to fix.
    """
    _check_limit(limit)
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _JSONL_SUFFIXES + _CSV_SUFFIXES and p.exists() and not p.is_dir():
        raise DataError(f"prompts file {p} has an unsupported type {suffix or '(no suffix)'!r}", "use a .jsonl (one JSON object a line) or .csv file")
    raw = _read_bytes(p)
    text = _read_text(p, raw)
    examples = _load_csv(p, text) if suffix in _CSV_SUFFIXES else _load_jsonl(p, text)
    if not examples:
        raise DataError(f"prompts file {p} has no rows", "add rows with instruction/output (or prompt/reference) fields")
    return Examples(examples if limit is None else examples[:limit], hashlib.sha256(raw).hexdigest(), len(raw))


# --------------------------------------------------------------------------------------------
# Prompt formats

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "### Input:\n"
    "{input}\n"
    "\n"
    "### Response:\n"
)

_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "### Response:\n"
)


def _user_text(example: Example) -> str:
    return example.instruction + ("\n\n" + example.input if example.input else "")


def format_prompt(example: Example, fmt: str, tokenizer: Any = None) -> str:
    """The prompt text for one row in format ``fmt`` (one of :data:`PROMPT_FORMATS`).

    - ``"alpaca"``: the original study's prompt, the Alpaca template *with* its Input section
      for every row (an empty input leaves the Input section empty)::

          "Below is an instruction that describes a task, paired with an input that provides "
          "further context. Write a response that appropriately completes the request.\\n\\n"
          "### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n"

      Whitespace after ``### Response:`` is exactly one newline, no space, so the answer starts
      on a fresh line, as the template is laid out in the data README and as common Alpaca
      inference templates (e.g. alpaca-lora's) end. Stanford's training code appended the
      answer right after the colon, but other models then tend to spend their first token on a line
      break, and every first-token measurement would be about formatting. A trailing space
      would be worse: BPE vocabularies fold a word's leading space into its token, so the
      model would have to start with an unusual space-less token.
    - ``"alpaca-stanford"``: Stanford Alpaca's convention: the template above when the row
      has an input, otherwise the no-input template::

          "Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n"

      (same ending as ``"alpaca"``).
    - ``"chat"``: the tokenizer's chat template with one user turn, ``instruction`` plus
      ``"\\n\\n" + input`` when there is an input, and the generation prompt added.
    - ``"raw"``: ``instruction`` (+ ``"\\n\\n" + input``) + ``"\\n"``.
    """
    if fmt == "alpaca":
        return _ALPACA_INPUT.format(instruction=example.instruction, input=example.input)
    if fmt == "alpaca-stanford":
        if example.input:
            return _ALPACA_INPUT.format(instruction=example.instruction, input=example.input)
        return _ALPACA_NO_INPUT.format(instruction=example.instruction)
    if fmt == "raw":
        return _user_text(example) + "\n"
    if fmt == "chat":
        if tokenizer is None:
            raise ConfigError("the 'chat' prompt format needs the model's tokenizer", "use --prompt-format alpaca (or raw) for this model")
        if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
            raise ConfigError(
                f"the tokenizer {type(tokenizer).__name__} has no chat template, so --prompt-format chat cannot be used",
                "use --prompt-format alpaca (or raw), or a chat/instruct model",
            )
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _user_text(example)}], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # noqa: BLE001 - jinja's SecurityError / TemplateError, or a template bug
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ConfigError(
                f"the tokenizer's chat template fails on row {example.index}: {type(exc).__name__}: {first}",
                "fix the chat_template in the model's tokenizer_config.json, or use --prompt-format alpaca (or raw)",
            ) from None
        if not isinstance(text, str):  # some versions return a list for batched input
            text = text[0] if isinstance(text, list) and text and isinstance(text[0], str) else str(text)
        return text
    raise ConfigError(
        f"unknown prompt format {fmt!r}",
        "use one of: " + ", ".join(PROMPT_FORMATS),
    )
