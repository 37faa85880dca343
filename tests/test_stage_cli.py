"""Each stage runs alone from the CLI (`dpo-ray <stage>`), on a real local Ray, with the tiny model.

The chain sample -> label -> reference -> train -> evaluate is driven through `dpo_ray.cli.main` one stage at a
time, each reading the previous stage's folder, as a user debugging one stage would.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import ray.data
import torch

from dpo_ray import schemas
from dpo_ray.artifacts import read_manifest
from dpo_ray.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    # The env var reaches the Ray Data workers; this process read it when ray.data was imported, so its own
    # context is set too (the one-line error checks read this process's stderr).
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = tmp_path_factory.mktemp("cli")
    common = ["--config", "configs/tiny.yaml", f"run.root={root}", "data.num_train_prompts=12"]
    # These tests' commands run in this process, joined to one cluster for the whole module, so unlike a user's
    # command (which leaves Ray before printing its error, test_faults) it hears what Ray forwards to its drivers
    # while the one-line error checks read its stderr. CI's raylet warned every 10 s that its disk was over 95% full:
    # this cluster's raylet warns likewise (any disk use is over a threshold of 1%), and forwards nothing here.
    ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_local_fs_capacity_threshold", "0.01")
        ray.init(address="local", num_cpus=2, log_to_driver=False)
    main(["sample", "--out", str(root / "s"), *common])
    main(["label", "--completions", str(root / "s" / "completions"), "--out", str(root / "l"), *common,
          "label.min_margin=0"])
    main(["reference", "--pairs", str(root / "l" / "pairs"), "--out", str(root / "r"), *common])
    yield root, common
    ray.shutdown()


def test_reference_cache_scores_only_pairs_it_has_not_seen(chain):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, common = chain
    pairs = schemas.read_table(root / "l" / "pairs", schemas.PAIRS)
    half = pairs.num_rows // 2
    assert half > 0
    # The first half as the chain's reference run scored it; the second with one more token on each chosen side,
    # a sequence the reference has not seen.
    longer = pa.array([ids + [5] for ids in pairs["chosen_ids"].to_pylist()[half:]], schemas.TOKENS)
    second = pairs.slice(half).set_column(pairs.schema.get_field_index("chosen_ids"), "chosen_ids", longer)
    (root / "mixed").mkdir()
    pq.write_table(pa.concat_tables([pairs.slice(0, half), second]), root / "mixed" / "part-0.parquet")

    main(["reference", "--pairs", str(root / "mixed"), "--out", str(root / "r_warm"), *common])
    main(["reference", "--pairs", str(root / "mixed"), "--out", str(root / "r_cold"), *common, "reference.cache=false"])
    assert read_manifest(root / "r_warm")["stats"]["pairs_from_cache"] == half
    assert read_manifest(root / "r_cold")["stats"]["pairs_from_cache"] == 0
    warm, cold, first = (schemas.read_table(root / name, schemas.REFERENCE).sort_by("pair_id").to_pylist()
                         for name in ("r_warm", "r_cold", "r"))
    first = {r["pair_id"]: r for r in first}
    for w, c in zip(warm, cold):
        for side in ("ref_chosen_logps", "ref_rejected_logps"):
            assert abs(w[side] - c[side]) < 1e-4, (w["pair_id"], side)
            if w["chosen_ids"] == first[w["pair_id"]]["chosen_ids"]:
                assert w[side] == first[w["pair_id"]][side]  # taken from the cache, not recomputed


def test_reference_replays_a_share_of_earlier_pairs_from_the_cache(chain):
    """`--replay` (given twice: two "earlier rounds") with reference.replay_share=0.5: as many earlier pairs as new
    ones, drawn from both folders, with ids of their own; the chain already scored the earlier pairs, so every
    replayed pair's log-probs come from the cache, equal to that run's."""
    import pyarrow.parquet as pq

    root, common = chain
    pairs = schemas.read_table(root / "l" / "pairs", schemas.PAIRS)
    new = pairs.slice(0, 4)
    (root / "new_pairs").mkdir()
    pq.write_table(new, root / "new_pairs" / "part-0.parquet")
    earlier = root / "l" / "pairs"
    argv = ["reference", "--pairs", str(root / "new_pairs"), "--replay", str(earlier), "--replay", str(earlier),
            "--out", str(root / "r_replay"), *common, "reference.replay_share=0.5"]
    main(argv)
    stats = read_manifest(root / "r_replay")["stats"]
    assert stats["replayed_pairs"] == 4 and stats["replay_pool"] == 2 * pairs.num_rows
    assert stats["pairs"] == 8 and stats["pairs_from_cache"] == 8
    out = schemas.read_table(root / "r_replay", schemas.REFERENCE).to_pylist()
    replayed = [r for r in out if r["pair_id"].startswith("replay")]
    assert len(replayed) == 4 and len({r["pair_id"] for r in out}) == 8
    scored = {r["pair_id"]: r for r in schemas.read_table(root / "r", schemas.REFERENCE).to_pylist()}
    for r in replayed:
        first = scored[r["pair_id"].split("/", 1)[1]]
        assert (r["ref_chosen_logps"], r["ref_rejected_logps"]) == (first["ref_chosen_logps"],
                                                                     first["ref_rejected_logps"])
    # Without a share the replay folders are no input: the key is the one of the new pairs alone.
    plain = ["reference", "--pairs", str(root / "new_pairs"), "--out", str(root / "r_plain"), *common]
    main(plain)
    key = read_manifest(root / "r_plain")["key"]
    main([*plain, "--replay", str(earlier), "reference.replay_share=0"])
    assert read_manifest(root / "r_plain")["key"] == key


def test_kl_budget_keeps_an_earlier_checkpoint_when_a_later_one_exceeds_it(chain):
    """train.kl_budget on the tiny model, a checkpoint every step, a budget of almost nothing: the checkpoints are
    probed from the last backward, every one probed before the kept one is over budget, and the published policy is
    the kept checkpoint's (the Monte-Carlo KL of 4 samples can come out <= 0, which meets any budget; if none
    does, the least KL is kept)."""
    from safetensors.torch import load_file

    root, common = chain
    budget = 1e-9
    main(["train", "--reference", str(root / "r"), "--prompts", str(root / "s" / "prompts.parquet"), *common,
          "train.checkpoint_every=1", "train.kl_probe_prompts=4", f"train.kl_budget={budget}",
          "--out", str(root / "t_budget")])
    manifest = read_manifest(root / "t_budget")
    stats = manifest["stats"]
    probes, last = stats["kl_probes"], stats["steps"]
    assert [p["step"] for p in probes] == list(range(last, last - len(probes), -1))
    assert all(p["kl"] > budget for p in probes[:-1]) and probes[0]["kl"] > budget  # the tiny model drifts
    assert all(p["kl_stderr"] > 0 for p in probes)  # 4 samples of different KL
    if stats["kl_budget_met"]:
        assert probes[-1]["kl"] <= budget and stats["kept_step"] == probes[-1]["step"]
    else:
        assert len(probes) == last and stats["kept_step"] == min(probes, key=lambda p: p["kl"])["step"]
    assert stats["kept_step"] < last
    # Every checkpoint was kept for the probes, then all but the kept one and the last were deleted; the published
    # policy is the one of the kept step.
    storage = root / "tiny" / "ray_train" / f"train-{manifest['key'][:12]}"
    states = {json.loads(f.read_text())["step"]: f.parent for f in storage.glob("checkpoint_*/trainer_state.json")}
    assert sorted(states) == sorted({stats["kept_step"], last})
    assert stats["checkpoints_pruned"] == last - 2
    policy = load_file(root / "t_budget" / "policy" / "model.safetensors")
    kept = load_file(states[stats["kept_step"]] / "policy" / "model.safetensors")
    final = load_file(states[last] / "policy" / "model.safetensors")
    assert all(torch.equal(policy[k], kept[k]) for k in policy)
    assert not all(torch.equal(policy[k], final[k]) for k in policy)


def test_sample_stage_alone(chain):
    root, _ = chain
    table = schemas.read_table(root / "s" / "completions", schemas.COMPLETIONS)
    assert table.num_rows == 12 * 4
    assert pc.max(pc.list_value_length(table["completion_ids"])).as_py() <= 12
    assert read_manifest(root / "s")["stats"]["completions"] == 48


def test_sample_is_deterministic_for_a_seed(chain):
    root, common = chain
    main(["sample", "--out", str(root / "s2"), *common])
    a = schemas.read_table(root / "s" / "completions", schemas.COMPLETIONS).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    b = schemas.read_table(root / "s2" / "completions", schemas.COMPLETIONS).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    assert a["completion_ids"].to_pylist() == b["completion_ids"].to_pylist()
    main(["sample", "--out", str(root / "s3"), *common, "run.seed=7"])
    c = schemas.read_table(root / "s3" / "completions", schemas.COMPLETIONS).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    assert a["completion_ids"].to_pylist() != c["completion_ids"].to_pylist()


def test_reference_stage_alone_scores_every_pair(chain):
    root, _ = chain
    pairs = schemas.read_table(root / "l" / "pairs", schemas.PAIRS)
    ref = schemas.read_table(root / "r", schemas.REFERENCE)
    assert ref.num_rows == pairs.num_rows > 0
    assert pc.all(pc.less(ref["ref_chosen_logps"], 0)).as_py()
    assert pc.all(pc.is_finite(ref["ref_rejected_logps"])).as_py()


def test_reference_rerun_with_same_inputs_is_skipped(chain, capsys):
    root, common = chain
    before = read_manifest(root / "r")
    main(["reference", "--pairs", str(root / "l" / "pairs"), "--out", str(root / "r"), *common])
    assert "up to date, skipped" in capsys.readouterr().out
    assert read_manifest(root / "r")["finished_at"] == before["finished_at"]


def test_train_and_evaluate_stages_alone(chain):
    root, common = chain
    main(["train", "--reference", str(root / "r"), "--out", str(root / "t"), *common,
          "train.batch_size=2", "train.micro_batch_size=1"])
    assert (root / "t" / "policy" / "model.safetensors").is_file()
    assert read_manifest(root / "t")["stats"]["steps"] >= 1
    main(["evaluate", "--prompts", str(root / "s" / "prompts.parquet"), "--policy", str(root / "t" / "policy"),
          "--out", str(root / "e"), *common])
    samples = schemas.read_table(root / "e" / "eval_samples", schemas.EVAL_SAMPLES)
    assert samples.num_rows == 4 * 2 * 2

    # One model per actor, as on a GPU (reference.share_actor=false), and the baseline's side sampled again: the
    # same samples, log-probs and rewards as the run whose actors held both models (the default without GPUs).
    main(["evaluate", "--prompts", str(root / "s" / "prompts.parquet"), "--policy", str(root / "t" / "policy"),
          "--out", str(root / "e_split"), *common, "reference.share_actor=false", "reference.cache=false"])

    def by_sample(folder: str) -> dict:
        rows = schemas.read_table(root / folder / "eval_samples", schemas.EVAL_SAMPLES).to_pylist()
        return {(r["prompt_id"], r["model"], r["sample_index"]): r for r in rows}

    shared, split = by_sample("e"), by_sample("e_split")
    assert shared.keys() == split.keys() and len(shared) == 16
    for key, row in shared.items():
        assert (row["completion"], row["reward"]) == (split[key]["completion"], split[key]["reward"]), key
        for column in ("policy_logp", "reference_logp"):
            assert row[column] == pytest.approx(split[key][column], abs=1e-4), (key, column)


def test_bf16_mixed_runs_every_stage(chain, tmp_path):
    """model.dtype=bf16-mixed, which auto picks on CPUs with AMX or AVX512-BF16: training and the reference pass
    under bf16 autocast (emulated on other CPUs, so this runs anywhere), finite log-probs, the policy published in
    float32; sampling in float32, so its completions are the float32 chain's."""
    import numpy as np
    from safetensors import safe_open

    root, common = chain
    main(["run", *common, f"run.root={tmp_path}", "model.dtype=bf16-mixed", "train.epochs=1"])
    run = tmp_path / "tiny"
    assert all(read_manifest(run / stage) for stage in ("sample", "label", "reference", "train", "evaluate"))
    completions = [{(r["prompt_id"], r["sample_index"]): (r["completion_ids"], r["sample_logp"])
                    for r in schemas.read_table(folder, schemas.COMPLETIONS).to_pylist()}
                   for folder in (run / "sample" / "completions", root / "s" / "completions")]
    assert completions[0] == completions[1] and len(completions[0]) == 12 * 4
    reference = schemas.read_table(run / "reference", schemas.REFERENCE)
    logps = np.concatenate([reference[c].to_numpy() for c in schemas.REFERENCE_COLUMNS])
    assert np.isfinite(logps).all() and (logps < 0).all()
    with safe_open(run / "train" / "policy" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("policy_reward", "win_rate", "kl"))
    # The reference cache keeps bf16-mixed's log-probs apart from float32's.
    assert any(p.name.endswith("-bf16-mixed") for p in (tmp_path / "reference_cache").iterdir())


