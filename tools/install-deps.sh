#!/usr/bin/env bash
# Installs the Debian packages libplasa needs to build and test, if missing.
# Run as root on Debian 12 (bookworm). Safe to run again.
set -euo pipefail
pkgs=(build-essential cmake pkg-config libdnnl-dev check libcjson-dev valgrind clang)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
