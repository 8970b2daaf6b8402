#!/usr/bin/env bash
# Every test: set up, then build and run the C++ suites twice, optimised and under AddressSanitizer +
# UndefinedBehaviorSanitizer, compile every CUDA kernel configuration with NVRTC, run the Python package's suite
# (pytest, on the CPU), check the wheel in a fresh environment and fuzz the C API for 60 s. The CPU suites run
# again with the CPU backend held to AVX2, so that a machine with AVX-512 still tests the path others run.
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
(cd build && ctest --output-on-failure --timeout 3600 -V -R AttentionKernelCompile) | grep -E "NVRTC compiled|Test +#|tests passed|Failure|failed|nvrtc|ptxas"
stage "Python package: pip install (flash-attn-plus and the flash_attn drop-in), then pytest"
python=$(scripts/python_env.sh)
SKBUILD_CMAKE_DEFINE="${launcher[*]#-D}" "$python" -m pip install -q --no-build-isolation . ./compat
"$python" -m pytest -q tests/python
stage "pytest with the CPU backend held to AVX2"
FLASH_ATTENTION_PLUS_CPU_ISA=avx2 "$python" -m pytest -q tests/python
stage "The wheel: built, repaired (Highway and OpenMP bundled), installed into a fresh environment, demo run"
scripts/wheel_check.sh "$python"
stage "libFuzzer over the C API's argument structs (clang, AddressSanitizer + UndefinedBehaviorSanitizer), 60 s"
cmake -S . -B build-fuzz -G Ninja "${launcher[@]}" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFAP_SANITIZE=ON -DFAP_BUILD_FUZZ=ON -DFAP_BUILD_TESTS=OFF -DFAP_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-fuzz -j "$jobs" --target fuzz_c_api
mkdir -p build-fuzz/corpus
build-fuzz/fuzz_c_api -max_total_time=60 -timeout=10 -max_len=512 -rss_limit_mb=4096 -print_final_stats=1 \
  build-fuzz/corpus tests/fuzz/seeds 2>&1 | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+==ERROR|SUMMARY)"
stage "AddressSanitizer + UndefinedBehaviorSanitizer build (kernel compilation already covered above)"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  run_suite build-sanitize "-E AttentionKernelCompile" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFAP_SANITIZE=ON
stage "the sanitized CPU suites held to AVX2"
(cd build-sanitize && FLASH_ATTENTION_PLUS_CPU_ISA=avx2 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest -j "$jobs" --output-on-failure --timeout 1200 -R "^(RandomCases|Rules|EveryArgument|AttentionEdgeCases|Layouts|Masks|KvCacheArguments|PagedKvArguments)")
echo "== done in ${SECONDS} s"
