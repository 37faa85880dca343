"""read_prompts / read_preferences / write_rejects on temp files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray import schemas
from dpo_ray.inputs import InputError, read_preferences, read_prompts, write_rejects


def write_lines(path, lines: list) -> None:
    """Each item: a dict (JSON-encoded), a str (written as is) or bytes (written raw)."""
    with open(path, "wb") as handle:
        for item in lines:
            if isinstance(item, dict):
                item = json.dumps(item)
            if isinstance(item, str):
                item = item.encode("utf-8")
            handle.write(item + b"\n")


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts_good_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    write_lines(path, [
        {"id": "a", "prompt": "Write a review."},
        "",
        {"prompt": "No id here."},
        {"prompt_id": 7, "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi?"}]},
    ])
    read = read_prompts(path)
    assert read.rejects == []
    assert [r["id"] for r in read.rows] == ["a", "row-3", "7"]
    assert [r["row"] for r in read.rows] == [1, 3, 4]  # 1-based line numbers, blank line skipped
    assert read.rows[0]["prompt"] == "Write a review." and read.rows[0]["messages_json"] is None
    assert read.rows[2]["prompt"] == "Hi?"
    assert json.loads(read.rows[2]["messages_json"])[0] == {"role": "system", "content": "Be brief."}


def test_malformed_json_error_names_file_line_field(tmp_path):
    path = tmp_path / "p.jsonl"
    write_lines(path, [{"prompt": "ok"}, {"prompt": "fine"}, '{"prompt": "broken"'])
    with pytest.raises(InputError) as info:
        read_prompts(path)
    message = str(info.value)
    assert str(path) in message
    assert "row 3" in message
    assert "<row>" in message
    assert "JSON" in message


def test_bad_field_error_names_file_line_field(tmp_path):
    path = tmp_path / "p.jsonl"
    write_lines(path, [{"prompt": "ok"}, "", {"id": "x", "prompt": 42}])
    with pytest.raises(InputError) as info:
        read_prompts(path)
    message = str(info.value)
    assert str(path) in message and "row 3" in message and "field prompt" in message
    assert "\n" not in message


BAD_PROMPT_LINES = [
    # (line content, field, reason fragment)
    ('{"prompt": "unterminated', "<row>", "not valid JSON"),
    ({"id": "m", "text": "no prompt column"}, "prompt", "missing"),
    ({"id": "t", "prompt": ["a", "list"]}, "prompt", "must be a string"),
    ({"id": "e", "prompt": "   "}, "prompt", "empty"),
    (b'{"id": "u", "prompt": "caf\xe9 \xff"}', "<row>", "UTF-8"),
    ({"id": "good-1", "prompt": "duplicate me"}, "id", "duplicate id 'good-1'"),
    ({"id": "r", "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "unknown role 'wizard'"),
    ("[1, 2, 3]", "<row>", "not a JSON object"),
    ({"id": "c", "messages": [{"role": "user", "content": " \n"}]}, "messages", "messages[0] (user) has empty content"),
    ({"id": "b", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "given beside messages"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages", "the last turn is 'assistant'"),
    ({"id": "s", "messages": [{"role": "system", "content": "Be brief."}]}, "messages", "the last turn is 'system'"),
]


def make_mixed_prompts(path):
    lines = [{"id": "good-1", "prompt": "First good prompt."}, "   "]
    bad_rows = {}
    for content, field, reason in BAD_PROMPT_LINES:
        lines.append(content)
        bad_rows[len(lines)] = (field, reason)
        if len(lines) == 5:
            lines.append({"id": "good-2", "messages": [{"role": "user", "content": "Second good."}]})
    lines.append({"id": "good-3", "prompt": "Last good prompt."})
    write_lines(path, lines)
    non_blank = sum(1 for item in lines if not (isinstance(item, str) and not item.strip()))
    return bad_rows, non_blank


def test_skip_bad_prompt_rows_counts_every_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    bad_rows, non_blank = make_mixed_prompts(path)
    read = read_prompts(path, on_bad_rows="skip")
    assert [r["id"] for r in read.rows] == ["good-1", "good-2", "good-3"]
    assert len(read.rows) + len(read.rejects) == non_blank
    got = {r.row: r for r in read.rejects}
    assert set(got) == set(bad_rows)
    for row, (field, reason) in bad_rows.items():
        reject = got[row]
        assert reject.field == field, (row, reject)
        assert reason in reject.reason, (row, reject)
        assert reject.source == str(path)
        assert reject.raw  # the offending content is kept for the reader


def test_skip_keeps_raw_of_non_utf8_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    write_lines(path, [b'{"prompt": "\xff\xfe"}', {"prompt": "ok"}])
    read = read_prompts(path, on_bad_rows="skip")
    assert len(read.rows) == 1 and len(read.rejects) == 1
    assert read.rejects[0].row == 1 and "prompt" in read.rejects[0].raw


def test_error_mode_is_default(tmp_path):
    path = tmp_path / "mixed.jsonl"
    make_mixed_prompts(path)
    with pytest.raises(InputError, match="row 3"):
        read_prompts(path)


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "absent.jsonl")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhello\n")
    with pytest.raises(InputError, match="unsupported"):
        read_prompts(csv)
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    with pytest.raises(InputError, match="datasets"):
        read_prompts(folder)


def test_prompts_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b", "c"],
        "prompt": ["First.", "", "Third."],
    }), path)
    read = read_prompts(path, on_bad_rows="skip")
    assert [(r["id"], r["prompt"]) for r in read.rows] == [("a", "First."), ("c", "Third.")]
    assert len(read.rejects) == 1 and read.rejects[0].field == "prompt"


def test_prompts_parquet_chat_column(tmp_path):
    path = tmp_path / "chat.parquet"
    messages = [[{"role": "user", "content": "Hello?"}], [{"role": "user", "content": "Bye?"}]]
    pq.write_table(pa.table({"messages": messages}), path)
    read = read_prompts(path)
    assert [r["prompt"] for r in read.rows] == ["Hello?", "Bye?"]
    assert json.loads(read.rows[1]["messages_json"]) == messages[1]


def test_prompts_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([
        {"id": "x", "prompt": "One."},
        {"id": "y", "prompt": "Two."},
    ]).save_to_disk(str(folder))
    read = read_prompts(folder)
    assert [(r["id"], r["prompt"]) for r in read.rows] == [("x", "One."), ("y", "Two.")]
    assert read.rejects == []


# ------------------------------------------------------------------------------------------ preferences


def test_preferences_text_columns(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_lines(path, [{"id": "p1", "prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}])
    (row,) = read_preferences(path).rows
    assert (row["id"], row["prompt"], row["chosen"], row["rejected"]) == ("p1", "Q?", "Good.", "Bad.")
    assert row["messages_json"] is None


def test_preferences_chat_prompt(tmp_path):
    path = tmp_path / "prefs.jsonl"
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate this."}]
    write_lines(path, [{
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Five stars."}],
        "rejected": "One star.",
    }])
    (row,) = read_preferences(path).rows
    assert json.loads(row["messages_json"]) == prompt
    assert row["chosen"] == "Five stars." and row["rejected"] == "One star."
    assert "Rate this." in row["prompt"]


def test_preferences_whole_conversations(tmp_path):
    path = tmp_path / "prefs.jsonl"
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Tell me a joke."}]
    write_lines(path, [
        {"chosen": shared + [{"role": "assistant", "content": "A funny joke."}],
         "rejected": shared + [{"role": "assistant", "content": "No."}]},
        {"chosen": shared + [{"role": "assistant", "content": "A."}],
         "rejected": shared[:1] + [{"role": "assistant", "content": "B."}]},
    ])
    read = read_preferences(path, on_bad_rows="skip")
    (row,) = read.rows
    assert json.loads(row["messages_json"]) == shared
    assert row["chosen"] == "A funny joke." and row["rejected"] == "No."
    (reject,) = read.rejects
    assert reject.row == 2 and reject.field == "rejected" and "differ" in reject.reason


def test_preferences_anthropic_hh_text(tmp_path):
    path = tmp_path / "hh.jsonl"
    write_lines(path, [{
        "chosen": "\n\nHuman: hi\n\nAssistant: good answer",
        "rejected": "\n\nHuman: hi\n\nAssistant: bad answer",
    }])
    (row,) = read_preferences(path).rows
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    assert row["chosen"].strip() == "good answer"
    assert row["rejected"].strip() == "bad answer"
    assert row["prompt"] + row["chosen"] == "\n\nHuman: hi\n\nAssistant: good answer"


def test_preferences_anthropic_hh_multi_turn(tmp_path):
    path = tmp_path / "hh.jsonl"
    history = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant:"
    write_lines(path, [{"chosen": history + " It is 4.", "rejected": history + " It is 5."}])
    (row,) = read_preferences(path).rows
    assert row["prompt"] == history
    assert row["chosen"] == " It is 4." and row["rejected"] == " It is 5."


def test_preferences_bad_rows(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_lines(path, [
        {"prompt": "Q", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Q", "chosen": "Only chosen."},
        {"prompt": "Q", "chosen": "x", "rejected": [{"role": "user", "content": "not a reply"}]},
        {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
        {"prompt": "Q", "chosen": "Fine.", "rejected": "Worse."},
    ])
    read = read_preferences(path, on_bad_rows="skip")
    assert [r["row"] for r in read.rows] == [5]
    got = {r.row: (r.field, r.reason) for r in read.rejects}
    assert got[1][0] == "rejected" and "identical" in got[1][1]
    assert got[2][0] == "rejected" and "missing" in got[2][1]
    assert got[3][0] == "rejected" and "assistant" in got[3][1]
    assert got[4][0] == "rejected" and "identical" in got[4][1]
    assert len(read.rows) + len(read.rejects) == 5
    with pytest.raises(InputError, match=r"row 1: field rejected"):
        read_preferences(path)


def test_preferences_parquet(tmp_path):
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.table({"prompt": ["A?", "B?"], "chosen": ["yes", "no"], "rejected": ["no", "yes"]}), path)
    rows = read_preferences(path).rows
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("A?", "yes", "no"), ("B?", "no", "yes")]


# ------------------------------------------------------------------------------------------ rejects file


def test_write_rejects_matches_schema(tmp_path):
    path = tmp_path / "mixed.jsonl"
    bad_rows, _ = make_mixed_prompts(path)
    read = read_prompts(path, on_bad_rows="skip")
    out = tmp_path / "out"
    out.mkdir()
    write_rejects(read.rejects, out)
    table = pq.read_table(out / "rejects.parquet")
    assert table.schema.equals(schemas.REJECTS)
    schemas.check_schema(table, schemas.REJECTS, out / "rejects.parquet")
    assert table.num_rows == len(bad_rows)
    assert sorted(table.column("row").to_pylist()) == sorted(bad_rows)
    assert set(table.column("source").to_pylist()) == {str(path)}


def test_write_rejects_nothing_to_write(tmp_path):
    write_rejects([], tmp_path)
    assert not (tmp_path / "rejects.parquet").exists()


def test_preferences_that_would_be_silently_wrong_are_refused_with_row_and_field(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_lines(path, [
        # Text without any HH turn: there is no prompt to split off ("The movie was " is not one).
        {"chosen": "The movie was great fun", "rejected": "The movie was awful"},
        # HH text whose earlier turns differ: the shared prefix would train a Human turn as the reply.
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rate it\n\nAssistant: 5",
         "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: rate it\n\nAssistant: 1"},
        # A prompt column that is not the user turn of the chosen conversation.
        {"prompt": "Review Heat.", "chosen": [{"role": "user", "content": "Review Alien."},
                                              {"role": "assistant", "content": "Great."}],
         "rejected": "Bad."},
        {"prompt": "Review Heat.", "chosen": [{"role": "user", "content": "Review Heat."},
                                              {"role": "assistant", "content": "Great."}],
         "rejected": "Bad."},
    ])
    read = read_preferences(path, on_bad_rows="skip")
    assert [r["row"] for r in read.rows] == [4]
    got = {r.row: (r.field, r.reason) for r in read.rejects}
    assert got[1][0] == "chosen" and "no 'Assistant:' turn" in got[1][1]
    assert got[2][0] == "chosen" and "differ before their last 'Assistant:'" in got[2][1]
    assert got[3][0] == "chosen" and "differ from the row's prompt" in got[3][1]
    with pytest.raises(InputError, match=rf"^{path}: row 1: field chosen: chosen has no 'Assistant:' turn"):
        read_preferences(path)


# ------------------------------------------------------------------------------ whole files that are not rows

def test_a_pretty_printed_json_file_is_named_as_such(tmp_path):
    for name, document in (("array.json", [{"prompt": "a"}, {"prompt": "b"}]), ("object.jsonl", {"prompt": "a"})):
        path = tmp_path / name
        path.write_text(json.dumps(document, indent=2))
        with pytest.raises(InputError, match=rf"^{path}: holds (an array|one JSON value) spread over several lines, "
                                             r"but dpo-ray reads JSON Lines \(one object per line\)"):
            read_prompts(path)
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps({"prompt": "a"}) + "\n")  # a one-line file is JSON Lines
    assert [r["prompt"] for r in read_prompts(one_line).rows] == ["a"]


def test_a_saved_dataset_dict_asks_for_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"prompt": "a"}]), "test": Dataset.from_list([{"prompt": "b"}])}) \
        .save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=rf"^{tmp_path / 'dd'}: a saved DatasetDict with splits test, train; give "
                                         rf"one split's folder, e.g. {tmp_path / 'dd' / 'test'}$"):
        read_prompts(tmp_path / "dd")
    assert [r["prompt"] for r in read_prompts(tmp_path / "dd" / "train").rows] == ["a"]


def test_corrupt_parquet_and_arrow_files_are_named(tmp_path):
    from datasets import Dataset

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=rf"^{bad}: cannot be read as Parquet \(ArrowInvalid: "):
        read_preferences(bad)
    folder = tmp_path / "ds"
    Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(folder))
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    with pytest.raises(InputError, match=rf"^{folder}: cannot be read as a saved dataset \("):
        read_prompts(folder)
