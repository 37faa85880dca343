"""read_prompts / read_preferences / write_rejects on temp files."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray import schemas
from dpo_ray.inputs import InputError, is_hub_id, read_preferences, read_prompts, write_rejects


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
    ({"id": "t", "prompt": ["a", "list"]}, "prompt", "prompt[0] must be an object with a string content"),
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


def test_a_json_file_that_is_not_rows_is_named(tmp_path):
    for name, document, kind in (("object.json", {"rows": [{"prompt": "a"}]}, "one JSON object spread over several "
                                                                              "lines"),
                                 ("number.jsonl", 42, "a JSON int")):
        path = tmp_path / name
        path.write_text(json.dumps(document, indent=2))
        with pytest.raises(InputError, match=rf"^{path}: holds {kind}; give an array of row objects or JSON Lines "
                                             r"\(one object per line\)$"):
            read_prompts(path)
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps({"prompt": "a"}) + "\n")  # a one-line file is JSON Lines
    assert [(r["prompt"], r["row"]) for r in read_prompts(one_line).rows] == [("a", 1)]


def test_a_json_array_numbers_its_rows_from_0_and_says_so(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a"}, "not an object", {"prompt": ""}, {"prompt": "d"}]))  # one line
    read = read_prompts(path, on_bad_rows="skip")
    assert [(r["id"], r["row"], r["prompt"]) for r in read.rows] == [("row-0", 0, "a"), ("row-3", 3, "d")]
    assert [(r.row, r.field, r.reason) for r in read.rejects] == [(1, "<row>", "not a JSON object"),
                                                                  (2, "prompt", "prompt is empty")]
    assert read.rejects[0].raw == '"not an object"'
    with pytest.raises(InputError, match=rf"^{path}: row 1 \(0-based\): field <row>: not a JSON object$"):
        read_prompts(path)


def test_a_file_that_is_not_json_either_keeps_its_row_errors(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"prompt": "cut\n{"prompt": "fine"}\n')
    read = read_prompts(path, on_bad_rows="skip")
    assert [r["prompt"] for r in read.rows] == ["fine"] and read.rejects[0].row == 1


def test_a_bad_row_in_gzipped_json_lines_names_its_line(tmp_path):
    path = tmp_path / "prefs.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n\n'
                                   b'{"prompt": "Q", "chosen": "a"}\n'))
    with pytest.raises(InputError, match=rf"^{path}: row 3: field rejected: missing \(got columns "):
        read_preferences(path)
    assert [r["row"] for r in read_preferences(path, on_bad_rows="skip").rows] == [1]
    not_gzip = tmp_path / "plain.json.gz"
    not_gzip.write_text('{"prompt": "a"}\n')
    with pytest.raises(InputError, match=rf"^{not_gzip}: cannot be read as gzip \(BadGzipFile: "):
        read_prompts(not_gzip)


# -------------------------------------------------------------------- formats (tests/data/make_formats.py)

FORMATS = Path(__file__).parent / "data" / "formats"
CRITIC = "You are a film critic. Answer in one sentence."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def pairs(read) -> list[tuple]:
    """(prompt text, prompt messages or None, chosen, rejected) of each row read, none rejected."""
    assert read.rejects == []
    return [(r["prompt"], r["messages_json"] and json.loads(r["messages_json"]), r["chosen"], r["rejected"])
            for r in read.rows]


STANDARD = [
    ('Review "The Silent Harbor" in one sentence.', None,
     "A patient, beautifully shot drama with a score that lingers.", "It is a movie."),
    ('Is "Iron Orchard" worth watching?', None, "Yes: the leads are superb and the ending lands.",
     "Watching is a verb."),
    ('Describe the tone of "Paper Kingdom".', None, "Wistful and funny, like a fable told at dusk.",
     "Describe the tone of it."),
]
HISTORY = [user("Recommend a western."), {"role": "assistant", "content": 'Try "Distant Frontier".'},
           user("Why that one?")]
HISTORY_TEXT = 'Recommend a western.\nTry "Distant Frontier".\nWhy that one?'


def test_trl_standard_preference():
    read = read_preferences(FORMATS / "trl_standard_preference.jsonl")
    assert pairs(read) == STANDARD
    assert [r["id"] for r in read.rows] == ["row-1", "row-2", "row-3"]


def test_trl_conversational_preference_with_explicit_prompt():
    assert pairs(read_preferences(FORMATS / "trl_conversational_preference.jsonl")) == [
        ('Review "The Silent Harbor" in one sentence.', [user('Review "The Silent Harbor" in one sentence.')],
         "A patient, beautifully shot drama.", "No."),
        (HISTORY_TEXT, HISTORY, "Its landscapes and slow-burn duel are classic.", "Because."),
        ('Is "Iron Orchard" too long?', [user('Is "Iron Orchard" too long?')],
         "A little: the second act drags for ten minutes.", "Yes no."),
    ]


def test_trl_conversational_preference_with_implicit_prompt_takes_the_shared_turns():
    assert pairs(read_preferences(FORMATS / "trl_conversational_implicit_prompt.jsonl")) == [
        ('Review "Glass Station" briefly.', [user('Review "Glass Station" briefly.')],
         "Tense, clever and well acted.", "Station."),
        (HISTORY_TEXT, HISTORY, "Its landscapes and slow-burn duel are classic.", "Because."),
        ('Rate "Hollow Crown" out of 5.', [user('Rate "Hollow Crown" out of 5.')], "4: grand, if a touch long.",
         "Crowns are hollow."),
    ]


def test_a_system_message_is_kept_as_part_of_the_prompt():
    def with_critic(question: str) -> tuple:
        return f"{CRITIC}\n{question}", [system(CRITIC), user(question)]

    assert pairs(read_preferences(FORMATS / "system_message.jsonl")) == [
        (*with_critic('Review "Midnight Signal".'), "A taut thriller with a memorable final reel.",
         "Signals at midnight."),  # system column, text prompt
        (*with_critic('Review "Crimson Voyage".'), "A swashbuckler with heart and a superb villain.", "Red."),
        (*with_critic('Review "Lonely Engine".'), "A small, touching film about a retired driver.", "Trains."),
        (*with_critic('Review "Wild Garden".'), "Lush, strange and never dull.", "Plants."),
    ]


def test_trl_prompt_only_standard_and_conversational():
    read = read_prompts(FORMATS / "trl_prompt_only.jsonl")
    assert read.rejects == []
    assert [(r["prompt"], r["messages_json"] and json.loads(r["messages_json"])) for r in read.rows] == [
        ('Write a review of "The Golden Circus".', None),
        ('Write a review of "Northern Echo".', [user('Write a review of "Northern Echo".')]),
        ('Write a review of "Quiet Lantern".', [system(CRITIC), user('Write a review of "Quiet Lantern".')]),
        ('Write a review of "Burning Letter".', [system(CRITIC), user('Write a review of "Burning Letter".')]),
    ]


def test_a_json_array_file():
    read = read_preferences(FORMATS / "array.json")
    assert pairs(read) == STANDARD
    assert [(r["id"], r["row"]) for r in read.rows] == [("row-0", 0), ("row-1", 1), ("row-2", 2)]
    assert [r["prompt"] for r in read_prompts(FORMATS / "array.json").rows] == [p for p, *_ in STANDARD]


def test_gzipped_json_lines():
    read = read_preferences(FORMATS / "preferences.jsonl.gz")
    assert pairs(read) == STANDARD
    assert [r["row"] for r in read.rows] == [1, 2, 3]


def test_a_saved_dataset_dict_reads_its_train_split_or_the_one_given():
    folder = FORMATS / "dataset_dict"
    read = read_preferences(folder)
    assert pairs(read) == STANDARD
    assert [r["id"] for r in read.rows] == ["dd-train-0", "dd-train-1", "dd-train-2"]
    test = read_preferences(folder, split="test")
    assert pairs(test) == [('Review "Distant Mirror".', None, "A haunting, elegant ghost story.", "Mirrors reflect."),
                           ('Review "Broken Crown".', None, "A sharp satire of royal vanity.", "It is broken.")]
    assert [r["prompt"] for r in read_prompts(folder, split="test").rows] == ['Review "Distant Mirror".',
                                                                              'Review "Broken Crown".']
    assert [r["prompt"] for r in read_prompts(folder / "test").rows] == ['Review "Distant Mirror".',
                                                                         'Review "Broken Crown".']


def test_an_unknown_split_names_the_folder_and_its_splits():
    folder = FORMATS / "dataset_dict"
    with pytest.raises(InputError, match=rf"^{folder}: a saved DatasetDict without a 'validation' split \(it has "
                                         r"test, train\); set data.split$"):
        read_prompts(folder, split="validation")


ULTRAFEEDBACK_COLUMNS = {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"}


def test_an_ultrafeedback_like_file_through_a_column_mapping():
    read = read_preferences(FORMATS / "ultrafeedback_like.jsonl", columns=ULTRAFEEDBACK_COLUMNS)
    assert pairs(read) == [
        ('Summarize "The Endless River" for a child.', None,
         "A boat trip down a river that never ends, full of friendly animals.", "It is about water."),
        ('List two strengths of "Forgotten Machine".', None, "Its inventive set design and a warm lead performance.",
         "Machines."),
        ('Is "Electric Summer" a comedy?', None, "Mostly: a coming-of-age comedy with a bittersweet end.",
         "Electricity is not funny."),
    ]
    with pytest.raises(InputError, match="field chosen: missing"):
        read_preferences(FORMATS / "ultrafeedback_like.jsonl")


def test_a_column_mapping_names_the_files_columns_in_row_errors(tmp_path):
    path = tmp_path / "stack_exchange.jsonl"
    write_lines(path, [
        {"qid": 1, "question": "How do I undo a commit?", "response_j": "git revert it.", "response_k": "You can't."},
        {"qid": 2, "question": "Why is my loop slow?", "response_j": "Vectorize it."},
        {"qid": 3, "question": "  ", "response_j": "a", "response_k": "b"},
        {"qid": 1, "question": "Again?", "response_j": "a", "response_k": "b"},
        # a column with one of our names that the mapping does not pick is not read
        {"qid": 5, "question": "Tabs or spaces?", "prompt": "ignored", "response_j": "Spaces.", "response_k": "Both."},
    ])
    columns = {"id": "qid", "prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    read = read_preferences(path, on_bad_rows="skip", columns=columns)
    assert [(r["id"], r["prompt"], r["chosen"]) for r in read.rows] == [
        ("1", "How do I undo a commit?", "git revert it."), ("5", "Tabs or spaces?", "Spaces.")]
    assert [(r.row, r.field) for r in read.rejects] == [(2, "response_k"), (3, "question"), (4, "qid")]
    assert read.rejects[0].reason.startswith("missing (data.columns maps rejected to it; got columns ")
    with pytest.raises(InputError, match=rf"^{path}: row 2: field response_k: missing \(data.columns maps rejected "):
        read_preferences(path, columns=columns)
    prompts = read_prompts(path, on_bad_rows="skip", columns={"prompt": "question"})
    assert [r["prompt"] for r in prompts.rows] == ["How do I undo a commit?", "Why is my loop slow?", "Again?",
                                                   "Tabs or spaces?"]


def test_a_column_mapping_can_name_a_chat_column():
    path = FORMATS / "trl_conversational_preference.jsonl"
    read = read_prompts(path, columns={"messages": "prompt"})
    assert json.loads(read.rows[1]["messages_json"]) == HISTORY


def test_data_columns_keys_must_be_ours():
    from pydantic import ValidationError

    from dpo_ray.config import DataConfig

    assert DataConfig(columns=ULTRAFEEDBACK_COLUMNS).columns == ULTRAFEEDBACK_COLUMNS
    with pytest.raises(ValidationError, match=r"data.columns: 'question' is not one of ours \(prompt, chosen, "
                                              r"rejected, messages, system, id\)"):
        DataConfig(columns={"question": "prompt"})
    with pytest.raises(ValidationError, match=r"data.columns: 'text' is mapped twice"):
        DataConfig(columns={"chosen": "text", "rejected": "text"})


def test_a_system_message_given_twice_or_not_text_is_a_row_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_lines(path, [
        {"system": "A", "prompt": [system("B"), user("Q")], "chosen": "x", "rejected": "y"},
        {"system": 3, "prompt": "Q", "chosen": "x", "rejected": "y"},
        {"system": " ", "prompt": "Q", "chosen": "x", "rejected": "y"},  # blank: no system message
    ])
    read = read_preferences(path, on_bad_rows="skip")
    assert [(r.row, r.field, r.reason) for r in read.rejects] == [
        (1, "system", "given beside the prompt's own system message; give one of the two"),
        (2, "system", "system must be a string, got int")]
    assert [(r["row"], r["messages_json"]) for r in read.rows] == [(3, None)]
    with pytest.raises(InputError, match=rf"^{path}: row 1: field system: given beside"):
        read_prompts(path)


# ------------------------------------------------------------------------------------------ hub datasets


def test_a_hub_id_that_cannot_be_reached_is_one_line(monkeypatch):
    # datasets reads HF_DATASETS_OFFLINE once, when imported (here maybe by an earlier test): a fresh interpreter
    # sees it, so the lookup fails at once instead of trying the network.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    script = ("import sys\nfrom dpo_ray.inputs import InputError, read_preferences\n"
              "try:\n    read_preferences(sys.argv[1])\nexcept InputError as err:\n    print(err)")
    for name in ("dpo-ray-tests/no-such-dataset", "no_such_dataset"):
        done = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, timeout=120,
                              check=True, cwd=Path(__file__).parents[1])
        assert re.fullmatch(rf"{name}: not a local file or folder, and the hub dataset of that name \(split 'train'\) "
                            rf"could not be loaded \(ConnectionError: Couldn't reach '{name}' on the Hub "
                            r"\(OfflineModeIsEnabled\)\)\n", done.stdout), done.stdout + done.stderr


def test_a_missing_path_is_not_a_hub_id(tmp_path):
    for path in ("data/typo.jsonl", "./prefs", "/nowhere/prefs", str(tmp_path / "absent"), "a/b/c"):
        assert not is_hub_id(path), path
        with pytest.raises(InputError, match=rf"^{re.escape(str(Path(path)))}: file does not exist$"):
            read_preferences(path)
    for name in ("Anthropic/hh-rlhf", "trl-lib/ultrafeedback_binarized", "allenai/tulu-2.5-preference-data", "imdb"):
        assert is_hub_id(name), name


def test_new_data_keys_enter_stage_keys_only_when_set(tmp_path):
    """Run folders made before data.split and data.columns existed keep their keys; setting either changes the
    key of the stages that read with it, and a hub id is keyed by its name."""
    from dpo_ray import keys
    from dpo_ray.config import load_config

    cfg = load_config("configs/default.yaml")
    assert keys.settings(cfg, "data") == {k: v for k, v in cfg.data.model_dump().items()
                                          if k not in ("split", "columns", "held_out_seed")}
    assert keys.reading(cfg) == {}
    changed = load_config("configs/default.yaml", ["data.split=test", "data.columns={prompt: question}"])
    assert keys.reading(changed) == {"split": "test", "columns": {"prompt": "question"}}
    assert keys.settings(changed, "data")["split"] == "test"
    hub = keys.digest("trl-lib/ultrafeedback_binarized", "data.preferences")
    assert hub == keys.digest("trl-lib/ultrafeedback_binarized", "data.preferences")
    assert hub != keys.digest("Anthropic/hh-rlhf", "data.preferences")
    with pytest.raises(InputError, match="data.prompts: data/typo.jsonl does not exist"):
        keys.digest("data/typo.jsonl", "data.prompts")


def test_held_out_prompts_read_from_data_prompts_are_keyed_with_split_and_columns():
    """evaluate (and the KL budget's probes) of an offline run read data.prompts themselves: how it is read enters
    their keys; a prompts file given to the stage is keyed by its own digest."""
    from dpo_ray.config import load_config
    from dpo_ray.stages import evaluate, train

    def keys_of(*overrides, digests=None):
        cfg = load_config("configs/default.yaml", ["train.kl_budget=5", *overrides])
        given = digests or {}
        return (evaluate.inputs(cfg, {"policy": "p", **given}),
                train.inputs(cfg, {"reference": "r", **given})["kl_probe"]["prompts"])

    plain = keys_of()
    assert keys_of("data.columns={prompt: question}") != plain
    assert keys_of("data.split=test")[1] != plain[1]
    assert keys_of("data.split=test", digests={"prompts": "q"}) == keys_of(digests={"prompts": "q"})


def test_the_stages_read_with_data_split_and_columns(tmp_path):
    """data.split and data.columns reach both readers (they apply to data.prompts and data.preferences alike)."""
    from dpo_ray.config import load_config
    from dpo_ray.ops.prompts import prepare_prompts
    from dpo_ray.stages.label import import_preferences

    def read(*overrides) -> tuple[list[str], list[str]]:
        cfg = load_config("configs/tiny.yaml", ["data.num_eval_prompts=1", *overrides])
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        out.mkdir()
        import_preferences(cfg, out)
        prepare_prompts(cfg, out)
        return (sorted(pq.read_table(out / "pairs").column("prompt").to_pylist()),
                sorted(pq.read_table(out / "prompts.parquet").column("prompt").to_pylist()))

    folder = FORMATS / "dataset_dict"
    test_split = ['Review "Broken Crown".', 'Review "Distant Mirror".']
    assert read(f"data.preferences={folder}", f"data.prompts={folder}", "data.split=test") == (test_split, test_split)
    ultrafeedback = FORMATS / "ultrafeedback_like.jsonl"
    instructions = sorted(row["instruction"] for row in map(json.loads, ultrafeedback.read_text().splitlines()))
    assert read(f"data.preferences={ultrafeedback}", f"data.prompts={ultrafeedback}",
                "data.columns={prompt: instruction, chosen: chosen_response, rejected: rejected_response}") \
        == (instructions, instructions)
