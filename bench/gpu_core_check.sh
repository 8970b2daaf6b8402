#!/usr/bin/env bash
# On a machine with a GPU: the checks of a change to the library's core. Builds the Python package (see
# gpu_build_python.sh), runs the Python suite on CUDA tensors (also with the portable mma.sync kernels and with
# Turing's), the host time per call (bench/host_overhead.py)
# and, given two builds of the C library, their kernels side by side (bench/ab_compare.py; the architecture's own
# kernels, then the portable mma.sync ones). Results under $OUT.
#   bench/gpu_core_check.sh [A.so B.so]
set -uo pipefail
source bench/gpu_build_python.sh
python3 -c "import flash_attn_plus as f; f.info()" | tee "$out/info.txt"
python3 -m pytest -q --device cuda -n 8 -p no:cacheprovider --tb=short -rfs tests/python 2>&1 \
  | tee "$out/pytest_cuda.log" | tail -25
# The portable (mma.sync) kernels on the features' cases and the NaN/Inf rules.
FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 python3 -m pytest -q --device cuda -n 8 -p no:cacheprovider --tb=short \
  tests/python/test_attention.py tests/python/test_varlen.py tests/python/test_dropout.py \
  tests/python/test_nan_inf.py 2>&1 | tee "$out/pytest_cuda_portable.log" | tail -3
# Turing's kernels (float16) as compute_75 PTX on this GPU: the suite's float16 cases.
FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=75 python3 -m pytest -q --device cuda -n 8 -p no:cacheprovider --tb=short \
  -k "float16 and not bfloat16" tests/python/test_attention.py tests/python/test_varlen.py tests/python/test_dropout.py \
  tests/python/test_kvcache.py tests/python/test_interface.py tests/python/test_nan_inf.py 2>&1 \
  | tee "$out/pytest_cuda_turing.log" | tail -3
python3 bench/host_overhead.py 2>&1 | tee "$out/host_overhead.txt" | head -12
if [ $# -eq 2 ]; then
  (cd bench && python3 ab_compare.py --rounds 5 --out "$out/ab_compare.json" a="../$1" b="../$2") 2>&1 \
    | tee "$out/ab_compare.txt"
  # The kernels every other sm_80+ GPU runs (mma.sync), on this GPU.
  (cd bench && FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 python3 ab_compare.py --rounds 5 \
    --out "$out/ab_compare_portable.json" a="../$1" b="../$2") 2>&1 | tee "$out/ab_compare_portable.txt"
fi
