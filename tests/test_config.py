"""Config loading: defaults, overrides, YAML merge and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpo_ray.config import ConfigError, PipelineConfig, check_resources, dump_config, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def config_error(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message, message
    assert message.strip(), message
    return message


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.beta == 0.1 and cfg.sample.n == 4 and cfg.train.loss == "sigmoid"
    assert cfg.reference_model == cfg.model.policy


def test_shipped_tiny_config_validates():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.model.policy == "builtin:tiny-llama"
    assert cfg.sample.n >= 2
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert cfg.train.beta == raw["train"]["beta"]  # values come from the file, not the defaults


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.betta=1", "train.betta"),
        ("sample.temprature=0.5", "sample.temprature"),
        ("trian.beta=1", "trian"),
    ],
)
def test_unknown_key_names_dotted_key(override, key):
    message = config_error([override])
    assert key in message
    assert "unknown" in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  beta: 0.2\n  warmup_step: 5\n")
    message = config_error(path=path)
    assert "train.warmup_step" in message


def test_wrong_type_names_key():
    message = config_error(["train.beta=abc"])
    assert message.startswith("train.beta")
    assert "number" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.beta=0", "train.beta"),
        ("train.beta=-0.5", "train.beta"),
        ("sample.n=1", "sample.n"),
        ("sample.n=0", "sample.n"),
        ("train.label_smoothing=0.5", "train.label_smoothing"),
        ("sample.top_p=0", "sample.top_p"),
    ],
)
def test_impossible_values_name_key(override, key):
    assert key in config_error([override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.batch_size=10"],  # not a multiple of micro_batch_size 4
        ["train.num_workers=3"],  # 16 not divisible by 3
        ["train.num_workers=2", "train.micro_batch_size=3", "train.batch_size=8"],  # 4 per worker, micro 3
    ],
)
def test_batch_size_divisibility(overrides):
    message = config_error(overrides)
    assert message.startswith("train.batch_size")


def test_batch_size_divisible_ok():
    cfg = load_config(None, ["train.num_workers=2", "train.micro_batch_size=3", "train.batch_size=12"])
    assert cfg.train.batch_size == 12


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "from-yaml", "seed": 7},
        "train": {"beta": 0.3, "loss": "ipo"},
        "sample": {"n": 6},
    }))
    cfg = load_config(path, ["train.beta=0.05", "sample.temperature=0.5", "run.name=overridden"])
    assert cfg.train.beta == 0.05  # override wins
    assert cfg.train.loss == "ipo"  # sibling from YAML kept
    assert cfg.run.seed == 7 and cfg.run.name == "overridden"
    assert cfg.sample.n == 6 and cfg.sample.temperature == 0.5
    assert cfg.train.lr == 1e-6  # untouched default


def test_parse_overrides_yaml_scalars():
    tree = parse_overrides(["train.beta=0.2", "train.use_gpu=true", "model.reference=null",
                            "run.name=a=b", "data.system_prompt="])
    assert tree == {
        "train": {"beta": 0.2, "use_gpu": True},
        "model": {"reference": None},
        "run": {"name": "a=b"},
        "data": {"system_prompt": None},
    }
    with pytest.raises(ConfigError):
        parse_overrides(["train.beta"])


def test_reward_model_labeler_needs_path():
    message = config_error(["label.labeler=reward_model"])
    assert "label.reward_model" in message
    cfg = load_config(None, ["label.labeler=reward_model", "label.reward_model=/models/rm"])
    assert cfg.label.reward_model == "/models/rm"


def test_implicit_labeler_needs_evaluate_labeler():
    assert "evaluate.labeler" in config_error(["label.labeler=implicit"])
    cfg = load_config(None, ["label.labeler=implicit", "evaluate.labeler=sentiment",
                             "label.implicit_policy=/models/a-policy"])
    assert cfg.evaluate.labeler == "sentiment"
    assert "label.reward_model" in config_error(["evaluate.labeler=reward_model"])


def test_filter_labeler_is_checked_at_load():
    assert config_error(["label.filter_labeler=reward_model"]).startswith(
        "label.reward_model: required when label.filter_labeler is reward_model")
    assert config_error(["label.filter_labeler=sentiment"]).startswith("label.filter_labeler: sentiment would only")
    cfg = load_config(None, ["label.labeler=implicit", "evaluate.labeler=sentiment", "label.filter_labeler=sentiment",
                             "label.implicit_policy=/models/a-policy"])
    assert cfg.label.filter_labeler == "sentiment" and cfg.label.filter_min_margin == 0.0


def test_fluency_guard_is_for_the_implicit_labeler():
    assert config_error(["label.fluency_guard=0"]).startswith(
        "label.fluency_guard: guards the implicit labeler's pairs, not sentiment's")
    implicit = ["label.labeler=implicit", "evaluate.labeler=sentiment", "label.implicit_policy=/models/a-policy"]
    assert "label.fluency_guard" in config_error([*implicit, "label.fluency_guard=-1"])
    cfg = load_config(None, [*implicit, "label.fluency_guard=0.1"])
    assert cfg.label.fluency_guard == 0.1 and load_config(None, []).label.fluency_guard is None


def test_frontier_trains_as_many_variants_at_once_as_the_cluster_holds():
    from dpo_ray.config import concurrent_trainings

    cfg = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1.5", "train.batch_size=16"])
    assert concurrent_trainings(cfg, {"CPU": 2.0}, 6) == 1  # never zero, even if one run barely fits
    assert concurrent_trainings(cfg, {"CPU": 6.0}, 6) == 2
    assert concurrent_trainings(cfg, {"CPU": 64.0}, 6) == 6  # no more than there are variants
    capped = load_config(None, ["train.num_workers=2", "train.batch_size=16", "frontier.max_concurrent=3"])
    assert concurrent_trainings(capped, {"CPU": 64.0}, 6) == 3
    gpu = load_config(None, ["train.num_workers=4", "train.use_gpu=true", "train.batch_size=16"])
    assert concurrent_trainings(gpu, {"CPU": 64.0, "GPU": 8.0}, 6) == 2
    # A custom resource the workers ask for (train.resources) bounds it like CPUs and GPUs.
    tagged = load_config(None, ["train.num_workers=2", "train.batch_size=16", "train.resources={trainer: 1}"])
    assert concurrent_trainings(tagged, {"CPU": 64.0, "trainer": 2.0}, 6) == 1
    assert concurrent_trainings(tagged, {"CPU": 64.0, "trainer": 4.0}, 6) == 2


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(path=missing)
    assert str(missing) in message
    assert "does not exist" in message


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [beta: 0.1\n")
    assert str(bad) in config_error(path=bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- train\n- sample\n")
    assert str(listing) in config_error(path=listing)


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.beta=0.25", "label.pairing=all_pairs"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_implicit_labeler_needs_a_policy_other_than_its_reference():
    message = config_error(["label.labeler=implicit", "evaluate.labeler=sentiment"])
    assert message.startswith("label.implicit_policy:") and "\n" not in message


def test_round_overrides_are_validated_up_front():
    assert config_error(["rounds.count=2", "rounds.overrides={2: {train: {betta: 1}}}"]) == "round 2: train.betta: unknown key"
    assert "rounds.overrides.3" in config_error(["rounds.count=2", "rounds.overrides={3: {}}"])
    # Self-labeling from round 2 on is valid: round 2's policy (round 1's output) differs from the reference.
    cfg = load_config(None, ["rounds.count=3", "evaluate.labeler=sentiment",
                             "rounds.overrides={2: {label: {labeler: implicit}}, 3: {label: {labeler: implicit}}}"])
    assert cfg.rounds.count == 3


def test_round_config_samples_from_the_previous_policy():
    from dpo_ray.config import round_config

    base = load_config(None, ["rounds.count=2", "rounds.overrides={2: {train: {beta: 0.3}}}"])
    first = round_config(base, 1, None)
    assert first.model.policy == base.model.policy and first.train.beta == base.train.beta
    second = round_config(base, 2, "/runs/x/round_1/train/policy")
    assert second.model.policy == "/runs/x/round_1/train/policy"
    assert second.reference_model == base.model.policy  # rounds.reference: initial
    assert second.train.beta == 0.3 and second.train.init_from is None
    assert second.run.seed == base.run.seed + 1
    previous_ref = load_config(None, ["rounds.count=2", "rounds.reference=previous", "rounds.init=initial"])
    second = round_config(previous_ref, 2, "/p1")
    assert second.reference_model == "/p1" and second.train.init_from == base.model.policy


# ------------------------------------------------------------------------------- resources vs the cluster

CPU_NODE = {"CPU": 2.0}


@pytest.mark.parametrize("overrides, message", [
    (["sample.gpus_per_actor=1"], r"^sample\.gpus_per_actor: 1 x 1 GPU = 1 GPU, but the Ray cluster has 0 "),
    (["reference.num_actors=2", "reference.gpus_per_actor=0.5"], r"^reference\.gpus_per_actor: 2 x 0\.5 GPU"),
    (["train.use_gpu=true"], r"^train\.use_gpu: 1 x 1 GPU = 1 GPU, but the Ray cluster has 0"),
    (["train.num_workers=4", "train.batch_size=8", "train.micro_batch_size=2"], r"^train\.cpus_per_worker: 4 x 1 CPU"),
    (["sample.backend=vllm", "sample.tensor_parallel_size=2"], r"^sample\.tensor_parallel_size: 1 x 2 GPU"),
    # Measured: two 1-CPU scorer actors on 2 CPUs, or one on 1 CPU, and the stage never read a row.
    (["reference.num_actors=2"], r"^reference\.cpus_per_actor: 2 x 1 CPU = 2 CPU leaves less than the 1 CPU "),
    (["sample.cpus_per_actor=1.5"], r"^sample\.cpus_per_actor: 1 x 1\.5 CPU = 1\.5 CPU leaves less than"),
    # A custom resource no node offers would leave the actors or workers waiting forever.
    (["sample.resources={sampler: 1}"], r"^sample\.resources\.sampler: 1 x 1 sampler = 1 sampler, but the Ray "
                                        r"cluster has 0"),
    (["train.num_workers=2", "train.resources={trainer: 1}"], r"^train\.resources\.trainer: 2 x 1 trainer"),
])
def test_requests_beyond_the_cluster_fail_naming_the_key(overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_resources(cfg, CPU_NODE, CPU_NODE)


def test_requests_that_fit_pass_and_gpu_clusters_take_gpu_configs():
    check_resources(load_config(None, []), CPU_NODE, CPU_NODE)
    gpu = load_config(None, ["sample.gpus_per_actor=1", "sample.num_actors=4", "train.use_gpu=true",
                             "train.num_workers=8", "train.batch_size=16", "train.micro_batch_size=2"])
    check_resources(gpu, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 4.0})


def test_models_share_an_actor_unless_a_sampler_or_scorer_asks_for_a_gpu():
    assert load_config(None, []).models_share_actor
    assert load_config("configs/gpu.yaml", []).models_share_actor is False
    assert load_config(None, ["sample.gpus_per_actor=1"]).models_share_actor is False
    assert load_config(None, ["reference.gpus_per_actor=0.5"]).models_share_actor is False
    assert load_config(None, ["reference.gpus_per_actor=1", "reference.share_actor=true"]).models_share_actor
    assert load_config(None, ["reference.share_actor=false"]).models_share_actor is False


def test_custom_resources_place_stages_and_are_checked_at_load():
    cfg = load_config(None, ["sample.resources={sampler: 1}", "reference.resources={sampler: 0.5}",
                             "train.resources={trainer: 1}"])
    check_resources(cfg, {"CPU": 5.0, "sampler": 2.0, "trainer": 2.0}, {"CPU": 2.0, "sampler": 2.0, "trainer": 2.0})
    with pytest.raises(ConfigError, match=r"^reference\.resources: CPU has its own key"):
        load_config(None, ["reference.resources={CPU: 1}"])
    with pytest.raises(ConfigError, match=r"^train\.resources: trainer = 0 must be > 0"):
        load_config(None, ["train.resources={trainer: 0}"])


def test_one_process_must_fit_on_one_node():
    cfg = load_config(None, ["sample.gpus_per_actor=2"])
    with pytest.raises(ConfigError, match=r"^sample\.gpus_per_actor: 2 GPU per process, but no Ray node has more than 1"):
        check_resources(cfg, {"CPU": 8.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 1.0})


@pytest.mark.parametrize("override, message", [
    ("sample.temperature=0", r"^sample\.temperature: 0 is greedy decoding, so the sample\.n=4 completions"),
    ("rounds.overrides={2: {train: {beta: 0.2}}}", r"^rounds\.overrides\.2: round 2 is outside 1\.\.rounds\.count \(1\)"),
    ("rounds.overrides={1: {train: {bogus: 1}}}", r"^round 1: train\.bogus: unknown key"),
    ("frontier.betas=[0.1, .nan]", r"^frontier\.betas\.1: Input should be a finite number"),
    ("train.lr=.nan", r"^train\.lr: Input should be a finite number"),
    ("train.beta=.inf", r"^train\.beta: Input should be a finite number"),
    ("train.rpo_alpha=.inf", r"^train\.rpo_alpha: Input should be a finite number"),
    ("run.name=../x", r"^run\.name: '\.\./x' must be a folder name"),
    ("run.name=/etc", r"^run\.name: '/etc' must be a folder name"),
    ("run.name=it's", r"^run\.name: \"it's\" must be a folder name"),
    ("run.name=", r"^run\.name: Input should be a valid string"),
])
def test_values_that_could_only_fail_later_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_files_that_are_empty_a_folder_or_repeat_a_section(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
        load_config(empty)
    with pytest.raises(ConfigError, match=r"is a directory; give a YAML file"):
        load_config(tmp_path)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  beta: 0.1\nsample:\n  n: 4\ntrain:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 5: duplicate key 'train' \(YAML would silently keep"):
        load_config(twice)


@pytest.mark.parametrize("units, overrides, dtype", [
    (["amx_bf16", "avx512_bf16"], [], "bf16-mixed"),
    (["avx512_bf16"], [], "bf16-mixed"),
    ([], [], "float32"),  # bf16 is emulated there, slower than float32
    ([], ["train.use_gpu=true"], "bfloat16"),
    (["amx_bf16"], ["train.use_gpu=true"], "bfloat16"),
    (["amx_bf16"], ["sample.gpus_per_actor=1"], "float32"),  # a CPU trainer beside GPU samplers
    (["amx_bf16"], ["train.strategy=deepspeed"], "float32"),
    (["amx_bf16"], ["train.lora={quantize: nf4}"], "float32"),
])
def test_auto_dtype_takes_bf16_matmuls_where_the_cpu_has_them(monkeypatch, units, overrides, dtype):
    import dpo_ray.config

    monkeypatch.setattr(dpo_ray.config, "bf16_matmul_units", lambda: units)
    assert load_config(None, ["model.dtype=auto", *overrides]).model.dtype == dtype
    # The resolved dtype is what a dumped config (a round's, a run folder's) holds: loading it again keeps it.
    assert load_config(None, [*overrides, f"model.dtype={dtype}"]).model.dtype == dtype
    assert load_config(None, overrides).model.dtype == "float32"  # the default names float32 on every machine


@pytest.mark.parametrize("override", ["sample.gpus_per_actor=1", "train.strategy=deepspeed",
                                      "train.lora={quantize: nf4}"])
def test_bf16_mixed_where_it_cannot_run_is_a_config_error(override):
    assert config_error(["model.dtype=bf16-mixed", override]).startswith("model.dtype: bf16-mixed ")

