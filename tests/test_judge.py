"""The LLM-as-judge labeler (ops/judge.py): order swapping, ties, win shares, rendering, the judge on the tiny model
in-process, its config keys and its place among the labelers."""

from __future__ import annotations

import dataclasses
import math
import random

import pyarrow as pa
import pytest
import torch

from dpo_ray.config import ConfigError, LabelConfig, load_config
from dpo_ray.errors import ModelError
from dpo_ray.ops.judge import (JudgeScorer, JudgeSpec, answer_preferences, answer_token_ids, debiased_preference,
                               outcome, render_judge_ids, tournament)

QUALITY = {"a fine review": 3.0, "an ok review": 2.0, "a weak review": 1.0, "gibberish": 0.0}


def quality_judge(bias: float, strength: float = 1.0):
    """A scripted judge: its preference for A is `bias` (position) plus `strength` x the quality gap."""
    calls = []

    def prefer_a(orderings):
        calls.extend(orderings)
        return [bias + strength * (QUALITY[a] - QUALITY[b]) for a, b in orderings]

    return prefer_a, calls


def test_a_judge_that_only_prefers_position_a_gives_all_ties():
    prefer_a, calls = quality_judge(bias=2.0, strength=0.0)
    result = tournament(list(QUALITY), prefer_a, margin=0.1)
    assert result.rewards == [0.5] * 4
    assert result.comparisons == 6 and result.ties == 6 and result.same_letter == 6
    # Every unordered pair is asked in both orders.
    assert len(calls) == 12 and {(b, a) for a, b in calls} == set(calls)


@pytest.mark.parametrize("bias", [0.0, 1.5, -1.5])
def test_a_true_preference_wins_in_both_orders_whatever_the_position_bias(bias):
    texts = list(QUALITY)
    expected = {"a fine review": 1.0, "an ok review": 2 / 3, "a weak review": 1 / 3, "gibberish": 0.0}
    for seed in range(3):
        shuffled = random.Random(seed).sample(texts, len(texts))
        result = tournament(shuffled, quality_judge(bias)[0], margin=0.1)
        assert dict(zip(shuffled, result.rewards)) == pytest.approx(expected)
        assert result.ties == 0
    # With a bias larger than the quality gap, the raw one-order verdicts follow position: the same letter twice.
    assert tournament(texts, quality_judge(bias=5.0)[0], margin=0.1).same_letter == 6


def test_the_debiased_preference_cancels_an_additive_position_bias():
    assert debiased_preference(1.5 + 0.25, 1.5 - 0.25) == 0.25
    assert debiased_preference(-2.0, -2.0) == 0.0


def test_a_preference_at_or_below_the_margin_is_a_tie_worth_one_half():
    assert outcome(0.25, 0.25) == 0.5 and outcome(-0.25, 0.25) == 0.5 and outcome(0.0, 0.0) == 0.5
    assert outcome(0.2500001, 0.25) == 1.0 and outcome(-0.2500001, 0.25) == 0.0
    assert math.isnan(outcome(math.nan, 0.25))
    # d = (0.75 - 0.25) / 2 = 0.25 exactly: a tie at margin 0.25, a win at margin 0.2.
    fixed = lambda orderings: [0.75 if a == "x" else 0.25 for a, b in orderings]  # noqa: E731
    tie = tournament(["x", "y"], fixed, margin=0.25)
    assert tie.rewards == [0.5, 0.5] and tie.ties == 1 and tie.judgments == [("x", "y", 0.25)]
    assert tournament(["x", "y"], fixed, margin=0.2).rewards == [1.0, 0.0]


def test_identical_texts_tie_without_a_forward_and_nan_reaches_the_rewards():
    prefer_a, calls = quality_judge(bias=0.0)
    result = tournament(["a fine review", "gibberish", "a fine review"], prefer_a, margin=0.1)
    assert len(calls) == 2 and result.comparisons == 1
    # Each copy beats gibberish and ties the other copy.
    assert result.rewards == [0.75, 0.0, 0.75]
    assert tournament(["only one"], prefer_a, margin=0.1).rewards == [0.5]
    nan = tournament(["x", "y", "z"], lambda o: [math.nan if "z" in (a, b) else 1.0 for a, b in o], margin=0.1)
    assert math.isnan(nan.rewards[2]) and math.isnan(nan.rewards[0]) and nan.ties == 1


