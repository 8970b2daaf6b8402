#!/usr/bin/env bash
# On a machine with a GPU and no network: the decode / KV-cache work's checks and benchmark. Builds the Python
# package (gpu_build_python.sh), runs the KV-cache, varlen and interface suites on CUDA tensors, the
# compute-sanitizer memcheck of out-of-range device indices, and bench/decode.py (add --quick for the main table
# only) with its chart (bench/plot.py). Results under $OUT.
set -uo pipefail
source bench/gpu_build_python.sh
python3 -m pytest -q --device cuda -n 8 -p no:cacheprovider --tb=short -rfs tests/python/test_kvcache.py \
  tests/python/test_varlen.py tests/python/test_interface.py 2>&1 | tee "$out/pytest_decode_cuda.log" | tail -25
compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/decode_memcheck.py 2>&1 \
  | tee "$out/decode_memcheck.log" | tail -8
echo "memcheck exit: ${PIPESTATUS[0]}" | tee -a "$out/decode_memcheck.log"
python3 bench/decode.py --out "$out" "$@" 2>&1 | tail -30
python3 bench/plot.py "$out/decode.json" "$out/decode.png" --title "Decode, bf16" 2>&1 | tail -3
