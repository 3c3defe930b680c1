"""Dataset preflight: read a run's dataset far enough to prove the stage's TRL trainer will take it.

Every door (the CLI's launch, dry run and export, the page's launch, the runs API) calls
`check_dataset` before a plan is built or a process started, and the trainer entry calls it again
when a run fails while reading its data, to name the row. A problem is bad input: a PlanInputError
on the field `dataset` whose reason names the file, the line (or row) and the fix, e.g.
`data.jsonl line 7: not JSON (Expecting ',' delimiter, column 23); each line must be one JSON object`.

What is checked: the format (JSONL, JSON, CSV, Parquet, Arrow, or a directory of them, as the
launcher's `datasets` loaders read them), the fields the stage's trainer reads (TRL's names), at
least one row, well-formed messages, the model tokenizer's chat template where rows hold messages,
and the longest row in tokens against the planned sequence length (a warning: the trainer
truncates it). A hub dataset is not read here.

Speed: a 100 MB JSONL is parsed by pyarrow (the reader `datasets` itself uses) as a gate that says
"every row is fine" at C speed; only when it cannot say so are the lines read one by one in Python,
stopping at the first bad one. The longest row is found by byte length, one cheap pass. Pure: no
torch, no transformers, no app; pyarrow, tokenizers, jinja2 and huggingface_hub are used when
installed and skipped when not.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import PlanInputError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
# The fields each stage's trainer reads, as alternatives in order of preference (TRL 1.16's names).
SHAPES: dict[str, tuple[tuple[str, ...], ...]] = {
    "sft": (("messages",), ("text",), ("prompt", "completion")),
    "dpo": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "kto": (("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "grpo": (("prompt",),),
}
for _stage in ("orpo", "simpo", "reward"):
    SHAPES[_stage] = SHAPES["dpo"]
SHAPES["rloo"] = SHAPES["grpo"]
NEEDS = {
    "sft": "text, messages, or prompt and completion",
    "dpo": "prompt, chosen and rejected", "orpo": "prompt, chosen and rejected", "simpo": "prompt, chosen and rejected",
    "reward": "chosen and rejected (and prompt)",
    "kto": "prompt, completion and label (true/false), or prompt, chosen and rejected",
    "grpo": "prompt", "rloo": "prompt",
}
TEXT_OR_MESSAGES = ("prompt", "completion", "chosen", "rejected")
CHUNK_BYTES = 16 << 20  # a JSONL is proven in chunks of whole lines this large
DEEP_ROWS = 2000  # rows of a Parquet, Arrow or CSV file checked one by one (the rest by their columns)
CHARS_PER_TOKEN = 4  # without a tokenizer, the longest row's tokens are estimated from its characters


@dataclass
class DatasetCheck:
    """What the preflight found: what the doors show beside the dry run."""

    dataset: str
    checked: bool  # False: a hub dataset, not read here
    rows: int | None = None
    fields: tuple[str, ...] = ()
    longest_row: str | None = None  # "line 12" / "row 3"
    longest_chars: int | None = None
    longest_tokens: int | None = None
    tokens_counted: bool = False  # True: the model's tokenizer counted them; False: estimated from characters
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "checked": self.checked, "rows": self.rows, "fields": list(self.fields),
                "longest_row": self.longest_row, "longest_chars": self.longest_chars, "longest_tokens": self.longest_tokens,
                "tokens_counted": self.tokens_counted, "warnings": list(self.warnings), "summary": self.summary()}

    def summary(self) -> str:
        if not self.checked:
            return f"dataset {self.dataset}: a hub dataset, not read before the run"
        longest = ""
        if self.longest_tokens is not None:
            longest = f"; longest row {self.longest_row}, {'' if self.tokens_counted else 'about '}{self.longest_tokens:,} tokens"
        return f"dataset {self.dataset}: {self.rows:,} rows with {', '.join(self.fields)}{longest}"


class _Bad(Exception):
    """One row's problem, before the file and line are put in front of it."""


def _problem(where: str, text: str) -> PlanInputError:
    return PlanInputError("dataset", f"{where}: {text}")


