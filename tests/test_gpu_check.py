"""benchmarks/gpu_check.py, the check for the GPU machine that cannot hold Ray: it must run with `ray` impossible
to import. Here it runs on the CPU (bf16 against fp32), small; on the GPU machine the same script runs full size."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# `import ray` (and each module named in GPU_CHECK_BLOCK) raises ImportError inside the script, as on a machine
# without Ray.
WITHOUT_RAY = ("import os, runpy, sys; sys.modules['ray'] = None; "
               "sys.modules.update(dict.fromkeys(filter(None, os.environ.get('GPU_CHECK_BLOCK', '').split(',')))); "
               "sys.argv = ['gpu_check.py', *sys.argv[1:]]; "
               "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")


def _gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def trl_path(tmp_path_factory) -> str:
    """A folder to put on PYTHONPATH so that `import trl` works: empty where this environment has TRL; else TRL
    (figure 1's version, without its dependencies, which the project's own dependencies cover) installed into a
    temp folder, never into the environment: from .whl/ where the GPU wheels were built, else from the index."""
    if importlib.util.find_spec("trl") is not None:
        return ""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_trl import TRL_VERSION

    target = tmp_path_factory.mktemp("trl")
    links = ["--find-links", str(REPO / ".whl")] if (REPO / ".whl").is_dir() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                           "--target", str(target), *links, f"trl=={TRL_VERSION}"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"trl is not installed in this environment and pip could not install trl=={TRL_VERSION} "
                    f"into a temp folder: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return str(target)


@pytest.mark.slow
def test_gpu_check_trl_side_trains_on_the_same_tokens_as_ours(tmp_path, trl_path):
    # Figure 6's third side: TRL's DPOTrainer (precompute_ref_log_probs=True) on its own copy of the same weights,
    # fed the same pairs through its own collator, interleaved with ours and the plain step.
    out = tmp_path / "gpu_check.json"
    python_path = os.pathsep.join(filter(None, [trl_path, os.environ.get("PYTHONPATH", "")]))
    proc = _gpu_check("--device", "cpu", "--layers", "2", "--small", "--only-throughput", "--out", str(out),
                      env={"PYTHONPATH": python_path})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    throughput = json.loads(out.read_text())["checks"]["throughput"]
    assert throughput["ok"] and throughput["order"] == ["ours", "plain_pytorch", "trl_precompute"]
    trl = throughput["trl_precompute"]
    assert not trl["skipped"] and "error" not in trl, trl
    assert trl["versions"]["trl"] and trl["device"] == "cpu"
    # TRL's own tokenization of its dataset gave our ids, its collator the same non-padding tokens per step, and
    # its precomputed reference log-probs are our scorer's on the same initial weights (bf16, two implementations).
    assert trl["same_ids_as_ours"] and trl["same_tokens_as_ours"]
    assert trl["tokens_per_step"] == throughput["pair_tokens_per_step"]
    assert trl["reference_logps_max_relative_error"] <= 0.02
    for side in ("ours", "plain_pytorch", "trl_precompute"):
        result = throughput[side]
        assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-3), side  # reference = initial policy
        assert len(result["timed_s"]) == throughput["steps_timed"] and result["mfu"] > 0, side
    assert throughput["ours_over_trl_precompute"] > 0


@pytest.mark.slow
def test_gpu_check_runs_without_ray_and_reports_each_core(tmp_path):
    # Every check, the train stage's GPU engine included: ZeRO-2 and ZeRO-3 on a one-rank process group (gloo here,
    # NCCL on a GPU). TRL is made unimportable too, whether or not this environment has it: its side is then
    # skipped, with the reason (the TRL side runs in the test below).
    out = tmp_path / "gpu_check.json"
    # DeepSpeed's CPU ops are JIT-built into the suite's shared TORCH_EXTENSIONS_DIR (conftest), once for every test.
    proc = _gpu_check("--device", "cpu", "--layers", "2", "--small", "--out", str(out), env={"GPU_CHECK_BLOCK": "trl"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["checks"]) == {"scorer", "sampler", "train_step", "throughput",
                                                      "deepspeed_zero2", "deepspeed_zero3"}
    for name, check in report["checks"].items():
        assert check["ran_on"] == "cpu", name
    train = report["checks"]["train_step"]
    assert train["losses"][-1] < train["losses"][0]
    assert 0 < train["grad_norm_relative_error"] <= train["tolerances"][1]  # bf16 differs from fp32, a little
    throughput = report["checks"]["throughput"]
    assert throughput["ours_over_plain_pytorch"] > 0 and 0 < throughput["ours"]["mfu"]
    assert throughput["trl_precompute"]["skipped"] and "ours_over_trl_precompute" not in throughput
    assert throughput["trl_precompute"]["reason"].startswith("trl cannot be imported: ")
    for stage in (2, 3):
        ds = report["checks"][f"deepspeed_zero{stage}"]
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
