#!/usr/bin/env bash
# Builds the C library of a git revision, or of the working tree when none is given, into offline/variants/NAME.so,
# for bench/gpu_core_check.sh, bench/ab_compare.py and bench/variant_check.py to load beside other builds on a GPU
# machine (which also needs offline/hwy: see bench/gpu_build_python.sh). Without libxsmm, which only the CPU
# backend's tiles use, so that the GPU machine needs nothing but Highway.
#   bench/build_variant.sh before 8a29445 && bench/build_variant.sh after
#   (on the GPU machine) bench/gpu_core_check.sh offline/variants/before.so offline/variants/after.so
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 revision=${2:-}
source_dir=$(mktemp -d)
trap 'rm -rf "$source_dir"' EXIT
if [ -n "$revision" ]; then
  git archive "$revision" | tar xf - -C "$source_dir"
else
  git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$source_dir"  # offline/ is ignored
fi
launcher=(); command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
CCACHE_BASEDIR=$source_dir cmake -S "$source_dir" -B "$source_dir/build" -G Ninja "${launcher[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DFAP_WITH_LIBXSMM=OFF -DFAP_BUILD_TESTS=OFF -DFAP_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$source_dir/build" -j "$(nproc)" --target flash_attn_plus_shared >/dev/null
mkdir -p offline/variants
cp "$source_dir/build/libflash_attn_plus.so.0.1.0" "offline/variants/$name.so"
label="$(git rev-parse --short "${revision:-HEAD}")"
[ -n "$revision" ] || label+=" + working tree"
echo "offline/variants/$name.so ($label)"