# -- the rows -----------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_messages(name: str, value: list) -> None:
    if not value:
        raise _Bad(f'"{name}" is an empty list; it needs at least one message')
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _Bad(f'{name}[{i}] is {_kind(message)}; each message is {{"role": ..., "content": ...}}')
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise _Bad(f'{name}[{i}] has no "role"; each message is {{"role": "user" | "assistant" | "system", "content": ...}}')
        if "content" not in message:
            raise _Bad(f'{name}[{i}] has no "content"; each message is {{"role": ..., "content": ...}}')
        content = message["content"]
        if content is None and not message.get("tool_calls"):
            raise _Bad(f'{name}[{i}] has null "content"; give the message its text')
        if content is not None and not isinstance(content, str | list):
            raise _Bad(f'{name}[{i}] "content" is {_kind(content)}; it must be a string (or a list of parts)')


def _check_row(row: Any, shape: tuple[str, ...], first: str) -> None:
    if not isinstance(row, dict):
        raise _Bad(f"is {_kind(row)}, not a JSON object; each row must be an object with {', '.join(shape)}")
    for name in shape:
        if name not in row:
            raise _Bad(f'no "{name}" field ({first} has it); every row needs {", ".join(shape)}')
        value = row[name]
        if value is None:
            raise _Bad(f'"{name}" is null; every row needs {", ".join(shape)}')
        if name == "text" and not isinstance(value, str):
            raise _Bad(f'"text" is {_kind(value)}; it must be a string')
        if name == "messages":
            if not isinstance(value, list):
                raise _Bad(f'"messages" is {_kind(value)}; it must be a list of {{"role": ..., "content": ...}} objects')
            _check_messages(name, value)
        if name in TEXT_OR_MESSAGES:
            if isinstance(value, list):
                _check_messages(name, value)
            elif not isinstance(value, str):
                raise _Bad(f'"{name}" is {_kind(value)}; it must be a string or a list of messages')
        if name == "label" and not isinstance(value, bool):
            raise _Bad(f'"label" is {_kind(value)}; it must be true (a desirable completion) or false')


def _choose_shape(row: Any, stage: str) -> tuple[str, ...]:
    """The fields the trainer will read, from the first row; raises _Bad when it has none of them."""
    if not isinstance(row, dict):
        raise _Bad(f"is {_kind(row)}, not a JSON object; each row must be an object with {NEEDS[stage]}")
    for shape in SHAPES[stage]:
        if all(name in row for name in shape):
            return shape
    has = ", ".join(list(row)[:8]) or "no fields"
    missing = ""
    for shape in SHAPES[stage]:  # the nearest shape: say which of its fields are missing
        present = [n for n in shape if n in row]
        if present:
            missing = f" (no {', '.join(n for n in shape if n not in row)})"
            break
    return _raise(f"has {has}{missing}, not the fields the {stage} trainer reads; give every row {NEEDS[stage]}")


def _raise(text: str):
    raise _Bad(text)


def _row_text(row: dict, shape: tuple[str, ...]) -> tuple[str, list | None]:
    """(the row's text as the trainer sees one sequence, its messages when conversational)."""
    parts: list = []
    for name in shape:
        if name in ("label",):
            continue
        if name == "rejected" and "chosen" in shape:
            # one sequence is the prompt with the longer of the two answers
            a, b = row.get("chosen"), row.get("rejected")
            if len(json.dumps(b, ensure_ascii=False)) <= len(json.dumps(a, ensure_ascii=False)):
                continue
            parts = [p for p in parts if p[0] != "chosen"]
        parts.append((name, row.get(name)))
    messages: list = []
    texts: list[str] = []
    for _, value in parts:
        if isinstance(value, list):
            messages.extend(v for v in value if isinstance(v, dict))
            texts.extend(_content_text(v.get("content")) for v in value if isinstance(v, dict))
        elif isinstance(value, str):
            texts.append(value)
    return "\n".join(texts), (messages or None)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return ""


# -- the formats --------------------------------------------------------------------------------


@dataclass
class _Found:
    rows: int
    shape: tuple[str, ...]
    longest_where: str | None = None
    longest_row: dict | None = None
    longest_chars: int | None = None


