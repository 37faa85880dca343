"""Reading user-supplied prompts and preference data, with row-level validation.

Sources: JSON Lines or a JSON array (.jsonl, .json, either gzipped), Parquet, a folder saved by `datasets`
`save_to_disk` (a Dataset, or one split of a DatasetDict), or a Hugging Face hub dataset id. `columns` maps our
column names to the source's. Every bad row is either a one-line error naming source, row and field
(`on_bad_rows: error`, the default) or a counted reject with its reason (`on_bad_rows: skip`); no row disappears
without being counted. Rows are numbered by line in JSON Lines (from 1) and by index elsewhere (from 0, as
`dataset[i]`, `table.slice(i)` or `jq '.[i]'` find them), and an error says which.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray import schemas
from dpo_ray.errors import InputError
from dpo_ray.text import ROLES

RawRow = tuple[int, dict | None, str, str | None]


@dataclass
class Reject:
    source: str
    row: int
    field: str
    reason: str
    raw: str


@dataclass
class ReadResult:
    rows: list[dict]
    rejects: list[Reject] = field(default_factory=list)


# owner/name or name, as the hub spells them; a source that also has a file suffix (data/typo.jsonl) or starts
# with '.' or '/' is a path, and stays a missing file rather than a hub lookup.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]*")


def is_hub_id(source: str | Path) -> bool:
    """Whether a source that is not a local path names a Hugging Face hub dataset."""
    name = str(source)
    return _HUB_ID.fullmatch(name) is not None and not _FILE_SUFFIX.fullmatch(Path(name).suffix)


def _source_rows(source: str, split: str) -> tuple[Iterator[RawRow], bool]:
    """(rows, from_zero): each row as (number, record or None, raw text, error), and whether the numbers are
    indexes from 0 rather than JSON Lines line numbers from 1."""
    path = Path(source)
    if not path.exists():
        if is_hub_id(source):
            return _indexed(_hub_dataset(source, split)), True
        raise InputError(f"{path}: file does not exist")
    if path.is_dir():
        return _indexed(_saved_dataset(path, split)), True
    if path.suffix == ".parquet":
        return _indexed(_readable(path, lambda: pq.read_table(path).to_pylist())), True
    if path.name.removesuffix(".gz").endswith((".jsonl", ".json")):
        array = _json_array(path)
        return (_json_lines(path), False) if array is None else (_indexed(array), True)
    raise InputError(f"{path}: unsupported format (expected .jsonl or .json, either gzipped, .parquet, a saved "
                     "datasets folder or a hub dataset id)")


def _indexed(records: Iterable) -> Iterator[RawRow]:
    for i, record in enumerate(records):
        if isinstance(record, dict):
            yield i, record, "", None
        else:
            yield i, None, json.dumps(record, default=str), "not a JSON object"


def _hub_dataset(name: str, split: str):
    """The `split` of a hub dataset (from the datasets cache when offline)."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except (OSError, ValueError) as err:
        raise InputError(f"{name}: not a local file or folder, and the hub dataset of that name (split {split!r}) "
                         f"could not be loaded ({type(err).__name__}: {_first_line(err)})") from err


