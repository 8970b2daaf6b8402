#!/usr/bin/env bash
# The wheel a user installs: built from this tree, repaired with auditwheel (Highway and OpenMP copied into it,
# a manylinux tag), installed into a fresh virtual environment with no build step, and the package's demo run
# from it. torch comes from the test environment (a .pth file), nothing else does. Also checks that a source
# build without Highway says in one line what to install. Usage: scripts/wheel_check.sh PYTHON (the test
# environment's python, with auditwheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
launcher=(); command -v ccache >/dev/null && launcher=(CMAKE_CXX_COMPILER_LAUNCHER=ccache)

SKBUILD_CMAKE_DEFINE="${launcher[*]}" "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/raw" .
PATH="$(dirname "$python"):$PATH" "$python" -m auditwheel repair -w "$work/wheel" "$work/raw"/*.whl 2>&1 | tail -1
wheel=$(ls "$work/wheel"/*.whl)
echo "wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB), bundling:" \
  $("$python" -c "import sys, zipfile; print(*[n.split('/')[1] for n in zipfile.ZipFile(sys.argv[1]).namelist() if '.libs/' in n and n[-1] != '/'])" "$wheel")

python3 -m venv "$work/venv"
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
start=$EPOCHREALTIME
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"
echo "install time: $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }") s (pip install of the wheel into a fresh environment)"
# After the install: with the test environment on the path first, pip would find the package already there.
"$python" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" > "$site/test_env_torch.pth"
# The extension must find Highway and OpenMP inside the wheel, not on this machine.
extension=$(ls "$site"/flash_attn_plus/_C*.so)
if ldd "$extension" | grep -E "libhwy|libgomp" | grep -v "flash_attn_plus.libs"; then
  echo "the installed extension resolves Highway or OpenMP outside the wheel" >&2
  exit 1
fi
(cd "$work" && "$work/venv/bin/python" -m flash_attn_plus 1 256 4 64) | grep -E "^flash_attn_plus .* from|max error|first call"
"$work/venv/bin/python" -c "import flash_attn_plus, sys; sys.exit(not flash_attn_plus.__file__.startswith('$site'))"

# A source build without Highway: the configure step fails, with one line saying what to install.
if configure=$(cmake -S . -B "$work/no-highway" -G Ninja -DCMAKE_DISABLE_FIND_PACKAGE_hwy=ON -DFAP_BUILD_TESTS=OFF 2>&1)
then
  echo "configuring without Highway succeeded" >&2
  exit 1
fi
grep -- "-- Highway not found: install libhwy-dev" <<< "$configure"