def _scan_jsonl(path: Path, name: str, stage: str) -> _Found:
    """Line by line, stopping at the first bad line: the exact, slower reader."""
    with open(path, "rb") as fh:
        found = _scan_lines(fh, 1, name, stage, None, "")
    if found.shape is None:
        raise _problem(name, f"no rows; the {stage} trainer needs at least one row with {NEEDS[stage]}")
    return found


def _scan_lines(lines, start: int, name: str, stage: str, shape: tuple[str, ...] | None, first: str) -> _Found:
    """Checks each line from line number `start`; raises at the first bad one. The shape: given, or the first row's."""
    rows = 0
    longest = (-1, 0, None)
    for number, raw in enumerate(lines, start=start):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except UnicodeDecodeError:
            raise _problem(f"{name} line {number}", "not UTF-8 text; save the file as UTF-8") from None
        except ValueError as exc:
            detail = f"{exc.msg}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            hint = "each line must be one JSON object"
            if number == 1 and raw.strip().startswith(b"["):
                hint = "a JSONL file holds one JSON object per line, not a list (name a JSON list .json)"
            raise _problem(f"{name} line {number}", f"not JSON ({detail}); {hint}") from None
        try:
            if shape is None:
                shape, first = _choose_shape(row, stage), f"line {number}"
            _check_row(row, shape, first)
        except _Bad as exc:
            raise _problem(f"{name} line {number}", str(exc)) from None
        rows += 1
        if len(raw) > longest[0]:
            longest = (len(raw), number, row)
    return _Found(rows, shape, f"line {longest[1]}", longest[2], longest[0] if longest[0] >= 0 else None)


def _arrow_type_ok(column, name: str) -> bool:
    """True when pyarrow's column type and nulls prove every row right for `name`; False: unsure."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        return False
    kind = column.type
    if name == "label":
        return pa.types.is_boolean(kind)
    if name == "text":
        return pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if name in TEXT_OR_MESSAGES and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return True
    if name in TEXT_OR_MESSAGES or name == "messages":
        if not pa.types.is_list(kind) and not pa.types.is_large_list(kind):
            return False
        item = kind.value_type
        if not pa.types.is_struct(item) or item.get_field_index("role") < 0 or item.get_field_index("content") < 0:
            return False
        if not (pa.types.is_string(item.field("role").type) and pa.types.is_string(item.field("content").type)):
            return False
        if len(column) and pc.min(pc.list_value_length(column)).as_py() == 0:
            return False
        flat = pc.list_flatten(column)
        return flat.null_count == 0 and pc.struct_field(flat, "role").null_count == 0 and pc.struct_field(flat, "content").null_count == 0 \
            and (len(flat) == 0 or pc.min(pc.utf8_length(pc.struct_field(flat, "role"))).as_py() > 0)
    return False


def _gate(table, shape: tuple[str, ...]) -> bool:
    """True when the table's columns prove every row right for `shape`; False: the rows are read one by one."""
    names = set(table.column_names)
    return bool(table.num_rows) and all(n in names and _arrow_type_ok(table.column(n), n) for n in shape)


def _jsonl(path: Path, name: str, stage: str) -> _Found:
    """In chunks of whole lines: pyarrow proves a chunk right column by column (the gate); a chunk it
    cannot is read line by line, which names the first bad line. A late error costs one chunk of Python."""
    first = _first_row(path)
    shape = _choose_shape_quiet(first, stage) if isinstance(first, dict) else None
    if shape is None:
        return _scan_jsonl(path, name, stage)  # stops at the first line and says why
    try:
        import pyarrow.json as pj
    except ImportError:
        return _scan_jsonl(path, name, stage)
    first_at = "line 1"
    rows, line, best = 0, 1, (-1, 0, b"")
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            if not chunk.endswith(b"\n"):
                chunk += fh.readline()
            lines = chunk.split(b"\n")
            if lines[-1] == b"":
                lines.pop()
            try:
                table = pj.read_json(io.BytesIO(chunk))
                proven = _gate(table, shape)
                count = table.num_rows
                del table
            except Exception:
                proven = False
            if not proven:
                found = _scan_lines(lines, line, name, stage, shape, first_at)  # raises at the bad line
                count = found.rows
            longest = max(range(len(lines)), key=lambda i: len(lines[i]), default=None)
            if longest is not None and len(lines[longest]) > best[0]:
                best = (len(lines[longest]), line + longest, lines[longest])
            rows += count
            line += len(lines)
    if not rows:
        raise _problem(name, f"no rows; the {stage} trainer needs at least one row with {NEEDS[stage]}")
    try:
        row = json.loads(best[2])
    except ValueError:
        row = None
    return _Found(rows, shape, f"line {best[1]}", row if isinstance(row, dict) else None, best[0])


