#!/usr/bin/env bash
# The main job: set up, build, and run the demo (random q/k/v through the best usable backend, checked
# against a float64 reference). Arguments go to the demo: [batch seqlen heads head_dim].
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
launcher=(); command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" >/dev/null
cmake --build build --target fap_demo
build/fap_demo "$@"
