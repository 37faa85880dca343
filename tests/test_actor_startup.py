"""What a model actor imports as it starts: on two cores each import is paid again by every actor of every stage
(benchmarks/README.md, fixed costs), so what a stage does not use stays out."""

import importlib.util
import subprocess
import sys


def test_loading_a_model_leaves_scikit_learn_and_scipy_unimported():
    from dpo_ray.models import resolve_model

    assert importlib.util.find_spec("sklearn") is not None, "the check needs scikit-learn installed, as mlflow does"
    # Prepared here first: on a machine whose model cache is empty, building the built-in model reads SmolLM2's GGUF
    # file, which imports scipy once; actors load the prepared folder.
    resolve_model("builtin:tiny-llama")
    code = ("import sys; from dpo_ray.models import load_causal_lm; load_causal_lm('builtin:tiny-llama'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
