"""Between-round mechanics without a cluster: TR-DPO's soft reference update (weights, skip, cache keying) and the
replay draw."""

from __future__ import annotations

import pytest
import torch

from dpo_ray.config import load_config, round_config
from dpo_ray.errors import ConfigError, ModelError
from dpo_ray.models import blend_weights, load_causal_lm, model_fingerprint
from dpo_ray.ops.scorers import ReferenceCache
from dpo_ray.pairs import replay_choice, replay_count
from dpo_ray.runner import StageRunner
from dpo_ray.stages import soft_update


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    """builtin:tiny-llama with every weight moved: a stand-in for a trained policy."""
    from dpo_ray.models import load_tokenizer

    folder = tmp_path_factory.mktemp("policy")
    model = load_causal_lm("builtin:tiny-llama")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer("builtin:tiny-llama").save_pretrained(folder)
    return folder


def _cfg(tmp_path, *overrides):
    return load_config("configs/tiny.yaml", [f"run.root={tmp_path}", *overrides])


def test_soft_update_weights_equal_the_formula_and_key_the_cache_apart(tmp_path, policy_folder):
    cfg = _cfg(tmp_path, "rounds.reference_alpha=0.25")
    out = tmp_path / "round_2" / "soft_update"
    run = StageRunner(None)
    run(soft_update, cfg, out, {"policy": policy_folder})
    blended = load_causal_lm(str(out)).state_dict()
    reference = load_causal_lm(cfg.reference_model).state_dict()
    policy = load_causal_lm(str(policy_folder)).state_dict()
    assert blended.keys() == reference.keys()
    for name, weight in blended.items():
        torch.testing.assert_close(weight, 0.25 * policy[name] + 0.75 * reference[name], rtol=0, atol=1e-6)
    assert not torch.equal(blended["lm_head.weight"], reference["lm_head.weight"])

    # A rerun on the same inputs keeps the folder, so its fingerprint (and the reference cache it names) holds.
    fingerprint = model_fingerprint(str(out))
    assert run(soft_update, cfg, out, {"policy": policy_folder})["stats"]["alpha"] == 0.25
    assert model_fingerprint(str(out)) == fingerprint
    # Its reference cache is its own: not the initial model's, not the policy's.
    caches = {ReferenceCache.of(_cfg(tmp_path, f"model.reference={ref}")).folder
              for ref in (str(out), cfg.reference_model, str(policy_folder))}
    assert len(caches) == 3
    # Another alpha is another model: recomputed, and a new cache folder, so no stale log-prob can be reused.
    run(soft_update, _cfg(tmp_path, "rounds.reference_alpha=0.5"), out, {"policy": policy_folder})
    assert model_fingerprint(str(out)) != fingerprint


def test_blend_refuses_other_architectures():
    a = {"w": torch.zeros(2, 3)}
    with pytest.raises(ModelError, match="w is \\(3, 2\\) in the policy"):
        blend_weights(a, {"w": torch.zeros(3, 2)}, 0.5)
    with pytest.raises(ModelError, match="differ in their weights"):
        blend_weights(a, {"v": torch.zeros(2, 3)}, 0.5)
    kept = blend_weights({"w": torch.ones(2), "n": torch.tensor([3])}, {"w": torch.zeros(2), "n": torch.tensor([3])},
                         0.5)
    assert kept["w"].tolist() == [0.5, 0.5] and kept["n"].tolist() == [3]


def test_round_configs_follow_the_soft_reference_and_score_self_labels_against_the_last_one():
    cfg = load_config("configs/tiny.yaml", [
        "rounds.count=3", "rounds.reference=soft", "evaluate.labeler=sentiment",
        "rounds.overrides={2: {label: {labeler: implicit}}, 3: {label: {labeler: implicit}}}"])
    round_2 = round_config(cfg, 2, "/r1/policy", cfg.reference_model, "/r2/soft")
    assert (round_2.model.policy, round_2.reference_model) == ("/r1/policy", "/r2/soft")
    # Round 1's policy was trained against the initial model: its implicit reward is measured against that.
    assert round_2.label.implicit_reference == cfg.reference_model
    round_3 = round_config(cfg, 3, "/r2/policy", round_2.reference_model, "/r3/soft")
    assert round_3.label.implicit_reference == "/r2/soft" and round_3.evaluate.baseline == cfg.reference_model
    assert round_3.rounds.reference_alpha == cfg.rounds.reference_alpha
    initial = load_config("configs/tiny.yaml", ["rounds.count=2"])
    assert round_config(initial, 2, "/r1/policy", initial.reference_model).label.implicit_reference is None


