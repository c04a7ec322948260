#!/usr/bin/env bash
# The project's GPU checks in one run (for a machine lent for a few minutes): the `gpu`-marked tests of
# the network, the scan kernels and training, then the GPU benchmark. Writes everything under $OUT
# (default ./gpu-check): pytest.txt, junit.xml, gpu.json, gpu.png, bench.log.
#   source .device/env.sh && tools/gpu-check.sh          (tools/gpu-bundle.sh prepares .device/)
# MLflow is usually absent there: tracking is off for these runs (VMDDPM_* environment is not needed).
set -uo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || dirname "$0")/.." 2>/dev/null || cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/junit.xml" \
  tests/test_csm_triton.py tests/test_selective_scan.py tests/test_nn.py tests/test_train.py \
  > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.txt"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
tail -3 "$OUT/pytest.txt" "$OUT/bench.log"
