#!/usr/bin/env bash
# Installs the build and test dependencies from Debian's packages, only those missing (idempotent).
set -euo pipefail
packages=(cmake ninja-build g++ pkg-config ccache libhwy-dev libxsmm-dev libgtest-dev clang libclang-rt-dev libomp-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