def _first_row(path: Path):
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    return json.loads(raw)
                except ValueError:
                    return None
    return None


def _choose_shape_quiet(row: dict, stage: str) -> tuple[str, ...] | None:
    try:
        return _choose_shape(row, stage)
    except _Bad:
        return None


def _json(path: Path, name: str, stage: str) -> _Found:
    """A .json file: JSON Lines (as `datasets` reads first), or one list of objects, or an object of columns."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        if head.startswith(b"{"):
            try:
                return _jsonl(path, name, stage)
            except PlanInputError as exc:
                whole = _load_whole(path, name)
                if isinstance(whole, dict):
                    return _rows(_columns_to_rows(whole, name), name, stage)
                raise exc from None
        if not head:
            raise _problem(name, f"no rows; the {stage} trainer needs at least one row with {NEEDS[stage]}")
    whole = _load_whole(path, name)
    if isinstance(whole, dict):
        return _rows(_columns_to_rows(whole, name), name, stage)
    if not isinstance(whole, list):
        raise _problem(name, f"holds {_kind(whole)}; a JSON dataset is a list of objects, or one object per line (JSONL)")
    return _rows(whole, name, stage)


def _load_whole(path: Path, name: str):
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except UnicodeDecodeError:
        raise _problem(name, "not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _problem(f"{name} line {exc.lineno}", f"not JSON ({exc.msg}, column {exc.colno}); the file must be one JSON list of objects, or one object per line") from None


def _columns_to_rows(data: dict, name: str) -> list:
    columns = {k: v for k, v in data.items() if isinstance(v, list)}
    if not columns or len({len(v) for v in columns.values()}) != 1:
        raise _problem(name, "holds one JSON object; a JSON dataset is a list of objects, or one object per line (JSONL)")
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _rows(rows: list, name: str, stage: str, where=lambda i: f"row {i + 1}") -> _Found:
    if not rows:
        raise _problem(name, f"no rows; the {stage} trainer needs at least one row with {NEEDS[stage]}")
    shape = None
    longest = (-1, 0)
    for i, row in enumerate(rows):
        try:
            if shape is None:
                shape = _choose_shape(row, stage)
            _check_row(row, shape, where(0))
        except _Bad as exc:
            raise _problem(f"{name} {where(i)}", str(exc)) from None
        size = len(json.dumps(row, ensure_ascii=False, default=str))
        if size > longest[0]:
            longest = (size, i)
    return _Found(len(rows), shape, where(longest[1]), rows[longest[1]], longest[0])


def _table(table, name: str, stage: str, where) -> _Found:
    """Parquet, Arrow, or CSV read by pyarrow: every column's type and nulls, the first rows one by one."""
    if table.num_rows == 0:
        raise _problem(name, f"no rows; the {stage} trainer needs at least one row with {NEEDS[stage]}")
    head = table.slice(0, DEEP_ROWS).to_pylist()
    found = _rows(head, name, stage, where)
    shape = found.shape
    for column_name in shape:
        column = table.column(column_name)
        if column.null_count:
            import pyarrow.compute as pc

            index = pc.index(pc.is_null(column), True).as_py()
            raise _problem(f"{name} {where(index)}", f'"{column_name}" is empty; every row needs {", ".join(shape)}')
    return _Found(table.num_rows, shape, found.longest_where, found.longest_row, found.longest_chars)


