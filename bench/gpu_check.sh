#!/usr/bin/env bash
# The GPU checks, as one command on a machine with a CUDA device and its own torch (issue 3):
# the CUDA tests of the checkpoint library, the real-NVML health test, then the GPU benchmark
# (device-to-host snapshot and host-to-device reload of a 4 GiB state against cudaMemcpy).
#
#   bash bench/gpu_check.sh [GIB]      # results under $OUT (else /tmp/stalwart-gpu)
#
# stalwart runs from src/ without installing. Dependencies that machine lacks travel as wheels in
# .whl/ (`make gpu-wheels` here, for its Python 3.12), installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/stalwart-gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
df -h /dev/shm /tmp 2>&1 | tee -a "$out/gpu.txt"  # the memory tier needs the state's size in /dev/shm
python3 -c "import torch, stalwart.checkpoint.format as f; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'crc', f.CRC32C_LIBRARY)" 2>&1 | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/checkpoint/test_gpu.py tests/health/test_gpu.py::test_real_nvml_when_present 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
python3 bench/checkpoint.py --gpu --gib "${1:-4}" --out "$out/checkpoint_gpu" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee -a "$out/gpu.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
