#!/usr/bin/env bash
# On a host with two or more GPUs and no network: context-parallel attention on NCCL, one process per GPU. The
# correctness suite (ring, varlen, Ulysses; ring-flash-attention's zigzag function and yunchang's
# LongContextAttention on the flash_attn drop-in when their wheels are in offline/wheels) and the scaling
# benchmark; results under $OUT.
set -uo pipefail
source bench/gpu_build_python.sh
for wheel in offline/wheels/ring_flash_attn-*.whl offline/wheels/yunchang-*.whl; do
  [ -f "$wheel" ] && python3 -m pip install -q --no-deps --no-index --target "$site" "$wheel"
done
nvidia-smi topo -m | tee "$out/topology.txt"
python3 -m pytest -q --device cuda -p no:cacheprovider --tb=short -rfs tests/python/test_context_parallel.py 2>&1 \
  | tee "$out/pytest_context_parallel.log" | tail -30
python3 bench/context_parallel.py --out "$out/context_parallel.json" "$@"
