"""compute_metrics on hand-made EVAL_SAMPLES rows, the keys of the cached reference side and its rewards, and both
models' samples from one actor pool."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray import schemas
from dpo_ray.config import load_config
from dpo_ray.stages.evaluate import _rewards_file, compute_metrics, reference_side_folder


def row(prompt_id, model, index, reward, policy_logp, reference_logp, tokens=5, completion=None, finish="length"):
    return {
        "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "model": model, "sample_index": index,
        "completion": completion or f"{prompt_id}/{model}/{index}", "completion_tokens": tokens,
        "finish_reason": finish, "reward": reward, "policy_logp": policy_logp, "reference_logp": reference_logp,
    }


ROWS = [
    # p1: policy wins sample 0, ties sample 1. Best = policy/0 (0.8), worst = reference/0 (0.2):
    # implicit rewards 1.0 vs -0.5 rank them correctly.
    row("p1", "policy", 0, 0.8, -10.0, -11.0, tokens=4),
    row("p1", "policy", 1, 0.5, -12.0, -12.5, tokens=6),
    row("p1", "reference", 0, 0.2, -9.0, -8.5, tokens=3),
    row("p1", "reference", 1, 0.5, -7.0, -4.0, tokens=9),
    # p2: policy loses sample 0, wins sample 1. Best = policy/1 (0.9), worst = policy/0 (-0.3):
    # implicit rewards -2.0 vs 0.5 rank them wrongly.
    row("p2", "policy", 0, -0.3, -8.0, -8.5, tokens=8),
    row("p2", "policy", 1, 0.9, -9.0, -7.0, tokens=2),
    row("p2", "reference", 0, 0.1, -6.0, -1.0, tokens=5),
    row("p2", "reference", 1, 0.0, -3.0, -9.0, tokens=7),
    # p3: one sample each; policy wins; implicit rewards 0.2 vs 0.1 rank correctly.
    row("p3", "policy", 0, 1.0, -5.0, -5.2, tokens=10),
    row("p3", "reference", 0, 0.0, -4.0, -4.1, tokens=1),
]


def test_reward_means_and_counts():
    m = compute_metrics(ROWS, beta=0.1)
    policy = [0.8, 0.5, -0.3, 0.9, 1.0]
    reference = [0.2, 0.5, 0.1, 0.0, 0.0]
    assert m["policy_reward"] == pytest.approx(statistics.fmean(policy))
    assert m["reference_reward"] == pytest.approx(statistics.fmean(reference))
    assert m["policy_reward_stderr"] == pytest.approx(statistics.stdev(policy) / math.sqrt(5))
    assert m["eval_prompts"] == 3
    assert m["policy_completion_tokens"] == pytest.approx((4 + 6 + 8 + 2 + 10) / 5)
    assert m["reference_completion_tokens"] == pytest.approx((3 + 9 + 5 + 7 + 1) / 5)


def test_win_rate_tie_counts_half():
    m = compute_metrics(ROWS, beta=0.1)
    wins = [1.0, 0.5, 0.0, 1.0, 1.0]
    assert m["win_rate"] == pytest.approx(sum(wins) / 5)
    assert m["win_rate_stderr"] == pytest.approx(statistics.stdev(wins) / math.sqrt(5))


def test_win_rate_pairs_same_prompt_and_index_only():
    rows = [
        row("a", "policy", 0, 1.0, -1, -1),
        row("a", "reference", 1, 5.0, -1, -1),  # different index: not compared
        row("b", "reference", 0, 9.0, -1, -1),  # different prompt: not compared
        row("a", "reference", 0, 1.0, -1, -1),  # the only counterpart: a tie
    ]
    assert compute_metrics(rows, beta=0.1)["win_rate"] == 0.5


def test_kl_over_policy_rows_only():
    m = compute_metrics(ROWS, beta=0.1)
    policy_terms = [1.0, 0.5, 0.5, -2.0, 0.2]
    assert m["kl"] == pytest.approx(statistics.fmean(policy_terms))
    assert m["kl_stderr"] == pytest.approx(statistics.stdev(policy_terms) / math.sqrt(5))


def test_implicit_accuracy():
    m = compute_metrics(ROWS, beta=0.1)
    assert m["held_out_pairs"] == 3
    assert m["implicit_accuracy"] == pytest.approx(2 / 3)


def test_implicit_accuracy_sign_of_beta_ratio():
    # The same pair ranked correctly, then wrongly, by the implicit reward.
    good = [row("q", "policy", 0, 1.0, -1.0, -3.0), row("q", "reference", 0, 0.0, -3.0, -1.0)]
    bad = [row("q", "policy", 0, 1.0, -3.0, -1.0), row("q", "reference", 0, 0.0, -1.0, -3.0)]
    assert compute_metrics(good, beta=0.5)["implicit_accuracy"] == 1.0
    assert compute_metrics(bad, beta=0.5)["implicit_accuracy"] == 0.0


def test_all_ties_give_no_pairs():
    rows = [row("t", "policy", 0, 0.3, -1.0, -2.0), row("t", "reference", 0, 0.3, -2.0, -1.0)]
    m = compute_metrics(rows, beta=0.1)
    assert m["held_out_pairs"] == 0
    assert math.isnan(m["implicit_accuracy"])
    assert m["win_rate"] == 0.5
    assert math.isnan(m["win_rate_stderr"])  # a single comparison has no standard error


def test_text_quality_of_both_models():
    m = compute_metrics(ROWS, beta=0.1)
    # Fluency: each model's completions under the baseline ("reference_logp"), per token.
    assert m["policy_fluency"] == pytest.approx(statistics.fmean([-11 / 4, -12.5 / 6, -8.5 / 8, -7 / 2, -5.2 / 10]))
    assert m["reference_fluency"] == pytest.approx(statistics.fmean([-8.5 / 3, -4 / 9, -1 / 5, -9 / 7, -4.1 / 1]))
    for model in ("policy", "reference"):
        for name in ("distinct_1", "distinct_2", "repeated_3gram_share", "non_dictionary_share",
                     "non_alpha_token_share", "eos_share", "on_task_share", "title_mention_share"):
            assert f"{model}_{name}" in m
        assert m[f"{model}_eos_share"] == 0.0


def test_text_quality_per_model_and_on_task_words():
    rows = [
        row("a", "policy", 0, 1.0, -1, -4, tokens=4, completion="thx thx thx thx", finish="length"),
        row("a", "reference", 0, 0.0, -1, -2, tokens=4, completion="A great recipe here", finish="stop"),
    ]
    m = compute_metrics(rows, beta=0.1, on_task_words=["recipe"])
    assert m["policy_distinct_1"] == pytest.approx(1 / 4) and m["reference_distinct_1"] == 1.0
    assert m["policy_repeated_3gram_share"] == 1.0 and m["reference_repeated_3gram_share"] == 0.0
    assert m["policy_non_dictionary_share"] == 1.0 and m["reference_non_dictionary_share"] == 0.0
    assert m["policy_eos_share"] == 0.0 and m["reference_eos_share"] == 1.0
    assert m["policy_on_task_share"] == 0.0 and m["reference_on_task_share"] == 1.0
    assert m["policy_fluency"] == -1.0 and m["reference_fluency"] == -0.5
    assert compute_metrics(rows, beta=0.1)["reference_on_task_share"] == 0.0  # not movie-review words


def test_audit_rewards_get_their_own_means_and_win_rate():
    """An audit labeler's rewards (EVAL_SAMPLES.audit_rewards, a map) are judged like the training reward: here the
    audit disagrees with it on every comparison, so its win rate is the complement."""
    rows = [{**r, "audit_rewards": [("judge", -r["reward"]), ("sentiment", r["reward"])]} for r in ROWS]
    m = compute_metrics(rows, beta=0.1)
    assert m["audit_sentiment_win_rate"] == m["win_rate"]
    assert m["audit_sentiment_policy_reward"] == m["policy_reward"]
    assert m["audit_judge_policy_reward"] == -m["policy_reward"]
    # Policy vs reference, by sample index: p1 win, tie; p2 loss, win; p3 win -> 3.5/5. Flipped: 1.5/5.
    assert m["win_rate"] == pytest.approx(0.7) and m["audit_judge_win_rate"] == pytest.approx(0.3)
    assert not any(k.startswith("audit_") for k in compute_metrics(ROWS, beta=0.1))


def test_the_lexicon_labelers_score_each_completion_alone():
    """`sentiment` (VADER's compound) and `textblob` (pattern's polarity) on texts with known scores: both rank praise
    above a pan, and TextBlob reads "not good" as negative."""
    import pyarrow as pa

    from dpo_ray.ops.rewards import TextBlob, Vader, lexicon_column

    texts = ["A wonderful film.", "Boring and awful.", "The film is not good.", ""]
    batch = pa.table({"completion": texts})
    assert lexicon_column(batch, "r", TextBlob)["r"].to_pylist() == pytest.approx([1.0, -1.0, -0.35, 0.0])
    vader = lexicon_column(batch, "r", Vader)["r"].to_pylist()
    assert vader[0] == pytest.approx(0.5719) and vader[1] < 0 and vader[3] == 0.0
    assert lexicon_column(batch, "r", TextBlob).column_names == ["completion", "r"]


def _prompts_file(folder, eval_prompts=("a", "b")):
    path = folder / "prompts.parquet"
    rows = [{"prompt_id": p, "prompt": f"prompt {p}", "messages_json": None, "split": "eval"} for p in eval_prompts]
    rows.append({"prompt_id": "t", "prompt": "a training prompt", "messages_json": None, "split": "train"})
    pq.write_table(schemas.rows_to_table(rows, schemas.PROMPTS), path)
    return path


def test_the_cached_reference_side_is_keyed_by_what_its_samples_depend_on(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    folder = reference_side_folder(cfg, _prompts_file(tmp_path))
    assert folder.parent == tmp_path / "eval_reference_cache"
    # Neither how the samples are batched and spread nor anything about the policy or the labelers changes them.
    for same in ("sample.batch_size=3", "sample.num_actors=2", "reference.batch_size=2", "train.beta=0.5",
                 "label.min_margin=0.1", "evaluate.labeler=sentiment", "evaluate.num_examples=1",
                 "data.num_train_prompts=8"):
        assert reference_side_folder(load_config("configs/tiny.yaml", [f"run.root={tmp_path}", same]),
                                     _prompts_file(tmp_path)) == folder, same
    for changed in ("run.seed=1", "evaluate.samples_per_prompt=3", "evaluate.temperature=0.7",
                    "evaluate.max_new_tokens=5", "sample.max_new_tokens=7", "sample.top_p=0.9", "model.dtype=bfloat16",
                    "data.max_prompt_tokens=64", "data.system_prompt=Be brief.",
                    "evaluate.baseline=builtin:smollm2-135m-instruct"):
        assert reference_side_folder(load_config("configs/tiny.yaml", [f"run.root={tmp_path}", changed]),
                                     _prompts_file(tmp_path)) != folder, changed
    other_prompts = tmp_path / "other"
    other_prompts.mkdir()
    assert reference_side_folder(cfg, _prompts_file(other_prompts, ("a", "c"))) != folder


def test_the_baseline_sides_rewards_are_kept_by_what_a_completion_alone_decides(tmp_path, reward_model):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", f"label.reward_model={reward_model}"])
    folder = reference_side_folder(cfg, _prompts_file(tmp_path))
    pointwise = ("sentiment", "textblob", "reward_model")
    files = {name: _rewards_file(cfg, folder, name) for name in pointwise}
    assert len(set(files.values())) == 3
    assert {path.parent for path in files.values()} == {folder.with_name(f"{folder.name}.rewards")}
    # The judge compares the two sides and the implicit reward reads the policy: neither is kept.
    assert _rewards_file(cfg, folder, "judge") is None and _rewards_file(cfg, folder, "implicit") is None
    # A retrained reward model's rewards are another file; without reference.cache nothing is kept.
    (Path(reward_model) / "model.safetensors").write_bytes(b"retrained")
    assert _rewards_file(cfg, folder, "reward_model") != files["reward_model"]
    assert _rewards_file(cfg, folder, "sentiment") == files["sentiment"]
    uncached = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "reference.cache=false"])
    assert _rewards_file(uncached, folder, "sentiment") is None


def _other_policy(folder: Path) -> str:
    """The built-in tiny Llama with its weights moved: a policy that samples and scores otherwise."""
    import torch

    from dpo_ray.models import load_causal_lm, load_tokenizer, resolve_model

    model = load_causal_lm("builtin:tiny-llama")
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.2)
    model.save_pretrained(folder)
    load_tokenizer(resolve_model("builtin:tiny-llama")).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_one_actor_samples_with_each_model_and_holds_each_model_once(ray_local, tmp_path):
    """The actor of evaluate's one pool (scorers.SampleEachAndScore): each row sampled by the model it names, scored
    by both, as an actor holding one sampler would; the policy's sampler and scorer the same loaded model."""
    from dpo_ray.ops.scorers import SampleAndScore, SampleEachAndScore, sample_each_args

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    policy = _other_policy(tmp_path / "policy")
    samplers = {"policy": policy, "reference": "builtin:tiny-llama"}
    args = sample_each_args(cfg, samplers, 2, 6, 1.0, 7, [(policy, "policy_logp"), ("builtin:tiny-llama",
                                                                                     "reference_logp")])
    one = SampleEachAndScore(**args)
    for name, other in (("policy", "reference"), ("reference", "policy")):
        assert one.sides[name].steps[0].model is one.sides[other].steps[1].model
    prompts = [{"prompt_id": f"p{i}", "prompt": f"The film number {i} was", "messages_json": None,
                "model": "policy" if i % 2 else "reference"} for i in range(6)]
    table = one(pa.Table.from_pylist(prompts))
    rows = table.to_pylist()
    assert len(rows) == 6 * 2
    empty = one(pa.Table.from_pylist(prompts).slice(0, 0))
    assert empty.num_rows == 0 and empty.schema == table.schema
    for name in samplers:
        # One sampler in its own actor: SampleAndScore, the sampler's log-prob as its model's column.
        alone = SampleAndScore(args["samplers"][name], args["scorers"][name])(
            pa.Table.from_pylist([p for p in prompts if p["model"] == name])).to_pylist()
        mine = [r for r in rows if r["model"] == name]
        assert [r["completion_ids"] for r in mine] == [r["completion_ids"] for r in alone]
        for row, expected in zip(mine, alone):
            assert row[f"{name}_logp"] == row["sample_logp"] == expected["sample_logp"]
            other = "reference" if name == "policy" else "policy"
            assert row[f"{other}_logp"] == pytest.approx(expected[f"{other}_logp"], abs=1e-5)
            assert row[f"{other}_logp"] != row[f"{name}_logp"]
