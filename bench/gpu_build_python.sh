#!/usr/bin/env bash
# Sourced by the GPU scripts on a machine without network: builds the Python package (flash_attn_plus and the
# flash_attn drop-in) from this tree against Highway's files in offline/hwy/usr (headers, CMake package and
# libraries copied from a machine with libhwy-dev), once per source state, into /tmp/fap_site, and puts it on
# PYTHONPATH. Sets `out` to the folder named by OUT (default bench/output).
export PYTHONUNBUFFERED=1 FLASH_ATTENTION_PLUS_JIT_QUIET=1
export FLASH_ATTENTION_PLUS_CACHE_DIR=${FLASH_ATTENTION_PLUS_CACHE_DIR:-/tmp/flash_attn_plus_cache}
hwy=$PWD/offline/hwy/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$hwy${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-$PWD/bench/output}; mkdir -p "$out"
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