def test_reference_free_losses_train_on_the_label_stages_pairs(chain, capsys, tmp_path):
    """simpo and orpo need no reference log-probs: train reads the label stage's pairs directly. A loss that needs
    them, given the same pairs, fails in one line naming the missing column and what to do."""
    root, common = chain
    pairs, small = root / "l" / "pairs", ["train.batch_size=2", "train.micro_batch_size=1"]
    for loss in ("simpo", "orpo"):
        main(["train", "--reference", str(pairs), "--out", str(root / f"t_{loss}"), *common, *small,
              f"train.loss={loss}"])
        stats = read_manifest(root / f"t_{loss}")["stats"]
        assert stats["steps"] >= 1 and math.isfinite(stats["final/loss"]), stats
        assert (root / f"t_{loss}" / "policy" / "model.safetensors").is_file()
    _fails_with(capsys, ["train", "--reference", str(pairs), "--out", str(tmp_path / "out"), *common, *small],
                3, f"dpo-ray: input error: {pairs}: missing column 'ref_chosen_logps' (double): train.loss=sigmoid "
                   "needs reference log-probs; give --reference the reference stage's output")
    assert not (tmp_path / "out").exists()


def test_offline_preference_data_feeds_reference_and_train(chain):
    root, common = chain
    prefs = ["data.preferences=data/preferences/movie_reviews_hh.jsonl"]
    main(["label", "--out", str(root / "offline_label"), *common, *prefs])
    pairs = schemas.read_table(root / "offline_label" / "pairs", schemas.PAIRS)
    assert pairs.num_rows == 24
    assert all(p.endswith("Assistant:") for p in pairs["prompt"].to_pylist())
    assert pairs["chosen_reward"].null_count == 24
    main(["reference", "--pairs", str(root / "offline_label" / "pairs"), "--out", str(root / "offline_ref"),
          *common, *prefs])
    # 24 pairs at batch 5: the fifth step of each epoch trains the 4 left over and repeats 1, none is dropped.
    main(["train", "--reference", str(root / "offline_ref"), "--out", str(root / "offline_train"), *common, *prefs,
          "train.batch_size=5", "train.micro_batch_size=1"])
    stats = read_manifest(root / "offline_train")["stats"]
    assert (stats["pairs"], stats["pairs_repeated_per_epoch"], stats["steps"]) == (24, 1, 5 * 2)


