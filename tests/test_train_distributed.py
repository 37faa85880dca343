"""The train stage under Ray Train with two CPU workers: DDP on gloo, DeepSpeed ZeRO-2/3 on CPU, and resume.

Pairs are random token sequences of the tiny model's vocabulary, their reference log-probs computed by the same
scorer the reference stage uses (called in-process, no Ray needed for that part).
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import isolated_env, make_reference_parquet

from dpo_ray.artifacts import read_manifest
from dpo_ray.config import load_config
from dpo_ray.models import resolve_model
from dpo_ray.cluster import init_ray
from dpo_ray.runner import StageContext
from dpo_ray.stages import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    path = make_reference_parquet(tmp_path_factory.mktemp("ref") / "reference")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2)
    yield path
    ray.shutdown()


def test_the_driver_and_ray_data_put_pairs_in_the_same_seeded_order(reference_dir, tmp_path):
    """A small reference output is ordered in the driver, a large one by Ray Data's sort: the same rows in the same
    order, whatever files hold them."""
    from dpo_ray.stages.train import _seeded_order

    table = pq.read_table(reference_dir)
    for i, start in enumerate(range(0, table.num_rows, 6)):  # three files, in another order than the pairs'
        pq.write_table(table.slice(start, 6), tmp_path / f"part-{9 - i}.parquet")
    for seed in (0, 7):
        in_driver = pa.concat_tables(ray.get(_seeded_order(str(tmp_path), seed).to_arrow_refs()))
        by_ray = pa.concat_tables(ray.get(_seeded_order(str(tmp_path), seed, driver_bytes=0).to_arrow_refs()))
        assert in_driver.num_rows == table.num_rows and in_driver.equals(by_ray.select(in_driver.column_names))
    assert in_driver["pair_id"].to_pylist() != table["pair_id"].to_pylist()


# Each training strategy, for the tests that run under all of them.
STRATEGIES = pytest.mark.parametrize("strategy", [
    ["train.strategy=ddp"],
    ["train.strategy=deepspeed", "train.zero_stage=2"],
    ["train.strategy=deepspeed", "train.zero_stage=3"],
], ids=["ddp", "zero2", "zero3"])


def _train_two_workers(reference_dir: Path, root: Path, key: str, *overrides: str):
    """The train stage on two workers, 16 pairs at 8 per step for 2 epochs (4 steps), into root/train:
    (cfg, the output folder, the stage's stats)."""
    cfg = load_config("configs/tiny.yaml", [
        f"run.root={root}", "train.num_workers=2", "train.batch_size=8", "train.micro_batch_size=2",
        "train.epochs=2", "train.lr=1e-2", *overrides,
    ])
    out = root / "train"
    out.mkdir(parents=True)
    return cfg, out, train.run(StageContext(cfg, out, {"reference": reference_dir}, key))


@pytest.fixture(scope="module")
def plain_run(reference_dir, tmp_path_factory):
    """_train_two_workers under a strategy with nothing else changed, run once per strategy for this module's tests
    (each run starts a Ray Train worker group: about a minute on two cores)."""
    runs = {}

    def run(strategy: list[str]):
        key = strategy[-1]
        if key not in runs:
            root = tmp_path_factory.mktemp("plain")
            runs[key] = _train_two_workers(reference_dir, root, "plain-" + key.rsplit("=", 1)[-1], *strategy)
        return runs[key]

    return run


@STRATEGIES
def test_two_workers_train_and_save_policy(plain_run, strategy):
    cfg, out, stats = plain_run(strategy)
    assert stats["steps"] == 4  # 16 pairs / 8 per step x 2 epochs
    assert stats["nonfinite_steps"] == 0
    # Preference accuracy after a few large steps on 16 fixed pairs: the policy learned to rank them.
    assert stats["final/rewards/accuracies"] > 0.5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert model.config.num_hidden_layers == 2
    if "train.strategy=deepspeed" in strategy:
        # The saved policy is the trained one: equal to the weights in DeepSpeed's own sharded checkpoint of the
        # last step, consolidated offline (for ZeRO-3 the save gathers layer by layer, not the whole model at once).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        (last,) = sorted(p for p in (cfg.run_dir / "ray_train").glob("train-*/checkpoint_*") if p.is_dir())[-1:]
        trained = get_fp32_state_dict_from_zero_checkpoint(str(last / "deepspeed"), tag="state")
        saved = model.state_dict()
        assert {k.removeprefix("lm.") for k in trained} <= set(saved)
        for key, value in trained.items():
            torch.testing.assert_close(saved[key.removeprefix("lm.")], value, rtol=0, atol=0, msg=key)
        untrained = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.policy))
        assert any(not torch.equal(untrained.state_dict()[k], saved[k]) for k in saved)


