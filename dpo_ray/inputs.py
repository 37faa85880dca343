"""Reading user-supplied prompts and preference data, with row-level validation.

Sources: JSONL, Parquet, or a folder saved by `datasets.Dataset.save_to_disk`. Every bad row is either a
one-line error naming file, row and field (`on_bad_rows: error`, the default) or a counted reject with its
reason (`on_bad_rows: skip`); no row disappears without being counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray import schemas
from dpo_ray.errors import InputError
from dpo_ray.text import ROLES



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


def _iter_raw_rows(path: Path) -> Iterator[tuple[int, dict | None, str, str | None]]:
    """(row number, record or None, raw text, error) for each row; row numbers are 1-based lines for JSONL."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise InputError(f"{path}: a saved DatasetDict with splits {', '.join(splits)}; give one split's "
                             f"folder, e.g. {path / (splits[0] if splits else 'train')}")
        if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            raise InputError(f"{path}: a folder must be a saved `datasets` dataset (save_to_disk)")
        from datasets import load_from_disk

        for i, record in enumerate(_readable(path, lambda: load_from_disk(str(path)))):
            yield i, record, "", None
    elif path.suffix == ".parquet":
        for i, record in enumerate(_readable(path, lambda: pq.read_table(path).to_pylist())):
            yield i, record, "", None
    elif path.suffix in (".jsonl", ".json"):
        _refuse_whole_file_json(path)
        with open(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield (lineno, None, raw.decode("utf-8", "replace"),
                           f"not valid UTF-8 ({err.reason} at byte {err.start})")
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
    else:
        raise InputError(f"{path}: unsupported format (expected .jsonl, .parquet or a saved datasets folder)")


def _readable(path: Path, read):
    """read() with the file named when it is not a readable Parquet/Arrow file (a bare ArrowInvalid names none)."""
    try:
        return read()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(f"{path}: cannot be read as {'a saved dataset' if path.is_dir() else 'Parquet'} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})") from err


def _refuse_whole_file_json(path: Path) -> None:
    """A pretty-printed JSON array or object is one document, not JSON Lines: say so instead of 'row 1: not
    valid JSON'."""
    with open(path, "rb") as handle:
        first_line = handle.readline()
    try:
        json.loads(first_line)
        return  # the first line is a record of its own: JSON Lines
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not one JSON document either: the row-level errors say what is wrong
    kind = "an array" if isinstance(document, list) else "one JSON value"
    raise InputError(f"{path}: holds {kind} spread over several lines, but dpo-ray reads JSON Lines (one object "
                     "per line); convert it, e.g. jq -c '.[]' file.json > file.jsonl")


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


def _collect(path: Path, on_bad_rows: str, validate) -> ReadResult:
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    result = ReadResult(rows=[])
    seen_ids: set[str] = set()
    for row, record, raw, error in _iter_raw_rows(path):
        bad_field, problem, normalized = ("<row>", error, None) if error else validate(record, row)
        if normalized is not None and normalized["id"] in seen_ids:
            bad_field, problem, normalized = "id", f"duplicate id {normalized['id']!r}", None
        if normalized is None:
            if on_bad_rows == "error":
                raise InputError(f"{path}: row {row}: field {bad_field}: {problem}")
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


def read_prompts(path: str | Path, on_bad_rows: str = "error") -> ReadResult:
    """Rows {id, prompt, messages_json}: `prompt` text or `messages` chat, exactly one of them."""

    def validate(record: dict, row: int):
        row_id, problem = _row_id(record, row)
        if problem:
            return "id", problem, None
        if "messages" in record and record["messages"] is not None:
            if record.get("prompt") is not None:
                return "prompt", "given beside messages; give one of the two (which should the model see?)", None
            messages = record["messages"]
            problem = _check_messages(messages, "messages")
            if problem:
                return "messages", problem, None
            if messages[-1]["role"] != "user":
                return "messages", (f"the last turn is {messages[-1]['role']!r}; a prompt chat ends with the "
                                    "user turn the model answers"), None
            return None, None, {"id": row_id, "prompt": messages[-1]["content"], "messages_json": json.dumps(messages)}
        if "prompt" not in record:
            return "prompt", f"missing (expected a 'prompt' text or 'messages' chat column; got {sorted(record)})", None
        problem = _check_text(record["prompt"], "prompt")
        if problem:
            return "prompt", problem, None
        return None, None, {"id": row_id, "prompt": record["prompt"], "messages_json": None}

    return _collect(Path(path), on_bad_rows, validate)


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


def _prompt_text(prompt) -> tuple[str | None, str | None, str | None]:
    """A preference row's prompt, text or chat: (text, messages_json or None, None), or (None, None, the problem).
    A chat's text is its messages' contents, one per line."""
    if isinstance(prompt, list):
        problem = _check_messages(prompt, "prompt")
        if problem:
            return None, None, problem
        return "\n".join(m["content"] for m in prompt), json.dumps(prompt), None
    problem = _check_text(prompt, "prompt")
    return (None, None, problem) if problem else (prompt, None, None)


def read_preferences(path: str | Path, on_bad_rows: str = "error") -> ReadResult:
    """Rows {id, prompt, messages_json, chosen, rejected}.

    Accepted forms: prompt/chosen/rejected as text; prompt as chat messages with text or single-message
    replies; chosen/rejected as whole conversations sharing their prompt turns (which, beside a prompt column,
    must be that prompt); chosen/rejected as Anthropic-HH text sharing every turn up to the last 'Assistant:'.
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
        prompt, messages_json, problem = _prompt_text(prompt)
        if problem:
            return "prompt", problem, None
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

    return _collect(Path(path), on_bad_rows, validate)


def write_rejects(rejects: list[Reject], out_dir: str | Path) -> None:
    """rejects.parquet beside a stage's output, with the reason of every refused row."""
    if rejects:
        table = schemas.rows_to_table([r.__dict__ for r in rejects], schemas.REJECTS)
        pq.write_table(table, Path(out_dir) / "rejects.parquet")
