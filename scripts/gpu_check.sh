#!/usr/bin/env bash
# The GPU check of issue 13, in one go (about 3-5 minutes on one H200; budget 8):
#   1. the CUDA test subset (tests/test_cuda.py and the device-parametrised method tests),
#   2. `bench speed` at LLaVA-OneVision-7B shapes, 32 frames, CUDA bf16, for none / uniform /
#      fastvid / fastv / holitom at retain 0.25 and 0.1.
# usage: scripts/gpu_check.sh OUT_DIR    (OUT_DIR gets gpu.txt, cuda_tests.log, bench_speed_7b.{json,png,log})
# Packages the GPU machine lacks, or a newer transformers (its image had 5.17; we test 5.24), may be
# carried as wheels in .whl/ (`python3 -m pip download --no-deps transformers==5.24.0 -d .whl`); PyAV is
# optional (without it the video decode column reads "not timed").
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_pruning_device.py \
  2>&1 | tee "$out/cuda_tests.log" || status=1
timeout 300 python3 -m streamprune.cli -v bench speed --shape llava-ov-7b --frames 32 --device cuda --dtype bfloat16 \
  --attn sdpa --methods uniform,fastvid,fastv,holitom --retain 0.25,0.1 \
  --json "$out/bench_speed_7b.json" --plot "$out/bench_speed_7b.png" 2>&1 | tee "$out/bench_speed_7b.log" || status=1
exit $status
