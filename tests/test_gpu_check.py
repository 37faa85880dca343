"""benchmarks/gpu_check.py, the check for the GPU machine that cannot hold Ray: it must run with `ray` impossible
to import. Here it runs on the CPU (bf16 against fp32), small; on the GPU machine the same script runs full size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# `import ray` raises ImportError inside the script, as on a machine without Ray.
WITHOUT_RAY = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = ['gpu_check.py', *sys.argv[1:]]; "
               "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")


def _gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_gpu_check_runs_without_ray_and_reports_each_core(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _gpu_check("--device", "cpu", "--layers", "2", "--small", "--no-deepspeed", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["checks"]) == {"scorer", "sampler", "train_step", "throughput"}
    for name, check in report["checks"].items():
        assert check["ran_on"] == "cpu", name
    train = report["checks"]["train_step"]
    assert train["losses"][-1] < train["losses"][0]
    assert 0 < train["grad_norm_relative_error"] <= train["tolerances"][1]  # bf16 differs from fp32, a little
    throughput = report["checks"]["throughput"]
    assert throughput["ours_over_plain_pytorch"] > 0 and 0 < throughput["ours"]["mfu"]


@pytest.mark.slow
def test_gpu_check_runs_the_deepspeed_engine_without_ray(tmp_path):
    # The train stage's GPU engine, ZeRO-2 and ZeRO-3, on a one-rank process group (gloo here, NCCL on a GPU).
    out = tmp_path / "gpu_check.json"
    # A JIT build of DeepSpeed's CPU ops killed half-way leaves a lock that would hang the next: a folder of its own.
    proc = _gpu_check("--device", "cpu", "--layers", "2", "--small", "--out", str(out),
                      env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(out.read_text())["checks"]
    for stage in (2, 3):
        ds = checks[f"deepspeed_zero{stage}"]
        assert ds["ok"] and ds["backend"] == "gloo" and ds["param_dtype"] == "torch.bfloat16", ds
        assert ds["losses"][-1] < ds["losses"][0] and ds["saved_policy_reload_max_relative_error"] <= 1e-3


def test_gpu_check_without_cuda_says_so():
    proc = _gpu_check("--device", "cuda")
    if proc.returncode == 0:
        pytest.skip("this machine has CUDA")
    assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr


@pytest.mark.slow
def test_gpu_check_model_has_smollm2s_architecture():
    # The weights cannot travel to the GPU machine; the architecture the check builds must be the default's.
    from transformers import AutoConfig

    from dpo_ray.models import resolve_model

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import SMOLLM2_135M

    real = AutoConfig.from_pretrained(resolve_model("builtin:smollm2-135m-instruct")).to_dict()
    for key, value in SMOLLM2_135M.items():
        assert real[key] == pytest.approx(value) if isinstance(value, float) else real[key] == value, key