def test_rendering_with_the_tiny_llama_tokenizer(tokenizer):
    rubric = LabelConfig().judge_rubric
    ids = render_judge_ids(tokenizer, rubric, "Review {Heat}.", "It was {great}.", "Meh.")
    text = tokenizer.decode(ids)
    # Braces in the texts are content, not placeholders.
    assert "Review {Heat}." in text and "It was {great}." in text and "Meh." in text
    assert text.index("It was {great}.") < text.index("Meh.")
    assert "{prompt}" not in text and "Answer with A or B." in text
    # The user's message, then the assistant's turn where the judge answers.
    assert text.rstrip().endswith("<|im_start|>assistant")
    a_ids, b_ids = answer_token_ids(tokenizer)
    assert a_ids and b_ids and not set(a_ids) & set(b_ids)
    assert {tokenizer.decode([i]).strip() for i in a_ids} == {"A"}
    assert {tokenizer.decode([i]).strip() for i in b_ids} == {"B"}


def test_a_tokenizer_without_single_token_letters_is_a_model_error():
    class Spelled:
        name_or_path = "spelled-out"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in f"<{text}>"]}

    with pytest.raises(ModelError, match="label.judge_model: the tokenizer of spelled-out"):
        answer_token_ids(Spelled())


@pytest.fixture(scope="module")
def judge():
    cfg = load_config("configs/tiny.yaml", ["label.labeler=judge"])
    threads = torch.get_num_threads()
    # Tie margin 0: the random tiny model's preferences are tiny, and the mechanics need some non-ties.
    scorer = JudgeScorer(dataclasses.replace(JudgeSpec.of(cfg), tie_margin=0.0, batch_size=5))
    torch.set_num_threads(1)
    yield scorer
    torch.set_num_threads(threads)


def _completions(prompt_counts: dict[str, int]) -> pa.Table:
    words = ["great", "dull", "fun", "long", "bright", "slow"]
    rows = [{"prompt_id": pid, "prompt": f"Review the film {pid}.", "messages_json": None, "sample_index": i,
             "completion": f"The film was {words[i]} and {words[(i + k) % 6]}.", "sample_logp": -1.0 * i}
            for k, (pid, n) in enumerate(prompt_counts.items()) for i in range(n)]
    return pa.Table.from_pylist(rows)


def test_the_judge_on_the_tiny_model_gives_one_win_share_per_row(judge):
    table = _completions({"p0": 4, "p1": 3, "p2": 5})
    by_prompt = {}
    for pid in ("p0", "p1", "p2"):
        group = table.filter(pa.compute.equal(table["prompt_id"], pid))
        out = judge(group)
        assert out.column_names[: group.num_columns] == group.column_names
        assert out.select(group.column_names).equals(group)
        rewards = out["reward"].to_pylist()
        assert out.schema.field("reward").type == pa.float64() and len(rewards) == group.num_rows
        assert all(0.0 <= r <= 1.0 for r in rewards)
        # Each comparison hands out one point between its two completions: n(n-1)/2 points over n completions of
        # n-1 comparisons each, a mean win share of exactly 0.5.
        assert sum(rewards) == pytest.approx(group.num_rows / 2)
        n = group.num_rows
        assert out["_judge_comparisons"].to_pylist() == [n * (n - 1) // 2] + [0] * (n - 1)
        assert len(set(rewards)) > 1
        by_prompt[pid] = dict(zip(group["completion"].to_pylist(), rewards))
        # Deterministic, and independent of the rows' order within the group.
        assert judge(group)["reward"].to_pylist() == rewards
        flipped = judge(group.take(list(range(n))[::-1]))
        assert dict(zip(flipped["completion"].to_pylist(), flipped["reward"].to_pylist())) == by_prompt[pid]


def test_batched_left_padded_forwards_match_one_at_a_time(judge):
    t = judge.tokenizer
    seqs = [render_judge_ids(t, judge.spec.rubric, "Review it.", "x" * k, "yes") for k in (1, 9, 30)]
    assert len({len(s) for s in seqs}) == 3
    batched = answer_preferences(judge.model, seqs, judge.a_ids, judge.b_ids, t.pad_token_id, batch_size=3)
    alone = [answer_preferences(judge.model, [s], judge.a_ids, judge.b_ids, t.pad_token_id, 1)[0] for s in seqs]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(alone)) == 3


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("rubric, words", [
    ("Prompt {prompt}. First {a}. Which is better?", ["label.judge_rubric", "{b}"]),
    ("{prompt} {a} {b} {c}", ["label.judge_rubric", "format string", "'c'"]),
    ("{prompt} {a} {b} and a stray } brace", ["label.judge_rubric", "literal brace"]),
    ("{prompt} {a} {b} {0}", ["label.judge_rubric", "format string"]),
])
def test_a_bad_rubric_fails_at_load_in_one_line_naming_the_key(rubric, words):
    message = config_error(["label.labeler=judge", f"label.judge_rubric={rubric!r}"])
    assert message.startswith("label.judge_rubric:"), message
    for word in words:
        assert word in message, message


