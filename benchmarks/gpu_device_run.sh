#!/usr/bin/env bash
# The whole GPU check on the lent device machine (no network, no Ray, Python 3.12; see benchmarks/README.md, figure 6):
# installs DeepSpeed, pydantic and TRL from the wheels carried in .whl/ into /tmp/site, then runs gpu_check.py with
# Ray made unimportable. Writes $OUT/gpu_check.json and $OUT/gpu_check.log. Run from the repository root:
#   device run, carry [".whl"], timeout 450:  bash benchmarks/gpu_device_run.sh [--only-throughput]
set -uo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
export TORCH_EXTENSIONS_DIR=/tmp/te PYTHONPATH=/tmp/site:.
OUT=${OUT:-.}
install="python3 -m pip install -q --no-index --no-deps --target /tmp/site"
# Two installs, so a TRL problem cannot take DeepSpeed down with it.
$install .whl/deepspeed-* .whl/hjson-* .whl/pydantic* .whl/annotated_types-* .whl/typing_inspection-* 2>&1 | tail -2
$install .whl/trl-* .whl/datasets-* .whl/dill-* .whl/multiprocess-* .whl/xxhash-* .whl/fsspec-* 2>&1 | tail -2
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__,
torch.cuda.get_device_name())"
command -v cc gcc || echo "no C compiler on PATH (Triton, used by TRL on CUDA, needs one)"
extra=""
for arg in "$@"; do extra+=", '$arg'"; done
timeout 400 python3 -c "import runpy, sys; sys.modules['ray'] = None
sys.argv = ['gpu_check.py', '--out', '$OUT/gpu_check.json'$extra]
runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')" > "$OUT/gpu_check.log" 2>&1
rc=$?
echo "gpu_check rc=$rc"
grep -E '^(scorer|sampler|train_step|deepspeed_zero[23]|throughput) |^wrote' "$OUT/gpu_check.log" | cut -c1-4500
tail -n 4 "$OUT/gpu_check.log" | cut -c1-1500
exit $rc
