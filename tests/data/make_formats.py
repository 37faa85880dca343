"""Regenerates tests/data/formats/: a few rows in each data format dpo-ray reads (tests/test_inputs.py checks them).

TRL's dataset forms by their names (standard and conversational, prompt-only and preference, explicit and implicit
prompt), a system message, a JSON array, gzipped JSON Lines, a saved DatasetDict with two splits and an
UltraFeedback-like file read through data.columns. Run: python tests/data/make_formats.py
"""

import gzip
import json
import shutil
from pathlib import Path

OUT = Path(__file__).with_name("formats")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


STANDARD_PREFERENCE = [
    {"prompt": 'Review "The Silent Harbor" in one sentence.',
     "chosen": "A patient, beautifully shot drama with a score that lingers.", "rejected": "It is a movie."},
    {"prompt": 'Is "Iron Orchard" worth watching?',
     "chosen": "Yes: the leads are superb and the ending lands.", "rejected": "Watching is a verb."},
    {"prompt": 'Describe the tone of "Paper Kingdom".',
     "chosen": "Wistful and funny, like a fable told at dusk.", "rejected": "Describe the tone of it."},
]

CONVERSATIONAL_PREFERENCE = [
    {"prompt": [user('Review "The Silent Harbor" in one sentence.')],
     "chosen": [assistant("A patient, beautifully shot drama.")], "rejected": [assistant("No.")]},
    {"prompt": [user("Recommend a western."), assistant('Try "Distant Frontier".'), user("Why that one?")],
     "chosen": [assistant("Its landscapes and slow-burn duel are classic.")],
     "rejected": [assistant("Because.")]},
    {"prompt": [user('Is "Iron Orchard" too long?')],
     "chosen": [assistant("A little: the second act drags for ten minutes.")], "rejected": [assistant("Yes no.")]},
]

HISTORY = [user("Recommend a western."), assistant('Try "Distant Frontier".'), user("Why that one?")]
IMPLICIT_PROMPT = [
    {"chosen": [user('Review "Glass Station" briefly.'), assistant("Tense, clever and well acted.")],
     "rejected": [user('Review "Glass Station" briefly.'), assistant("Station.")]},
    {"chosen": HISTORY + [assistant("Its landscapes and slow-burn duel are classic.")],
     "rejected": HISTORY + [assistant("Because.")]},
    {"chosen": [user('Rate "Hollow Crown" out of 5.'), assistant("4: grand, if a touch long.")],
     "rejected": [user('Rate "Hollow Crown" out of 5.'), assistant("Crowns are hollow.")]},
]

CRITIC = "You are a film critic. Answer in one sentence."
SYSTEM_MESSAGE = [
    # a system column beside a text prompt
    {"system": CRITIC, "prompt": 'Review "Midnight Signal".',
     "chosen": "A taut thriller with a memorable final reel.", "rejected": "Signals at midnight."},
    # a leading system turn in the prompt's messages
    {"prompt": [system(CRITIC), user('Review "Crimson Voyage".')],
     "chosen": [assistant("A swashbuckler with heart and a superb villain.")], "rejected": [assistant("Red.")]},
    # a system column beside whole conversations (implicit prompt)
    {"system": CRITIC,
     "chosen": [user('Review "Lonely Engine".'), assistant("A small, touching film about a retired driver.")],
     "rejected": [user('Review "Lonely Engine".'), assistant("Trains.")]},
    # a leading system turn shared by whole conversations
    {"chosen": [system(CRITIC), user('Review "Wild Garden".'), assistant("Lush, strange and never dull.")],
     "rejected": [system(CRITIC), user('Review "Wild Garden".'), assistant("Plants.")]},
]

PROMPT_ONLY = [
    {"prompt": 'Write a review of "The Golden Circus".'},  # standard
    {"prompt": [user('Write a review of "Northern Echo".')]},  # conversational
    {"prompt": [system(CRITIC), user('Write a review of "Quiet Lantern".')]},  # conversational, system turn
    {"system": CRITIC, "prompt": 'Write a review of "Burning Letter".'},  # standard, system column
]

ULTRAFEEDBACK_LIKE = [
    {"source": "evol_instruct", "instruction": 'Summarize "The Endless River" for a child.',
     "chosen_response": "A boat trip down a river that never ends, full of friendly animals.",
     "chosen_avg_rating": 4.5, "rejected_response": "It is about water.", "rejected_avg_rating": 1.75},
    {"source": "sharegpt", "instruction": 'List two strengths of "Forgotten Machine".',
     "chosen_response": "Its inventive set design and a warm lead performance.",
     "chosen_avg_rating": 4.25, "rejected_response": "Machines.", "rejected_avg_rating": 1.0},
    {"source": "flan", "instruction": 'Is "Electric Summer" a comedy?',
     "chosen_response": "Mostly: a coming-of-age comedy with a bittersweet end.",
     "chosen_avg_rating": 4.0, "rejected_response": "Electricity is not funny.", "rejected_avg_rating": 2.0},
]

SPLITS = {
    "train": [{"id": f"dd-train-{i}", **row} for i, row in enumerate(STANDARD_PREFERENCE)],
    "test": [{"id": "dd-test-0", "prompt": 'Review "Distant Mirror".', "chosen": "A haunting, elegant ghost story.",
              "rejected": "Mirrors reflect."},
             {"id": "dd-test-1", "prompt": 'Review "Broken Crown".', "chosen": "A sharp satire of royal vanity.",
              "rejected": "It is broken."}],
}


def main() -> None:
    from datasets import Dataset, DatasetDict

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    files = {
        "trl_standard_preference.jsonl": jsonl(STANDARD_PREFERENCE),
        "trl_conversational_preference.jsonl": jsonl(CONVERSATIONAL_PREFERENCE),
        "trl_conversational_implicit_prompt.jsonl": jsonl(IMPLICIT_PROMPT),
        "system_message.jsonl": jsonl(SYSTEM_MESSAGE),
        "trl_prompt_only.jsonl": jsonl(PROMPT_ONLY),
        "ultrafeedback_like.jsonl": jsonl(ULTRAFEEDBACK_LIKE),
        "array.json": json.dumps(STANDARD_PREFERENCE, indent=2).encode() + b"\n",
        # mtime 0: the same rows give the same bytes
        "preferences.jsonl.gz": gzip.compress(jsonl(STANDARD_PREFERENCE), mtime=0),
    }
    for name, content in files.items():
        (OUT / name).write_bytes(content)
    DatasetDict({split: Dataset.from_list(rows) for split, rows in SPLITS.items()}).save_to_disk(
        str(OUT / "dataset_dict"))
    print(f"wrote {len(files) + 1} fixtures to {OUT}")


if __name__ == "__main__":
    main()
