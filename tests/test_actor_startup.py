"""What a model actor imports as it starts: on two cores each import is paid again by every actor of every stage
(benchmarks/README.md, fixed costs), so what a stage does not use stays out."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_sampler_and_a_scorer_start_without_scikit_learn_and_scipy():
    # As Ray Data starts them, tokenizer first (AutoTokenizer's module imported scikit-learn before the model's
    # loader could say it is absent: 2.2 s of each start). Outside Ray, so the device is the CPU without a cluster.
    from dpo_ray.models import resolve_model

    assert importlib.util.find_spec("sklearn") is not None, "the check needs scikit-learn installed, as mlflow does"
    # Prepared here first: on a machine whose model cache is empty, building the built-in model reads SmolLM2's GGUF
    # file, which imports scipy once; actors load the prepared folder.
    resolve_model("builtin:tiny-llama")
    code = "\n".join([
        "import sys, ray",
        "ray.get_gpu_ids = lambda: []",
        "from dpo_ray.config import load_config",
        "from dpo_ray.ops.samplers import SamplerSpec, TransformersSampler",
        "from dpo_ray.ops.scorers import LogProbScorer, ScorerSpec",
        "cfg = load_config('configs/tiny.yaml')",
        "TransformersSampler(SamplerSpec.of(cfg, cfg.model.policy, 2, 4, 1.0, 0))",
        "LogProbScorer(ScorerSpec.of(cfg, cfg.model.policy, {'chosen_ids': 'ref_chosen_logps'}))",
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip().splitlines()[-1] == "[]"