def _fails_with(capsys, argv: list[str], code: int, line: str) -> None:
    """The CLI ends with exactly one line on stderr, starting with `line`, and exit code `code`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == code, err
    assert len(err) == 1 and err[0].startswith(line), err


def test_more_gpus_than_the_cluster_fails_before_any_work(chain, capsys):
    root, common = chain
    _fails_with(capsys, ["sample", "--out", str(root / "gpu"), *common, "sample.num_actors=2",
                         "sample.gpus_per_actor=1"],
                2, "dpo-ray: config error: sample.gpus_per_actor: 2 x 1 GPU = 2 GPU, but the Ray cluster has 0")
    assert not (root / "gpu").exists()


def test_user_errors_are_one_line_with_their_exit_code(chain, capsys, tmp_path):
    root, common = chain
    out = ["--out", str(tmp_path / "out")]
    _fails_with(capsys, ["sample", *out, *common, "data.prompts=/nowhere/prompts.jsonl"],
                3, "dpo-ray: input error: data.prompts: /nowhere/prompts.jsonl does not exist")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"chosen": "The movie was great fun", "rejected": "The movie was awful"}) + "\n")
    _fails_with(capsys, ["label", *out, *common, f"data.preferences={prefs}"],
                3, f"dpo-ray: input error: {prefs}: row 1: field chosen: chosen has no 'Assistant:' turn")
    completions = ["--completions", str(root / "s" / "completions")]
    _fails_with(capsys, ["label", *completions, *out, *common, "label.labeler=reward_model",
                         "label.reward_model=builtin:tiny-llama"],
                4, "dpo-ray: model error: label.reward_model: builtin:tiny-llama has a 2-output head")
    _fails_with(capsys, ["label", *completions, *out, *common, "label.min_margin=1000"],
                3, "dpo-ray: input error: label: no preference pairs from 48 completions")
    _fails_with(capsys, ["train", "--reference", str(root / "r"), *out, *common, "train.batch_size=1000",
                         "train.micro_batch_size=2"],
                2, "dpo-ray: config error: train.batch_size: 1000 is larger than the")
    _fails_with(capsys, ["run", *common, "run.root=/proc/dpo-ray"],
                5, "dpo-ray: storage error: run.root: cannot write to /proc/dpo-ray")
    assert not (tmp_path / "out").exists()


def test_zero_rows_end_early_naming_the_key(chain, capsys, tmp_path):
    root, common = chain
    out = ["--out", str(tmp_path / "out")]
    empty, one = tmp_path / "empty.jsonl", tmp_path / "one.jsonl"
    empty.write_text("")
    one.write_text(json.dumps({"prompt": "Review Heat."}) + "\n")
    _fails_with(capsys, ["sample", *out, *common, f"data.prompts={empty}"],
                3, f"dpo-ray: input error: data.prompts: no usable prompt in {empty} (0 row(s) rejected)")
    _fails_with(capsys, ["sample", *out, *common, f"data.prompts={one}"],
                3, "dpo-ray: input error: data.num_eval_prompts: the 1 prompt in")
    _fails_with(capsys, ["evaluate", "--prompts", "data/prompts/movie_reviews.jsonl", "--policy",
                         str(root / "s"), *out, *common],
                3, "dpo-ray: input error: --prompts: data/prompts/movie_reviews.jsonl is not the prompts.parquet")
    _fails_with(capsys, ["run", *common, "data.num_eval_prompts=0"],
                2, "dpo-ray: config error: data.num_eval_prompts: 0 leaves nothing to evaluate")
    assert not (tmp_path / "out").exists()


def test_prompt_files_that_are_not_prompt_rows_are_one_line(chain, capsys, tmp_path):
    from datasets import Dataset, DatasetDict

    root, common = chain
    out = ["--out", str(tmp_path / "out")]
    pretty, chat, splits = tmp_path / "prompts.json", tmp_path / "chat.jsonl", tmp_path / "dd"
    pretty.write_text(json.dumps({"rows": [{"prompt": "Review Heat."}, {"prompt": "Review Alien."}]}, indent=2))
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Review Heat."},
                                             {"role": "assistant", "content": "Great."}]}) + "\n")
    DatasetDict({"train": Dataset.from_list([{"prompt": "Review Heat."}])}).save_to_disk(str(splits))
    _fails_with(capsys, ["sample", *out, *common, f"data.prompts={pretty}"],
                3, f"dpo-ray: input error: {pretty}: holds one JSON object spread over several lines; give an array "
                   "of row objects or JSON Lines")
    _fails_with(capsys, ["sample", *out, *common, f"data.prompts={chat}"],
                3, f"dpo-ray: input error: {chat}: row 1: field messages: the last turn is 'assistant'")
    _fails_with(capsys, ["sample", *out, *common, f"data.prompts={splits}", "data.split=validation"],
                3, f"dpo-ray: input error: {splits}: a saved DatasetDict without a 'validation' split (it has "
                   "train); set data.split")
    assert not (tmp_path / "out").exists()


def test_stages_read_parquet_without_starting_footer_reader_actors(chain):
    # The chain's label and reference stages read Parquet; Ray's V2 reader would have started FooterReader actors
    # (one process each) for every read. ray._private.state is the GCS actor table, there without a dashboard.
    classes = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}
    assert any("MapWorker" in name for name in classes), classes
    assert not any("FooterReader" in name for name in classes), classes


def _rerun_says(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().out


def test_sample_reruns_when_the_prompt_file_changed_in_place(chain, capsys, tmp_path):
    root, common = chain
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((Path("data/prompts/movie_reviews.jsonl")).read_text())
    argv = ["sample", "--out", str(root / "s_edit"), *common, f"data.prompts={prompts}", "data.num_train_prompts=4",
            "data.num_eval_prompts=1"]
    main(argv)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    for row in rows:
        row["prompt"] = "EDITED " + row["prompt"]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = _rerun_says(capsys, argv)
    assert "up to date, skipped" not in out
    sampled = schemas.read_table(root / "s_edit" / "completions", schemas.COMPLETIONS)["prompt"].to_pylist()
    assert sampled and all("EDITED" in p for p in sampled)


def test_label_reruns_when_the_completions_folder_changed_in_place(chain, capsys):
    import pyarrow.parquet as pq

    root, common = chain
    completions = root / "c_edit"
    shutil.copytree(root / "s" / "completions", completions)
    argv = ["label", "--completions", str(completions), "--out", str(root / "l_edit"), *common, "label.min_margin=0"]
    main(argv)
    before = read_manifest(root / "l_edit")["stats"]
    # The user keeps only a third of the prompts (the same folder, new contents).
    table = schemas.read_table(completions, schemas.COMPLETIONS)
    keep = sorted(set(table["prompt_id"].to_pylist()))[:4]
    shutil.rmtree(completions)
    completions.mkdir()
    pq.write_table(table.filter(pc.is_in(table["prompt_id"], pa.array(keep))), completions / "part-0.parquet")
    assert "up to date, skipped" not in _rerun_says(capsys, argv)
    after = read_manifest(root / "l_edit")["stats"]
    assert after["prompts"] == 4 < before["prompts"]
    pairs = schemas.read_table(root / "l_edit" / "pairs", schemas.PAIRS)
    assert set(pairs["prompt_id"].to_pylist()) <= set(keep)


def test_preference_import_reruns_when_the_file_was_corrected(chain, capsys, tmp_path):
    root, common = chain
    prefs = tmp_path / "prefs.jsonl"
    rows = [json.loads(line) for line in Path("data/preferences/movie_reviews_hh.jsonl").read_text().splitlines()]
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    prefs.write_text("".join(json.dumps(row) + "\n" for row in swapped))
    argv = ["label", "--out", str(root / "prefs_edit"), *common, f"data.preferences={prefs}"]
    main(argv)
    prefs.write_text("".join(json.dumps(row) + "\n" for row in rows))  # chosen/rejected fixed
    assert "up to date, skipped" not in _rerun_says(capsys, argv)
    pairs = schemas.read_table(root / "prefs_edit" / "pairs", schemas.PAIRS).to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert pairs and all(by_id[p["pair_id"]]["chosen"].endswith(p["chosen"]) for p in pairs), pairs[0]