def _csv(path: Path, name: str, stage: str) -> _Found:
    where = lambda i: f"line {i + 2}"  # the header is line 1
    try:
        import pyarrow.csv as pcsv
    except ImportError:
        pcsv = None
    if pcsv is not None:
        try:
            # `datasets` reads CSV with pandas, where an empty cell is a missing value: so here too
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        except Exception as exc:  # pyarrow names the row: say it in its words
            raise _problem(name, f"not a CSV file pyarrow can read ({str(exc).splitlines()[0]}); one header line, then one row per line") from None
        _no_messages(table.column_names, name)
        return _table(table, name, stage, where)
    with open(path, newline="", encoding="utf-8", errors="strict") as fh:
        reader = csv.DictReader(fh)
        _no_messages(reader.fieldnames or [], name)
        return _rows(list(reader), name, stage, where)


def _no_messages(columns, name: str) -> None:
    if "messages" in columns:
        raise _problem(name, "a CSV cell holds text, not a list of messages; write conversations as JSONL, one {\"messages\": [...]} per line")


def _parquet(path: Path, name: str, stage: str) -> _Found:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _problem(name, "reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise _problem(name, f"not a Parquet file pyarrow can read ({str(exc).splitlines()[0]})") from None
    return _table(table, name, stage, lambda i: f"row {i + 1}")


def _arrow(path: Path, name: str, stage: str) -> _Found:
    try:
        import pyarrow as pa
    except ImportError:
        raise _problem(name, "reading Arrow needs pyarrow (pip install pyarrow)") from None
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except Exception as exc:
        raise _problem(name, f"not an Arrow stream file ({str(exc).splitlines()[0]}); `datasets` writes one with Dataset.save_to_disk") from None
    return _table(table, name, stage, lambda i: f"row {i + 1}")


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".arrow": _arrow}


def _data_files(directory: Path, split: str) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in READERS and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    named = [p for p in files if p.stem.lower().startswith(split.split("[")[0].lower()) or split.split("[")[0].lower() in [q.lower() for q in p.relative_to(directory).parts[:-1]]]
    return named or files


# -- the tokenizer ------------------------------------------------------------------------------


@dataclass
class _Tokenizer:
    encode: Any  # str -> int (tokens), or None
    chat_template: str | None
    specials: dict


def _find_tokenizer(model: str | Path | None) -> _Tokenizer | None:
    """The model's tokenizer.json and its chat template, from a local directory or the hub cache; None when not at hand."""
    if not model:
        return None
    files: dict[str, Path] = {}
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
    directory = Path(str(model)).expanduser()
    if directory.is_dir():
        files = {n: directory / n for n in names if (directory / n).is_file()}
    elif "/" in str(model) and not str(model).startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        for n in names:
            try:
                hit = try_to_load_from_cache(str(model), n)
            except Exception:
                hit = None
            if isinstance(hit, str):
                files[n] = Path(hit)
    if "tokenizer_config.json" not in files and "tokenizer.json" not in files:
        return None
    try:
        config = json.loads(files["tokenizer_config.json"].read_text()) if "tokenizer_config.json" in files else {}
    except (OSError, ValueError):
        config = {}
    template = None
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"].read_text()
    elif "chat_template.json" in files:
        try:
            template = json.loads(files["chat_template.json"].read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            template = None
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    encode = None
    if "tokenizer.json" in files:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(files["tokenizer.json"]))
            encode = lambda text: len(tok.encode(text, add_special_tokens=False).ids)
        except Exception:
            encode = None
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return _Tokenizer(encode, template if isinstance(template, str) else None, specials)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class _TemplateRefused(Exception):
    pass


def _render(template: str, messages: list, specials: dict) -> str | None:
    """The chat template applied as transformers applies it; None when it cannot be rendered here
    (an extension transformers adds): the row's text is counted instead."""
    try:
        from jinja2 import ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise _TemplateRefused(message)

    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("time").strftime(fmt)
        return env.from_string(template).render(messages=messages, add_generation_prompt=False, **specials)
    except _TemplateRefused:
        raise
    except Exception:
        return None


# -- the one entry ------------------------------------------------------------------------------