def test_same_pairs_in_another_file_layout_train_the_same_policy_bit_for_bit(reference_dir, tmp_path):
    # Ray Data may write the same reference rows in another order, into other files; the batches, and so the
    # policy, must not depend on that. Two workers, so the split between them is covered too.
    table = pq.read_table(reference_dir)
    layouts = {"four_files": [table.slice(4 * i, 4) for i in range(4)],
               "two_files_reversed": [table.take(list(range(15, 7, -1))), table.take(list(range(7, -1, -1)))]}
    digests = []
    for name, parts in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        for i, part in enumerate(parts):
            pq.write_table(part, folder / f"part-{i}.parquet")
        cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path / 'runs' / name}", "train.num_workers=2",
                                                "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2"])
        init_ray(cfg)
        out = tmp_path / "train" / name
        out.mkdir(parents=True)
        train.run(StageContext(cfg, out, {"reference": folder}, f"layout-{name}"))
        digests.append(hashlib.sha256((out / "policy" / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_the_repeated_pairs_follow_the_whole_epoch_whatever_its_blocks(reference_dir):
    from dpo_ray.stages.train import with_repeats

    # Order preserved, as init_ray sets it for every stage (union interleaved its inputs' blocks only then).
    context = ray.data.DataContext.get_current()
    preserve_order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        ordered = ray.data.range(10, override_num_blocks=4).materialize()
        assert [r["id"] for r in with_repeats(ordered, 3).iter_rows()] == [*range(10), 0, 1, 2]
    finally:
        context.execution_options.preserve_order = preserve_order


def test_killed_lora_training_resumes_from_its_last_checkpoint(reference_dir, tmp_path):
    """The driver killed mid-training: nothing is published, and the same command resumes from the last checkpoint,
    the adapter's own (full fine-tuning's driver kill and resume are in test_faults.py's chaos test)."""
    args = [sys.executable, "-m", "dpo_ray.cli", "train", "--config", "configs/tiny.yaml",
            "--reference", str(reference_dir), "--out", str(tmp_path / "train"), f"run.root={tmp_path}",
            "train.epochs=8", "train.checkpoint_every=5", "train.batch_size=4", "train.micro_batch_size=2",
            "train.lora={r: 4}"]
    env = isolated_env()
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline:
        line = first.stdout.readline()
        seen += line
        if "step 12/32" in line:
            break
        assert line or first.poll() is None, seen[-3000:]
    cluster = psutil.Process(first.pid).children(recursive=True)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # Each of the run's processes gone before its checkpoints are counted: a training worker once outlived the kill
    # by a checkpoint.
    for proc in cluster:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert not psutil.wait_procs(cluster, timeout=60)[1]
    assert "step 12/32" in seen, seen[-3000:]
    assert read_manifest(tmp_path / "train") is None  # nothing published by the killed run
    # The checkpoints the killed run left, by step: the worker runs ahead of the log lines the driver forwards, so
    # the kill comes at step 12 or later.
    left = sorted(json.loads(p.read_text())["step"]
                  for p in (tmp_path / "tiny" / "ray_train").glob("train-*/checkpoint_*/trainer_state.json"))

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    # Read from the stage's stats, not the log: Ray forwards worker output to the driver on a best-effort basis,
    # and a run once lost the "[train] resumed from step" line.
    stats = read_manifest(tmp_path / "train")["stats"]
    # It resumes from the last checkpoint Ray Train's controller recorded: the last one left, or one of the two before
    # it, which the worker wrote before the controller collected its report (its queue holds one report, and the
    # worker's next waits to join it).
    assert len(stats["resumed_from"]) == 1 and stats["resumed_from"][0] in left[-3:], (left, log[-3000:])
    assert 0 < stats["resumed_from"][0] < 32
    assert "step 1/32" not in log
    assert stats["steps"] == 32
    assert (tmp_path / "train" / "adapter").is_dir()


def _with_infinite_reference(reference_dir: Path, folder: Path, rows: int | None) -> Path:
    """A copy of the reference Parquet whose first `rows` (all if None) ref_chosen_logps are +inf."""
    import pyarrow as pa

    table = pq.read_table(reference_dir)
    n = table.num_rows if rows is None else rows
    values = [float("inf")] * n + table["ref_chosen_logps"].to_pylist()[n:]
    index = table.schema.get_field_index("ref_chosen_logps")
    table = table.set_column(index, "ref_chosen_logps", pa.array(values, pa.float64()))
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    return folder


def test_nonfinite_steps_in_a_row_stop_with_the_documented_message(reference_dir, tmp_path):
    bad = _with_infinite_reference(reference_dir, tmp_path / "bad", rows=None)
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "train.max_nonfinite_steps=2"])
    out = tmp_path / "train"
    out.mkdir()
    with pytest.raises(Exception) as err:
        train.run(StageContext(cfg, out, {"reference": bad}, "nonfinite-all"))
    assert "2 steps in a row had a non-finite loss or gradient" in str(err.value)
    assert "train.max_nonfinite_steps" in str(err.value)


def test_isolated_nonfinite_steps_are_skipped_and_counted(reference_dir, tmp_path):
    bad = _with_infinite_reference(reference_dir, tmp_path / "bad", rows=1)
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "train.max_nonfinite_steps=3"])
    out = tmp_path / "train"
    out.mkdir()
    stats = train.run(StageContext(cfg, out, {"reference": bad}, "nonfinite-one"))
    # One poisoned pair, seen once per epoch (tiny.yaml: 2 epochs of 4 steps): two skipped steps, run finished.
    assert stats["steps"] == 8
    assert stats["nonfinite_steps"] == 2
    assert (out / "policy" / "model.safetensors").is_file()