def test_every_round_holds_out_the_same_prompts_trains_on_none_of_them_and_reuses_the_baselines_samples(
        tmp_path, policy_folder):
    """Round k samples with seed+k-1 but keeps round 1's held-out prompts (before, each round split them again, and
    a later round's held-out prompts included earlier rounds' train prompts), draws its own train prompts from the
    rest, and evaluates with round 1's sampling seed, so the baseline's side of evaluation is one cache entry."""
    import pyarrow.parquet as pq

    from dpo_ray import keys
    from dpo_ray.ops.prompts import prepare_prompts
    from dpo_ray.stages import evaluate, sample

    cfg = _cfg(tmp_path, "rounds.count=3", "data.num_train_prompts=96", "data.num_eval_prompts=48")
    rounds = [round_config(cfg, 1), *(round_config(cfg, k, str(policy_folder)) for k in (2, 3))]
    assert [r.run.seed for r in rounds] == [0, 1, 2] and {r.held_out_seed for r in rounds} == {0}
    splits = []
    for k, round_cfg in enumerate(rounds, 1):
        out = tmp_path / f"round_{k}"
        out.mkdir()
        prepare_prompts(round_cfg, out)
        rows = pq.read_table(out / "prompts.parquet").to_pylist()
        splits.append({split: {r["prompt_id"] for r in rows if r["split"] == split} for split in ("train", "eval")})
    assert all(len(s["eval"]) == 48 and s["eval"] == splits[0]["eval"] for s in splits)
    assert all(len(s["train"]) == 96 and not s["train"] & splits[0]["eval"] for s in splits)
    assert splits[1]["train"] != splits[0]["train"] != splits[2]["train"]
    folders = {evaluate.reference_side_folder(r, tmp_path / f"round_{k}" / "prompts.parquet")
               for k, r in enumerate(rounds, 1)}
    assert len(folders) == 1
    # Round 1 is the single run it always was: the same split, the same stage key.
    alone = tmp_path / "alone"
    alone.mkdir()
    prepare_prompts(cfg, alone)
    assert pq.read_table(alone / "prompts.parquet").equals(pq.read_table(tmp_path / "round_1" / "prompts.parquet"))
    assert sample.inputs(rounds[0], {}) == sample.inputs(cfg, {})
    assert sample.inputs(rounds[1], {})["data"]["held_out_seed"] == 0
    assert keys.held_out_prompts(rounds[1], {"prompts": "p"}) != keys.held_out_prompts(rounds[0], {"prompts": "p"})


@pytest.mark.parametrize("overrides, message", [
    (["rounds.reference_alpha=0"], "rounds.reference_alpha: Input should be greater than 0"),
    (["reference.replay_share=1"], "reference.replay_share: Input should be less than 1"),
    (["evaluate.audit_labelers=[sentiment]"], "evaluate.audit_labelers: ['sentiment'] already labels"),
    (["evaluate.audit_labelers=[reward_model]"], "label.reward_model: required when"),
    (["evaluate.audit_labelers=[judge, judge]"], "names a labeler twice"),
    (["label.labeler=textblob", "evaluate.audit_labelers=[textblob]"], "['textblob'] already labels"),
    (["evaluate.audit_labelers=[vader]"], "evaluate.audit_labelers.0: Input should be 'sentiment', 'textblob'"),
])
def test_round_settings_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_replay_count_and_draw():
    assert replay_count(96, 500, 0.25) == 32  # 32 of 128 pairs
    assert replay_count(96, 10, 0.25) == 10  # at most the pool
    assert replay_count(96, 500, 0.0) == 0 and replay_count(0, 500, 0.5) == 0
    ids = [f"replay{r}/p{i}:0>1" for r in (1, 2) for i in range(50)]
    drawn = replay_choice(ids, 30, seed=0)
    assert len(set(drawn)) == 30 and drawn == sorted(drawn)
    # The draw depends on the ids and the seed, not on the pool's order; a larger draw contains a smaller one.
    reversed_ids = ids[::-1]
    assert sorted(reversed_ids[i] for i in replay_choice(reversed_ids, 30, seed=0)) == sorted(ids[i] for i in drawn)
    assert set(drawn) <= set(replay_choice(ids, 40, seed=0))
    assert replay_choice(ids, 30, seed=1) != drawn


def test_replay_of_no_pairs_adds_nothing(tmp_path):
    """A round with one new pair at share 0.25 replays round(1/3) = 0 pairs: nothing is added and the stats say so
    (the draw used to hand pyarrow an empty list, which it cannot take with)."""
    import pyarrow.parquet as pq

    from dpo_ray import schemas
    from dpo_ray.stages.reference import _replayed

    rows = [{"pair_id": f"p{i}:0>1", "prompt_id": f"p{i}", "prompt": "x", "prompt_ids": [1], "chosen": "a",
             "chosen_ids": [2], "rejected": "b", "rejected_ids": [3], "chosen_reward": 1.0, "rejected_reward": 0.0}
            for i in range(3)]
    (tmp_path / "pairs").mkdir()
    pq.write_table(schemas.rows_to_table(rows, schemas.PAIRS), tmp_path / "pairs" / "part.parquet")
    cfg = load_config("configs/tiny.yaml", ["reference.replay_share=0.25"])
    assert _replayed(cfg, [tmp_path / "pairs"], new_pairs=1) == (None, {"replayed_pairs": 0, "replay_pool": 3})
    replayed, stats = _replayed(cfg, [tmp_path / "pairs"], new_pairs=6)
    assert stats == {"replayed_pairs": 2, "replay_pool": 3} and replayed.num_rows == 2
    assert all(pair_id.startswith("replay1/") for pair_id in replayed["pair_id"].to_pylist())


