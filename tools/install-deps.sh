#!/usr/bin/env bash
# Installs the Debian packages libplasa needs to build and test, if missing,
# plus any package names given as arguments (tools/run.sh adds npm this way).
# Run as root on Debian 12 (bookworm). Safe to run again.
#
# ocl-icd-opencl-dev: libdnnl-dev's CMake package (dnnl-config.cmake) calls
# find_package(OpenCL), so configure fails without the OpenCL headers and
# libOpenCL.so. libdnnl-dev only recommends it, and we install without
# recommends. Why we keep oneDNN's CMake package: docs/dependencies.md.
#
# libopenmpi-dev openmpi-bin: only for the optional plasa_mpi library, the
# MPI path of plasa-train and the tests that run them under mpirun
# (docs/distributed.md). The core library never links MPI.
set -euo pipefail
pkgs=(build-essential cmake pkg-config libdnnl-dev ocl-icd-opencl-dev check libcjson-dev
      valgrind clang libopenmpi-dev openmpi-bin "$@")
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