def check_dataset(dataset: str, stage: str, *, kind: str | None = None, seq_len: int | None = None, model: str | Path | None = None,
                  split: str = "train") -> DatasetCheck:
    """Proves `stage`'s trainer will take `dataset` (a file or directory path, or a hub id with kind="hub"),
    or raises PlanInputError("dataset", "<file> line N: <what is wrong>; <the fix>"). Warnings (the longest
    row over `seq_len`) come back in the result. `model`: a model directory or hub id whose tokenizer,
    where at hand, counts the longest row and holds the chat template messages need."""
    if stage not in SHAPES:
        return DatasetCheck(dataset, checked=False)
    path = Path(dataset).expanduser()
    if kind == "hub" or (kind is None and not path.exists()):
        if kind is None and (dataset.startswith((".", "/", "~")) or path.suffix.lower() in READERS):
            raise _problem(dataset, "no such file or directory")
        return DatasetCheck(dataset, checked=False)
    name = path.name or dataset
    if path.is_dir():
        files = _data_files(path, split)
        if not files:
            raise _problem(name, f"a directory holding no data file ({', '.join(DATA_SUFFIXES)}); put the {split} rows in one, e.g. {split}.jsonl")
        parts = [(file, READERS[file.suffix.lower()](file, str(file.relative_to(path.parent)), stage)) for file in files]
        file, found = max(parts, key=lambda p: p[1].longest_chars or len(json.dumps(p[1].longest_row or {})))
        found = _Found(sum(p[1].rows for p in parts), found.shape, f"{file.name} {found.longest_where}", found.longest_row, found.longest_chars)
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise _problem(name, f"a dataset file ends in {', '.join(DATA_SUFFIXES)}")
        try:
            found = reader(path, name, stage)
        except OSError as exc:
            raise _problem(name, f"cannot be read ({exc.strerror or exc})") from None
    result = DatasetCheck(dataset, checked=True, rows=found.rows, fields=found.shape, longest_row=found.longest_where)
    _measure_longest(result, found, stage, seq_len, model, name)
    return result


def _measure_longest(result: DatasetCheck, found: _Found, stage: str, seq_len: int | None, model, name: str) -> None:
    row = found.longest_row if isinstance(found.longest_row, dict) else None
    if row is None:
        return
    text, messages = _row_text(row, found.shape)
    result.longest_chars = len(text)
    tokenizer = _find_tokenizer(model)
    if messages is not None and tokenizer is not None and tokenizer.chat_template is None and tokenizer.encode is not None:
        raise _problem(name, f"rows hold messages ({', '.join(found.shape)}), but the model's tokenizer has no chat template to turn them into text; "
                             "give rows as plain text, or train a model whose tokenizer has one (an instruct model)")
    rendered = None
    if messages is not None and tokenizer is not None and tokenizer.chat_template:
        try:
            rendered = _render(tokenizer.chat_template, messages, tokenizer.specials)
        except _TemplateRefused as exc:
            raise _problem(f"{name} {found.longest_where}", f"the model's chat template refuses these messages ({exc}); fix the roles or their order") from None
    if tokenizer is not None and tokenizer.encode is not None:
        result.longest_tokens = tokenizer.encode(rendered if rendered is not None else text)
        result.tokens_counted = True
    else:
        result.longest_tokens = math.ceil(len(text) / CHARS_PER_TOKEN)
    if seq_len and result.longest_tokens > seq_len:
        about = "" if result.tokens_counted else "about "
        result.warnings.append(f"the longest row ({found.longest_where}) is {about}{result.longest_tokens:,} tokens, over the planned seq_len {seq_len:,}: "
                               f"the trainer truncates it (raise --seq-len, and plan again, to keep it whole)")


def preflight(settings, options: dict, model: str | Path | None, *, for_export: bool = False) -> DatasetCheck | None:
    """The doors' call, before the plan is built: the dataset path resolved (a typo is bad input at once)
    and read. `settings`: launcher.spec.RunSettings; `options`: the plan options as JSON (stage, seq_len).
    An export names a dataset for another machine: one not here is not read (None)."""
    from launcher.spec import check_launchable, resolve_dataset

    check_launchable(options, settings, for_export)  # what cannot run at all is said before what is wrong with its data
    ref = resolve_dataset(settings.dataset, must_exist=not for_export)
    if for_export and ref.kind != "hub" and not Path(ref.location).expanduser().exists():
        return None
    return check_dataset(ref.location, options.get("stage") or "sft", kind=ref.kind, seq_len=options.get("seq_len"), model=model,
                         split=settings.dataset_split)