def test_kl_budget_probes_backward_from_the_last_checkpoint():
    from dpo_ray.ops.kl_budget import choose_checkpoint

    kl = {2: 0.5, 4: 1.5, 6: 3.0, 8: 2.5}
    probed = []

    def probe(step):
        probed.append(step)
        return kl[step]

    assert choose_checkpoint(probe, [2, 4, 6, 8], budget=2.0) == (4, [{"step": 8, "kl": 2.5}, {"step": 6, "kl": 3.0},
                                                                      {"step": 4, "kl": 1.5}])
    assert probed == [8, 6, 4]  # stops at the first within budget
    assert choose_checkpoint(probe, [2, 4, 6, 8], budget=2.5)[0] == 8  # at the budget is within
    step, probes = choose_checkpoint(probe, [8, 2, 6, 4], budget=0.1)  # none within: the least KL
    assert step == 2 and [p["step"] for p in probes] == [8, 6, 4, 2]


def test_rounds_spend_the_kl_budget_linearly_unless_a_round_says_otherwise():
    cfg = load_config("configs/tiny.yaml", ["rounds.count=3", "rounds.kl_budget=12",
                                            "rounds.overrides={3: {train: {kl_budget: 20}}}"])
    assert [round_config(cfg, k, *(("/p", "/r") if k > 1 else ())).train.kl_budget for k in (1, 2, 3)] == [4, 8, 20]
    with pytest.raises(ConfigError, match="rounds.kl_budget: set it or train.kl_budget, not both"):
        load_config("configs/tiny.yaml", ["rounds.kl_budget=12", "train.kl_budget=3"])


def test_between_rounds_the_soft_reference_is_blended_and_round_k_trains_against_it(tmp_path, policy_folder):
    """pipeline._next_round with rounds.reference=soft: round 2's reference is the soft_update stage's folder under
    round_2/, blended from round 1's reference (the initial model) and its policy; round 3's from round 2's."""
    from dpo_ray.pipeline import _next_round

    cfg = _cfg(tmp_path, "rounds.count=3", "rounds.reference=soft", "rounds.reference_alpha=0.5")
    run = StageRunner(None)
    round_1 = _next_round(cfg, 1, None, [], run)
    round_2 = _next_round(cfg, 2, round_1, [{"policy": str(policy_folder)}], run)
    soft_2 = cfg.run_dir / "round_2" / "soft_update"
    assert round_2.reference_model == str(soft_2) and round_2.model.policy == str(policy_folder)
    assert round_2.evaluate.baseline == cfg.reference_model
    initial = load_causal_lm(cfg.reference_model).state_dict()
    policy = load_causal_lm(str(policy_folder)).state_dict()
    blended = load_causal_lm(str(soft_2)).state_dict()
    torch.testing.assert_close(blended["lm_head.weight"], (initial["lm_head.weight"] + policy["lm_head.weight"]) / 2)
    round_3 = _next_round(cfg, 3, round_2, [{"policy": str(policy_folder)}], run)
    soft_3 = load_causal_lm(round_3.reference_model).state_dict()
    torch.testing.assert_close(soft_3["lm_head.weight"], (blended["lm_head.weight"] + policy["lm_head.weight"]) / 2)
    assert round_3.label.implicit_reference == str(soft_2)


def test_keys_added_with_the_guards_leave_stage_keys_unchanged_at_their_defaults():
    """Run folders made before these keys existed keep their stage keys (no retraining on upgrade); setting one
    changes the key of the stage that reads it."""
    from dpo_ray import keys
    from dpo_ray.stages import evaluate, label, train

    def stage_keys(*overrides):
        cfg = load_config("configs/default.yaml", list(overrides))
        return (label.inputs(cfg, {"completions": "c"}), train.inputs(cfg, {"reference": "r"}),
                evaluate.inputs(cfg, {"policy": "p", "prompts": "q"}))

    default = stage_keys()
    for section, names in keys.ADDED_LATER.items():
        assert not set(names) & set(keys.settings(load_config("configs/default.yaml"), section))
    assert stage_keys("label.judge_tie_margin=0.2")[0] != default[0]
    assert stage_keys("train.kl_budget=5")[1] != default[1]
    assert stage_keys("evaluate.quality_tolerance=0.5")[2] != default[2]