def test_judge_keys_validate():
    assert "tie_margin" in config_error(["label.judge_tie_margin=-0.1"])
    assert config_error(["label.labeler=judge", "label.filter_labeler=judge"]).startswith("label.filter_labeler:")
    cfg = load_config(None, ["label.labeler=implicit", "label.filter_labeler=judge", "evaluate.labeler=judge",
                             "label.implicit_policy=builtin:tiny-llama",
                             "label.judge_rubric='{a} or {b}, for {prompt}? A or B.'"])
    assert cfg.label.filter_labeler == "judge" and cfg.evaluate.labeler == "judge"
    assert cfg.label.judge_model is None and 0 < LabelConfig().judge_tie_margin


def test_the_judge_is_a_labeler_keyed_on_its_model():
    from dpo_ray import keys
    from dpo_ray.models import model_fingerprint
    from dpo_ray.ops.rewards import LABELERS, Judge, check_labeler

    assert LABELERS["judge"] is Judge
    tiny = load_config("configs/tiny.yaml", ["label.labeler=judge"])
    check_labeler(tiny, "judge")
    # Self-rewarding: the policy judges, so the label stage reruns when the policy changes.
    assert keys.labeler_fingerprints(tiny) == {"judge": model_fingerprint("builtin:tiny-llama")}
    other = load_config("configs/tiny.yaml", ["label.filter_labeler=judge", "label.judge_model=/no/such/judge"])
    with pytest.raises(ModelError, match="/no/such/judge"):
        keys.labeler_fingerprints(other)
    assert "judge" not in keys.labeler_fingerprints(load_config("configs/tiny.yaml"))


@pytest.mark.slow
def test_the_label_stage_pairs_by_the_judge_on_ray(ray_local, judge, tmp_path, capsys):
    import pyarrow.parquet as pq

    from dpo_ray import schemas
    from dpo_ray.stages.label import label_completions

    table = _completions({"p0": 4, "p1": 3, "p2": 2})
    rows = [{**r, "prompt_ids": [1, 2], "completion_ids": [3 + i, 4], "finish_reason": "stop",
             "prompt_truncated": False} for i, r in enumerate(table.to_pylist())]
    (tmp_path / "completions").mkdir()
    pq.write_table(schemas.rows_to_table(rows, schemas.COMPLETIONS), tmp_path / "completions" / "part-0.parquet")
    cfg = load_config("configs/tiny.yaml", ["label.labeler=judge", "label.judge_tie_margin=0", "label.batch_size=5"])
    stats = label_completions(cfg, tmp_path / "completions", tmp_path / "out", None)
    assert stats["prompts"] == 3 and stats["completions"] == 9 and stats["pairs"] == 3
    scored = schemas.read_table(tmp_path / "out" / "scored", schemas.SCORED)
    assert scored.num_rows == 9 and set(scored.column_names) == set(schemas.SCORED.names)
    # The same win shares as the judge run in this process, prompt by prompt.
    for pid in ("p0", "p1", "p2"):
        group = table.filter(pa.compute.equal(table["prompt_id"], pid))
        expected = dict(zip(group["completion"].to_pylist(), judge(group)["reward"].to_pylist()))
        mine = scored.filter(pa.compute.equal(scored["prompt_id"], pid))
        assert dict(zip(mine["completion"].to_pylist(), mine["reward"].to_pylist())) == expected
    pairs = schemas.read_table(tmp_path / "out" / "pairs", schemas.PAIRS)
    assert all(c > r for c, r in zip(pairs["chosen_reward"].to_pylist(), pairs["rejected_reward"].to_pylist()))
    assert "judge builtin:tiny-llama (reward): 10 comparisons of distinct completions" in capsys.readouterr().out
