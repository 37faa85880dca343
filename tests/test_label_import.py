"""Offline preference import: truncation counts, identical-after-tokenization pairs, chat-template prefix pitfalls."""

import json
import re

import pytest

from dpo_ray import schemas
from dpo_ray.config import load_config
from dpo_ray.stages.label import import_preferences
from dpo_ray.text import TokenizationError, completion_token_ids


def _prefs(tmp_path, rows):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_identical_after_truncation_is_rejected_and_counted(tmp_path):
    path = _prefs(tmp_path, [
        {"id": "a", "prompt": "Review it.", "chosen": "Great film, lovely ending.", "rejected": "Great film, awful ending."},
        {"id": "b", "prompt": "Review it.", "chosen": "Wonderful.", "rejected": "Dreadful."},
    ])
    cfg = load_config("configs/tiny.yaml", [f"data.preferences={path}", "data.max_completion_tokens=2",
                                            "data.on_bad_rows=skip"])
    out = tmp_path / "out"
    out.mkdir()
    stats = import_preferences(cfg, out)
    assert stats["pairs"] == 1 and stats["rejected_rows"] == 1 and stats["completions_truncated"] == 2
    rejects = schemas.read_table(out / "rejects.parquet", schemas.REJECTS).to_pylist()
    assert rejects[0]["row"] == 1 and "tokenize identically" in rejects[0]["reason"]
    cfg = load_config("configs/tiny.yaml", [f"data.preferences={path}", "data.max_completion_tokens=2"])
    with pytest.raises(TokenizationError, match=r"prefs.jsonl: row 1: field rejected: .*tokenize identically"):
        import_preferences(cfg, tmp_path / "out2")


class _ShiftingTemplate:
    """A tokenizer whose template renders the prompt differently once an assistant turn follows it."""

    chat_template = "shifting"
    eos_token_id = 2
    eos_token = "<eos>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        system = "A" if messages[-1]["role"] == "assistant" else "B"
        body = " ".join(m["content"] for m in messages)
        return f"{system} {body}" + (" <gen>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def test_prompt_not_a_prefix_of_prompt_plus_completion_is_detected():
    with pytest.raises(TokenizationError, match="not a prefix"):
        completion_token_ids(_ShiftingTemplate(), "hello", None, None, "a reply")


def test_a_reply_holding_the_end_of_turn_text_is_refused_not_cut(tmp_path):
    from dpo_ray.config import load_config
    from dpo_ray.models import load_tokenizer
    from dpo_ray.stages.label import import_preferences

    eos = load_tokenizer("builtin:tiny-llama").eos_token
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "Review Heat.", "chosen": f"Great.{eos} And the rest is never trained.", "rejected": "Bad."},
            {"prompt": "Review Alien.", "chosen": "Great.", "rejected": "Bad."}]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["model.policy=builtin:tiny-llama", f"data.preferences={prefs}"])
    with pytest.raises(TokenizationError, match=rf"^{prefs}: row 1: field chosen: contains the tokenizer's "
                                                rf"end-of-turn text '{re.escape(eos)}'"):
        import_preferences(cfg, tmp_path / "out")
    skip = cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_bad_rows": "skip"})})
    stats = import_preferences(skip, tmp_path / "out_skip")
    assert (stats["pairs"], stats["rejected_rows"]) == (1, 1)
