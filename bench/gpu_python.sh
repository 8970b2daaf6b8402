#!/usr/bin/env bash
# On a machine with a GPU and no network: builds the Python package against copied-over libraries, then runs the
# Python suite on CUDA tensors, torch.compile included, and the HF transformers check. Results under $OUT.
#   offline/hwy/usr: Highway's headers, CMake package and libraries copied from this machine (see
#   docs/python.md, "Running on a machine with a GPU and no network").
set -uo pipefail
source bench/gpu_build_python.sh
python3 -c "import flash_attn_plus as f; f.info()" | tee "$out/info.txt"
python3 -m pytest -q --device cuda -n 8 -p no:cacheprovider --tb=short -rfs tests/python "$@" 2>&1 | tee "$out/pytest_cuda.log" | tail -60
python3 examples/hf_llama.py --out "$out/hf_llama.json"
python3 bench/gpu_backward.py --out "$out"
python3 bench/plot.py "$out/gpu_backward.json" "$out/backward.png" --title "Backward, bf16"