def _saved_dataset(path: Path, split: str):
    """The rows of a folder saved by `save_to_disk`: a Dataset, or the `split` folder of a DatasetDict."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        if split not in splits:
            raise InputError(f"{path}: a saved DatasetDict without a {split!r} split (it has {', '.join(splits)}); "
                             "set data.split")
        path = path / split
    if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        raise InputError(f"{path}: a folder must be a saved `datasets` dataset (save_to_disk)")
    from datasets import load_from_disk

    return _readable(path, lambda: load_from_disk(str(path)))


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else "no detail"


def _readable(path: Path, read):
    """read() with the file named when it is not a readable Parquet/Arrow file (a bare ArrowInvalid names none)."""
    try:
        return read()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(f"{path}: cannot be read as {'a saved dataset' if path.is_dir() else 'Parquet'} "
                         f"({type(err).__name__}: {_first_line(err)})") from err


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines, gunzipped for .gz; a file that is not gzip (or is cut short) is named."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            yield from handle
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"{path}: cannot be read as gzip ({type(err).__name__}: {_first_line(err)})") from err


def _json_array(path: Path) -> list | None:
    """The items of a JSON file holding one array; None for JSON Lines.

    A first line that is an object of its own makes the file JSON Lines without reading it whole. Otherwise the
    file is tried as one document: an array is read, any other value refused; a file that is not one JSON
    document either is left to JSON Lines, whose row errors say what is wrong where.
    """
    first = next((line for line in _lines(path) if line.strip()), b"")
    try:
        if isinstance(json.loads(first), dict):
            return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    try:
        document = json.loads(b"".join(_lines(path)))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(document, list):
        return document
    kind = "one JSON object spread over several lines" if isinstance(document, dict) else \
        f"a JSON {type(document).__name__}"
    raise InputError(f"{path}: holds {kind}; give an array of row objects or JSON Lines (one object per line)")


def _json_lines(path: Path) -> Iterator[RawRow]:
    for lineno, raw in enumerate(_lines(path), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield lineno, None, raw.decode("utf-8", "replace"), f"not valid UTF-8 ({err.reason} at byte {err.start})"
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield lineno, None, text, f"not valid JSON ({err.msg})"
            continue
        if not isinstance(record, dict):
            yield lineno, None, text, "not a JSON object"
            continue
        yield lineno, record, text, None


def _check_messages(value, name: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"{name} must be a non-empty list of {{role, content}} messages"
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            return f"{name}[{i}] must be an object with a string content"
        if msg.get("role") not in ROLES:
            return f"{name}[{i}] has unknown role {msg.get('role')!r} (expected one of {', '.join(ROLES)})"
        if not msg["content"].strip() and msg["role"] != "system":
            return f"{name}[{i}] ({msg['role']}) has empty content"
    return None


def _check_text(value, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"{name} is empty"
    return None


def _with_system(prompt: str | list, system) -> tuple[str | list | None, str | None]:
    """A checked prompt with the row's `system` column as its leading system message (a text prompt becomes a
    chat): (prompt, None), or (None, the problem). A blank system is none: datasets with a system column often
    leave it empty."""
    if system is None or isinstance(system, str) and not system.strip():
        return prompt, None
    if not isinstance(system, str):
        return None, f"system must be a string, got {type(system).__name__}"
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt[0]["role"] == "system":
        return None, "given beside the prompt's own system message; give one of the two"
    return [{"role": "system", "content": system}, *prompt], None


def _validate_mapped(record: dict, row: int, columns: dict[str, str], validate):
    """validate() on the record under our column names (`columns` maps ours to the source's), its bad field named
    as the source names it. The source's columns that are mapped, or that have one of the mapped names, are
    dropped: the mapping says which column plays each part, and none plays two."""
    for ours, theirs in columns.items():
        if theirs not in record:
            return theirs, f"missing (data.columns maps {ours} to it; got columns {sorted(record)})", None
    renamed = {k: v for k, v in record.items() if k not in columns and k not in columns.values()}
    bad_field, problem, normalized = validate({**renamed, **{o: record[t] for o, t in columns.items()}}, row)
    return columns.get(bad_field, bad_field), problem, normalized


def _collect(source: str | Path, on_bad_rows: str, validate, split: str, columns: dict[str, str] | None) -> ReadResult:
    path, columns = Path(source), columns or {}
    rows, from_zero = _source_rows(str(source), split)  # as given: Path() would make "./prefs" a hub id "prefs"
    result = ReadResult(rows=[])
    seen_ids: set[str] = set()
    for row, record, raw, error in rows:
        bad_field, problem, normalized = (("<row>", error, None) if error
                                          else _validate_mapped(record, row, columns, validate))
        if normalized is not None and normalized["id"] in seen_ids:
            bad_field, problem, normalized = columns.get("id", "id"), f"duplicate id {normalized['id']!r}", None
        if normalized is None:
            if on_bad_rows == "error":
                raise InputError(f"{path}: row {row}{' (0-based)' if from_zero else ''}: field {bad_field}: {problem}")
            result.rejects.append(Reject(str(path), row, bad_field, problem, raw or json.dumps(record, default=str)))
            continue
        seen_ids.add(normalized["id"])
        result.rows.append({**normalized, "row": row})
    return result


def _row_id(record: dict, row: int) -> tuple[str | None, str | None]:
    value = record.get("id", record.get("prompt_id"))
    if value is None:
        return f"row-{row}", None
    if isinstance(value, (str, int)) and str(value).strip():
        return str(value), None
    return None, f"id must be a non-empty string or integer, got {value!r}"


def read_prompts(path: str | Path, on_bad_rows: str = "error", split: str = "train",
                 columns: dict[str, str] | None = None) -> ReadResult:
    """Rows {id, prompt, messages_json}: `prompt` text, or a chat as `messages` or as `prompt` (TRL's
    conversational prompt-only form), one of the two columns; a `system` column is the chat's system message."""

    def validate(record: dict, row: int):
        row_id, problem = _row_id(record, row)
        if problem:
            return "id", problem, None
        name = "messages" if record.get("messages") is not None else "prompt"
        if name == "messages" and record.get("prompt") is not None:
            return "prompt", "given beside messages; give one of the two (which should the model see?)", None
        if name not in record:
            return "prompt", f"missing (expected a 'prompt' text or 'messages' chat column; got {sorted(record)})", None
        given = record[name]
        if isinstance(given, list):
            problem = _check_messages(given, name)
            if problem is None and given[-1]["role"] != "user":
                problem = (f"the last turn is {given[-1]['role']!r}; a prompt chat ends with the user turn the model "
                           "answers")
        else:
            problem = _check_text(given, name)
        if problem:
            return name, problem, None
        prompt, problem = _with_system(given, record.get("system"))
        if problem:
            return "system", problem, None
        return None, None, {"id": row_id, "prompt": given[-1]["content"] if isinstance(given, list) else given,
                            "messages_json": json.dumps(prompt) if isinstance(prompt, list) else None}

    return _collect(path, on_bad_rows, validate, split, columns)


_HH_REPLY = "Assistant:"


def _split_hh(chosen: str, rejected: str) -> tuple[tuple[str, str, str] | None, str | None]:
    """Anthropic-HH text: ((prompt, chosen reply, rejected reply), None), the prompt being every turn up to and
    including the last 'Assistant:' marker, which both texts must share; or (None, the problem)."""
    cut_chosen, cut_rejected = chosen.rfind(_HH_REPLY), rejected.rfind(_HH_REPLY)
    if cut_chosen < 0 or cut_rejected < 0:
        side = "chosen" if cut_chosen < 0 else "rejected"
        return None, (f"{side} has no {_HH_REPLY!r} turn; text chosen/rejected without a prompt must be "
                      "Anthropic-HH conversations (or give a 'prompt' column)")
    if chosen[:cut_chosen] != rejected[:cut_rejected]:
        return None, f"chosen and rejected differ before their last {_HH_REPLY!r} turn (the prompt turns must match)"
    cut = cut_chosen + len(_HH_REPLY)
    return (chosen[:cut], chosen[cut:], rejected[cut_rejected + len(_HH_REPLY):]), None


def _conversation_matches_prompt(conversation: list, prompt) -> bool:
    """Whether a chosen/rejected conversation's turns before its reply are the row's prompt (or it has none)."""
    turns = conversation[:-1]
    if not turns:
        return True
    if isinstance(prompt, list):
        return turns == prompt
    return [(m["role"], m["content"]) for m in turns if m["role"] != "system"] == [("user", prompt)]


def _reply_text(value, name: str) -> tuple[str | None, str | None]:
    """A reply given as text or as a conversation ending with the assistant's message: (its text, None), or
    (None, the problem)."""
    if isinstance(value, list):
        problem = _check_messages(value, name)
        if problem:
            return None, problem
        if value[-1]["role"] != "assistant":
            return None, f"{name} must end with an assistant message"
        value = value[-1]["content"]
    problem = _check_text(value, name)
    return (None, problem) if problem else (value, None)


def _shared_conversation_turns(chosen: list, rejected: list) -> tuple[list | None, tuple[str, str] | None]:
    """Whole conversations without a prompt column: (the turns before their final replies, which both must share,
    None), or (None, (field, problem))."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        problem = _check_messages(conversation, name)
        if problem:
            return None, (name, problem)
    if chosen[:-1] != rejected[:-1]:
        return None, ("rejected", "chosen and rejected conversations differ before their last message")
    return chosen[:-1], None


def _prompt_and_replies(prompt, chosen, rejected) -> tuple[tuple | None, tuple[str, str] | None]:
    """((prompt, chosen, rejected), None) with the prompt split off whole conversations or Anthropic-HH text when
    the row has no prompt column, else as given; or (None, (field, problem))."""
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, bad = _shared_conversation_turns(chosen, rejected)
        return (None, bad) if bad else ((prompt, chosen, rejected), None)
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        split, problem = _split_hh(chosen, rejected)
        if problem:
            return None, ("rejected" if problem.startswith("rejected") else "chosen", problem)
        return split, None
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(conversation, list) and _check_messages(conversation, name) is None \
                and not _conversation_matches_prompt(conversation, prompt):
            return None, (name, "the conversation's turns before its reply differ from the row's prompt")
    return (prompt, chosen, rejected), None


def _prompt_text(prompt, system) -> tuple[str | None, str | None, tuple[str, str] | None]:
    """A preference row's prompt, text or chat, with its `system` column if any: (text, messages_json or None,
    None), or (None, None, (field, problem)). A chat's text is its messages' contents, one per line."""
    problem = _check_messages(prompt, "prompt") if isinstance(prompt, list) else _check_text(prompt, "prompt")
    if problem:
        return None, None, ("prompt", problem)
    prompt, problem = _with_system(prompt, system)
    if problem:
        return None, None, ("system", problem)
    if isinstance(prompt, list):
        return "\n".join(m["content"] for m in prompt), json.dumps(prompt), None
    return prompt, None, None


def read_preferences(path: str | Path, on_bad_rows: str = "error", split: str = "train",
                     columns: dict[str, str] | None = None) -> ReadResult:
    """Rows {id, prompt, messages_json, chosen, rejected}.

    Accepted forms: prompt/chosen/rejected as text; prompt as chat messages with text or single-message
    replies; chosen/rejected as whole conversations sharing their prompt turns (which, beside a prompt column,
    must be that prompt); chosen/rejected as Anthropic-HH text sharing every turn up to the last 'Assistant:'.
    These are TRL's standard and conversational preference forms, explicit or implicit prompt (an implicit text
    prompt only as Anthropic-HH). A `system` column is the prompt's system message.
    """

    def validate(record: dict, row: int):
        row_id, problem = _row_id(record, row)
        if problem:
            return "id", problem, None
        for name in ("chosen", "rejected"):
            if name not in record:
                return name, f"missing (got columns {sorted(record)})", None
        parts, bad = _prompt_and_replies(record.get("prompt"), record["chosen"], record["rejected"])
        if bad:
            return *bad, None
        prompt, chosen_reply, rejected_reply = parts
        prompt, messages_json, bad = _prompt_text(prompt, record.get("system"))
        if bad:
            return *bad, None
        chosen, problem = _reply_text(chosen_reply, "chosen")
        if problem:
            return "chosen", problem, None
        rejected, problem = _reply_text(rejected_reply, "rejected")
        if problem:
            return "rejected", problem, None
        if chosen == rejected:
            return "rejected", "identical to chosen", None
        return None, None, {"id": row_id, "prompt": prompt, "messages_json": messages_json,
                            "chosen": chosen, "rejected": rejected}

    return _collect(path, on_bad_rows, validate, split, columns)


def write_rejects(rejects: list[Reject], out_dir: str | Path) -> None:
    """rejects.parquet beside a stage's output, with the reason of every refused row."""
    if rejects:
        table = schemas.rows_to_table([r.__dict__ for r in rejects], schemas.REJECTS)
        pq.write_table(table, Path(out_dir) / "rejects.parquet")
