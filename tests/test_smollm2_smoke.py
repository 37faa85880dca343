"""The real SmolLM2-135M-Instruct path (GGUF -> cached safetensors folder -> every stage), kept very small."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import isolated_env

from dpo_ray.artifacts import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_default_config_runs_on_smollm2_with_tiny_settings(tmp_path):
    overrides = [
        f"run.root={tmp_path}", "run.name=smoke", "data.num_train_prompts=8", "data.num_eval_prompts=2",
        "sample.n=4", "sample.max_new_tokens=16", "sample.batch_size=8", "label.min_margin=0",
        "train.batch_size=2", "train.micro_batch_size=2", "train.epochs=1", "evaluate.samples_per_prompt=1",
    ]
    env = isolated_env()
    proc = subprocess.run([sys.executable, "pipelines/full.py", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "smoke"
    assert read_manifest(run_dir / "train")["stats"]["steps"] >= 1
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    # A real instruct model writes real reviews: the reference's completions carry real sentiment.
    assert metrics["reference_completion_tokens"] > 4
    assert "[dpo-ray] finished (1 round)" in proc.stdout
    config = json.loads((run_dir / "train" / "policy" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