@pytest.mark.parametrize("strategy, saver", [
    (["train.strategy=ddp"], "train.gradient_checkpointing=true"),
    (["train.strategy=deepspeed", "train.zero_stage=2"], "train.offload_optimizer=true"),
], ids=["checkpointing", "offload"])
def test_memory_savers_train_the_same_policy(reference_dir, plain_run, tmp_path, strategy, saver):
    """Gradient checkpointing (recomputed activations, no shared prompt) and ZeRO-Offload (optimizer state stepped
    in CPU memory) change where memory goes, not what is learned: the same losses and, after four steps on two
    workers, the same weights up to float32 reordering. Adam amplifies that reordering where gradients are tiny
    (up to 1.4e-3 in one embedding entry after steps of 4e-2), so each tensor's difference is measured against
    its whole update: measured below 0.1%."""
    from safetensors.torch import load_file

    _, plain_out, plain = plain_run(strategy)
    cfg, out, saver_stats = _train_two_workers(reference_dir, tmp_path, f"saver-{saver}", *strategy, saver)
    plain_weights = load_file(plain_out / "policy" / "model.safetensors")
    saver_weights = load_file(out / "policy" / "model.safetensors")
    assert saver_stats["steps"] == plain["steps"] == 4
    assert saver_stats["final/loss"] == pytest.approx(plain["final/loss"], rel=1e-4, abs=1e-5)
    initial = load_file(Path(resolve_model(cfg.model.policy)) / "model.safetensors")
    for key, value in plain_weights.items():
        update = (value - initial[key]).norm()
        assert update > 0, key
        assert (saver_weights[key] - value).norm() <= 0.01 * update, key


@STRATEGIES
def test_lora_trains_the_adapter_alone_under_each_strategy(reference_dir, tmp_path, strategy):
    """train.lora on two workers: the published policy is the base with the adapter merged in, the weights LoRA
    does not adapt (embeddings, norms) are bit for bit the base's, the adapter folder is small and loads to the
    same model, and the policy learned to rank the pairs."""
    from safetensors.torch import load_file

    from dpo_ray.models import load_causal_lm

    cfg, out, stats = _train_two_workers(reference_dir, tmp_path, "lora-" + strategy[-1], "train.lr=3e-2",
                                         "train.lora={r: 4, alpha: 8}", *strategy)
    assert stats["steps"] == 4 and stats["nonfinite_steps"] == 0
    assert stats["final/rewards/accuracies"] > 0.5
    base = load_file(Path(resolve_model(cfg.model.policy)) / "model.safetensors")
    merged = load_file(out / "policy" / "model.safetensors")
    assert set(merged) == set(base)
    adapted = {k for k in base if k.endswith("proj.weight")}
    assert adapted and all(not torch.equal(merged[k], base[k]) for k in adapted)
    assert all(torch.equal(merged[k], base[k]) for k in set(base) - adapted)
    adapter = out / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size < (out / "policy" / "model.safetensors").stat().st_size / 2
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(str(out / "adapter"))(ids).logits,
                                   load_causal_lm(str(out / "policy"))(ids).logits, rtol=1e-5, atol=1e-5)
