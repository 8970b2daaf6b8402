#!/usr/bin/env bash
# Every test: set up, then build and run the C++ suites twice, optimised and under AddressSanitizer +
# UndefinedBehaviorSanitizer, compile every CUDA kernel configuration with NVRTC, run the Python package's suite
# (pytest, on the CPU), check the wheel in a fresh environment and fuzz the C API for 60 s. The C++ CPU suites and
# pytest's attention numerics run again with the CPU backend held to AVX2, so that a machine with AVX-512 still
# tests the path others run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
jobs=$(nproc)
stage() { echo "== $* (at ${SECONDS} s)"; }  # each stage's start, in seconds since the script began
launcher=(); command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)

run_suite() {  # build-dir, ctest arguments, extra cmake arguments...
  local dir=$1 ctest_arguments=$2; shift 2
  cmake -S . -B "$dir" -G Ninja "${launcher[@]}" "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  (cd "$dir" && ctest -j "$jobs" --output-on-failure --timeout 1200 $ctest_arguments)
}

stage "optimised build"
run_suite build "-E AttentionKernelCompile" -DCMAKE_BUILD_TYPE=Release
stage "the same suites with the CPU backend held to AVX2 (FLASH_ATTENTION_PLUS_CPU_ISA=avx2: Highway and libxsmm)"
(cd build && FLASH_ATTENTION_PLUS_CPU_ISA=avx2 ctest -j "$jobs" --output-on-failure --timeout 1200 -E AttentionKernelCompile)
stage "NVRTC compilation of every CUDA kernel configuration (sm_75, sm_80, sm_86/sm_89, sm_90a; no GPU needed)"
# Through a kernel cache keyed on everything a kernel is built from (like ccache for the C++): unchanged kernels are
# not compiled again on this machine. Emptied past 2 GB (about six full sets: the entries of kernels since changed
# are never read again).
compile_cache="$HOME/.cache/flash_attn_plus_ci/compile_test"
if [ -d "$compile_cache" ] && [ "$(du -sm "$compile_cache" | cut -f1)" -gt 2048 ]; then rm -rf "$compile_cache"; fi
(cd build && FAP_COMPILE_TEST_CACHE="$compile_cache" FLASH_ATTENTION_PLUS_JIT_QUIET=1 \
  ctest --output-on-failure --timeout 3600 -V -R AttentionKernelCompile) |
  grep --line-buffered -E "NVRTC compiled|Test +#|tests passed|Failure|failed|nvrtc|ptxas"
stage "Python package: pip install (flash-attn-plus and the flash_attn drop-in), then pytest"
python=$(scripts/python_env.sh)
SKBUILD_CMAKE_DEFINE="${launcher[*]#-D}" "$python" -m pip install -q --no-build-isolation . ./compat
"$python" -m pytest -q tests/python
stage "pytest's attention numerics with the CPU backend held to AVX2"
FLASH_ATTENTION_PLUS_CPU_ISA=avx2 "$python" -m pytest -q tests/python/{test_attention,test_varlen,test_nan_inf,test_kvcache,test_dropout,test_training}.py
stage "The wheel: built, repaired (Highway and OpenMP bundled), installed into a fresh environment, demo run"
scripts/wheel_check.sh "$python"
stage "libFuzzer over the C API's argument structs (clang, AddressSanitizer + UndefinedBehaviorSanitizer), 60 s"
cmake -S . -B build-fuzz -G Ninja "${launcher[@]}" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFAP_SANITIZE=ON -DFAP_BUILD_FUZZ=ON -DFAP_BUILD_TESTS=OFF -DFAP_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-fuzz -j "$jobs" --target fuzz_c_api
mkdir -p build-fuzz/corpus
build-fuzz/fuzz_c_api -max_total_time=60 -timeout=10 -max_len=512 -rss_limit_mb=4096 -print_final_stats=1 \
  build-fuzz/corpus tests/fuzz/seeds 2>&1 | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+==ERROR|SUMMARY)"
# Under the sanitizers, every suite but the random sweep, and a fifth of the sweep's cases (a different fifth held
# to AVX2): the optimised build above runs all of them on both instruction sets; here they look for memory errors
# along the same code paths, at several times the cost per case.
stage "AddressSanitizer + UndefinedBehaviorSanitizer build (kernel compilation already covered above)"
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1
run_suite build-sanitize "-E AttentionKernelCompile|RandomCases" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFAP_SANITIZE=ON
(cd build-sanitize && ctest -j "$jobs" --output-on-failure --timeout 1200 -R RandomCases -I 1,,5)
stage "the sanitized CPU suites held to AVX2"
export FLASH_ATTENTION_PLUS_CPU_ISA=avx2
(cd build-sanitize && ctest -j "$jobs" --output-on-failure --timeout 1200 \
  -R "^(Rules|EveryArgument|AttentionEdgeCases|Layouts|Masks|KvCacheArguments|PagedKvArguments)")
(cd build-sanitize && ctest -j "$jobs" --output-on-failure --timeout 1200 -R RandomCases -I 3,,5)
echo "== done in ${SECONDS} s"
