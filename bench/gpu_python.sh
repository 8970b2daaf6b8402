#!/usr/bin/env bash
# On a GPU machine without network: builds the Python package against carried libraries, then runs the
# Python suite on CUDA tensors, torch.compile included, and the HF transformers check. Results under $OUT.
#   .device/hwy/usr: Highway's headers, CMake package and libraries copied from this machine (see
#   docs/python.md, "Running on the lent GPU").
set -uo pipefail
export PYTHONUNBUFFERED=1 FLASH_ATTENTION_PLUS_JIT_QUIET=1
export FLASH_ATTENTION_PLUS_CACHE_DIR=${FLASH_ATTENTION_PLUS_CACHE_DIR:-/tmp/flash_attn_plus_cache}
hwy=$PWD/.device/hwy/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$hwy${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-/tmp/out}; mkdir -p "$out"
site=/tmp/fap_site
stamp=$site/.built-$(find python src compat cmake CMakeLists.txt pyproject.toml -type f -not -path "*/build/*" | sort \
  | xargs cat | md5sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  SKBUILD_CMAKE_DEFINE="hwy_DIR=$hwy/cmake/hwy" python3 -m pip install -q --no-build-isolation --no-deps --no-index \
    --upgrade --target "$site" . ./compat 2>&1 | tail -20
  echo "pip install (build from source): $(( $(date +%s) - start )) s" | tee "$out/pip_install.txt"
  touch "$stamp"
fi
export PYTHONPATH=$site
python3 -c "import flash_attn_plus as f; f.info()" | tee "$out/info.txt"
python3 -m pytest -q --device cuda -n 8 -p no:cacheprovider --tb=short -rfs tests/python "$@" 2>&1 | tee "$out/pytest_cuda.log" | tail -60
python3 examples/hf_llama.py --out "$out/hf_llama.json"
python3 bench/gpu_backward.py --out "$out"
python3 bench/plot.py "$out/gpu_backward.json" "$out/backward.png" --title "Backward, bf16"
